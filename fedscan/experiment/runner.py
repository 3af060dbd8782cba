"""Run every seed (partition, initial weights, the three arms) and summarise over seeds.

Spread = sample standard deviation over seeds (ddof 1; 0 with a single seed). The local-only
arm's headline figures are the mean over hospitals; ``best_hospital`` takes, in every seed, the
hospital with the highest test accuracy (a strict baseline for FedAvg to beat).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fedscan.experiment import arms, crossval
from fedscan.experiment.config import ExperimentConfig
from fedscan.experiment.data import ensure_index, eval_samples, load_rows, write_label_book
from fedscan.experiment.errors import ExperimentError
from fedscan.experiment.partition import class_shares, partition
from fedscan.experiment.stats import N_BOOT
from fedscan.experiment.tasks import ARMS, Task, run_task
from fl_protocol.metrics import Metrics

log = logging.getLogger(__name__)

METRICS = ("accuracy", "precision", "f1", "sensitivity", "specificity", "auc")
TARGET_GAIN_OVER_BEST_LOCAL = 3.0  # accuracy points
TARGET_GAP_TO_CENTRALIZED = 2.0
SIMULATION_NOTE = (
    "FedAvg is simulated in-process (the coordinator's fedavg strategy + the edge trainer, fp32 "
    "deltas, no MQTT); the MQTT path is exercised by `fedscan demo` and the integration tests."
)


def stats(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std}


def _values(m: Metrics) -> dict[str, float | None]:
    d = m.to_dict()
    return {k: d[k] for k in METRICS}


def summarize(per_seed: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of every metric (a metric undefined in some seed is skipped)."""
    out: dict[str, dict[str, float]] = {}
    for key in METRICS:
        vals = [float(v) for s in per_seed if (v := s.get(key)) is not None]
        if vals:
            out[key] = {**stats(vals), "n_seeds": float(len(vals))}
    return out


def _mean_metrics(ms: Sequence[Metrics]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in METRICS:
        vals = [v for m in ms if (v := _values(m)[key]) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    return out


def prepare_seed(
    config: ExperimentConfig,
    seed: int,
    parts: dict[str, Any],
    fold: int = 0,
    pool: Sequence[Any] | None = None,
    test_rows: Sequence[Any] | None = None,
) -> list[Task]:
    """Partition, label books and initial weights of one seed (and fold); its three tasks."""
    base = parts["base"]
    pool = parts["pool"] if pool is None else pool
    test_rows = parts["test_rows"] if test_rows is None else test_rows
    work = config.work / f"seed-{seed}" / (f"fold-{fold}" if fold else "")
    hospitals = partition(pool, config.nodes, config.partition, seed)
    books = tuple(
        (h.name, write_label_book(work / "books" / f"{h.name}.sqlite", h.rows, base))
        for h in hospitals
    )
    pooled = write_label_book(work / "books" / "pooled.sqlite", pool, base)
    init = arms.initial_weights(
        config.arch,
        seed,
        work / "global_v0.safetensors",
        texture=config.texture,
        pretrained=config.pretrained,
    )
    parts.setdefault("hospitals", {})[(seed, fold)] = [h.summary() for h in hospitals]
    return [
        Task(
            seed,
            arm,
            config,
            work,
            books,
            pooled,
            init,
            parts["pool_cache"],
            parts["eval_cache"],
            tuple(test_rows),
            base,
            fold,
        )
        for arm in ARMS
    ]


def _progress(out: Mapping[str, Any]) -> None:
    if out["arm"] == "local_only":
        accs = ", ".join(f"{k} {100 * m['accuracy']:.1f}%" for k, m in out["hospitals"].items())
    else:
        accs = f"{100 * out['metrics']['accuracy']:.1f}%"
    fold = f" fold {out['fold']}" if out.get("fold") else ""
    print(f"seed {out['seed']}{fold}: {out['arm']} done in {out['seconds']:.0f} s ({accs})",
          flush=True)  # fmt: skip


def run_tasks(
    tasks: Sequence[Task],
    jobs: int,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every task, ``jobs`` at a time (in this process when ``jobs`` is 1); ``on_done`` gets
    each result as it finishes."""
    if jobs <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(run_task(task))
            _progress(results[-1])
            if on_done:
                on_done(results[-1])
        return results
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_task, t) for t in tasks]
        for fut in as_completed(futures):
            _progress(fut.result())
            if on_done:
                on_done(fut.result())
        return [f.result() for f in futures]


def seed_record(
    seed: int, hospitals: Any, results: Sequence[Mapping[str, Any]], fold: int = 0
) -> dict[str, Any]:
    """One seed's (and fold's) results in the JSON's ``runs`` shape."""
    by_arm = {r["arm"]: r for r in results if r["seed"] == seed and r.get("fold", 0) == fold}
    local = {n: Metrics.from_dict(m) for n, m in by_arm["local_only"]["hospitals"].items()}
    best = max(local, key=lambda name: local[name].accuracy)
    return {
        "seed": seed,
        "fold": fold,
        "strategy": by_arm["fedavg"].get("strategy", arms.STRATEGY),
        "hospitals": hospitals,
        "local_only": {n: m.to_dict() for n, m in local.items()},
        "local_only_mean": _mean_metrics(list(local.values())),
        "best_hospital": {"name": best, **local[best].to_dict()},
        "fedavg": by_arm["fedavg"]["metrics"],
        "fedavg_last_round": by_arm["fedavg"]["last_metrics"],
        "fedavg_selected_version": by_arm["fedavg"]["selected_version"],
        "fedavg_per_round_accuracy": by_arm["fedavg"]["per_round"],
        "fedavg_per_round_val_accuracy": by_arm["fedavg"]["val_accuracy"],
        "centralized": by_arm["centralized"]["metrics"],
        "timings": {f"{arm}_s": by_arm[arm]["seconds"] for arm in ARMS},
    }


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The arms' mean/std over seeds and the target check."""
    names = [h["name"] for h in runs[0]["hospitals"]]
    local_arm: dict[str, Any] = dict(summarize([r["local_only_mean"] for r in runs]))
    local_arm["aggregate"] = "mean over hospitals, then mean/std over seeds"
    local_arm["per_hospital"] = {n: summarize([r["local_only"][n] for r in runs]) for n in names}
    local_arm["best_hospital"] = summarize([r["best_hospital"] for r in runs])
    local_arm["best_hospital_names"] = [r["best_hospital"]["name"] for r in runs]
    fed_arm: dict[str, Any] = dict(summarize([r["fedavg"] for r in runs]))
    per_round = list(zip(*(r["fedavg_per_round_accuracy"] for r in runs), strict=True))
    fed_arm["per_round_accuracy"] = [stats(list(v)) for v in per_round]
    fed_arm["last_round"] = summarize([r["fedavg_last_round"] for r in runs])
    fed_arm["selected_versions"] = [r["fedavg_selected_version"] for r in runs]
    fed_arm["selection"] = (
        "the global version with the best hospitals' weighted local-validation accuracy "
        "(the other arms keep the epoch with the best local validation loss)"
    )
    fed_arm["strategy"] = runs[0].get("strategy", arms.STRATEGY)
    fed_arm["simulated"] = True
    best_mean = max(names, key=lambda n: local_arm["per_hospital"][n]["accuracy"]["mean"])
    local_arm["best_hospital_on_average"] = {"name": best_mean,
                                             **local_arm["per_hospital"][best_mean]}  # fmt: skip
    central_arm = summarize([r["centralized"] for r in runs])
    return {
        "local_only": local_arm,
        "fedavg": fed_arm,
        "centralized": central_arm,
        "target": target_check(runs, local_arm, fed_arm, central_arm),
    }


def target_check(
    runs: Sequence[Mapping[str, Any]],
    local_arm: Mapping[str, Any],
    fed_arm: Mapping[str, Any],
    central_arm: Mapping[str, Any],
) -> dict[str, Any]:
    """FedAvg against the best local-only hospital and against centralized, in accuracy points.

    Two readings of "the best local-only hospital": the strict one takes, in every seed, the
    hospital with the highest *test* accuracy (a max of noisy estimates picked on the test set
    itself, so biased upwards); the other takes the hospital with the best mean over seeds.
    Paired per-seed differences and the test set's binomial standard error say how much of a
    gap is noise.
    """
    fed = 100 * fed_arm["accuracy"]["mean"]
    gain = fed - 100 * local_arm["best_hospital"]["accuracy"]["mean"]
    gain_avg = fed - 100 * local_arm["best_hospital_on_average"]["accuracy"]["mean"]
    gap = 100 * central_arm["accuracy"]["mean"] - fed
    paired_gain = [100 * (r["fedavg"]["accuracy"] - r["best_hospital"]["accuracy"]) for r in runs]
    paired_gap = [100 * (r["centralized"]["accuracy"] - r["fedavg"]["accuracy"]) for r in runs]
    n_test = int(runs[0]["fedavg"]["n"])
    p = fed_arm["accuracy"]["mean"]
    return {
        "fedavg_minus_best_local_points": gain,
        "fedavg_minus_best_hospital_on_average_points": gain_avg,
        "centralized_minus_fedavg_points": gap,
        "paired_fedavg_minus_best_local_points": stats(paired_gain),
        "paired_centralized_minus_fedavg_points": stats(paired_gap),
        "test_set_binomial_se_points": 100 * (p * (1 - p) / n_test) ** 0.5 if n_test else None,
        "required_gain_points": TARGET_GAIN_OVER_BEST_LOCAL,
        "allowed_gap_points": TARGET_GAP_TO_CENTRALIZED,
        "met": gain >= TARGET_GAIN_OVER_BEST_LOCAL and gap <= TARGET_GAP_TO_CENTRALIZED,
        "met_against_best_hospital_on_average": gain_avg >= TARGET_GAIN_OVER_BEST_LOCAL
        and gap <= TARGET_GAP_TO_CENTRALIZED,
    }


def _pm(d: Mapping[str, Any], key: str) -> str:
    s = d.get(key)
    if not s:
        return "-"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def markdown(doc: Mapping[str, Any]) -> str:
    """The comparison as a markdown table (percent, mean ± std over seeds)."""
    a = doc["arms"]
    cols = ("accuracy", "f1", "sensitivity", "specificity", "auc")
    n_seeds = len(doc["runs"])
    rows: list[tuple[str, Mapping[str, Any]]] = [
        (f"Local-only, mean of {len(a['local_only']['per_hospital'])} hospitals", a["local_only"])
    ]
    rows += [(f"Local-only {n}", s) for n, s in a["local_only"]["per_hospital"].items()]
    best_avg = a["local_only"].get("best_hospital_on_average")
    if best_avg:
        rows.append((f"Local-only, best hospital on average ({best_avg['name']})", best_avg))
    rows.append(
        ("Local-only, best hospital of each seed (on test)", a["local_only"]["best_hospital"])
    )
    rows.append(("FedAvg global model (version chosen on validation)", a["fedavg"]))
    rows.append(("FedAvg global model, last round", a["fedavg"]["last_round"]))
    rows.append(("Centralized (pooled data)", a["centralized"]))
    head = "| Arm | Accuracy % | F1 % | Sensitivity % | Specificity % | AUC % |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join([name, *(_pm(s, c) for c in cols)]) + " |" for name, s in rows]
    c = doc["config"]
    t = doc["target"]
    lines += [
        "",
        f"{c['partition']} partition, {c['nodes']} hospitals, {c['arch']} (random init), "
        f"{c['rounds']} rounds x {c['local_epochs']} local epochs (= {c['total_epochs']} epochs "
        f"for local-only and centralized), mean ± std over {n_seeds} run(s) (seeds x folds); test: "
        f"{doc.get('evaluation', 'official test split')} ({doc['test_set']['slices']} slices).",
        f"FedAvg - best local-only hospital of each seed: "
        f"{t['fedavg_minus_best_local_points']:+.1f} points; FedAvg - best hospital on average: "
        f"{t.get('fedavg_minus_best_hospital_on_average_points', float('nan')):+.1f} points "
        f"(target >= +{t['required_gain_points']:.0f}); centralized - FedAvg: "
        f"{t['centralized_minus_fedavg_points']:+.1f} points (target <= "
        f"{t['allowed_gap_points']:.0f}). Target {'met' if t['met'] else 'NOT met'} (strict), "
        f"{'met' if t.get('met_against_best_hospital_on_average') else 'NOT met'} against the "
        "best hospital on average. Test-set binomial standard error: "
        f"{t.get('test_set_binomial_se_points') or float('nan'):.1f} points.",
        SIMULATION_NOTE,
    ]
    return "\n".join(lines)


def _fold_plan(
    config: ExperimentConfig, seed: int, pool: list[Any], test_rows: list[Any]
) -> list[tuple[int, list[Any], list[Any]]]:
    """[(fold, pool rows, test rows)]: the official split, or ``config.folds`` patient-disjoint
    folds over every row (train + val + test), class-balanced, dealt per seed."""
    if not config.folds:
        return [(0, pool, test_rows)]
    everything = [*pool, *test_rows]
    folds = partition(everything, config.folds, "iid", seed, prefix="fold")
    out = []
    for k, fold in enumerate(folds, start=1):
        held = {r.sop_instance_uid for r in fold.rows}
        out.append((k, [r for r in everything if r.sop_instance_uid not in held], list(fold.rows)))
    return out


def _done_file(config: ExperimentConfig) -> Path:
    """Finished tasks of this configuration (JSON lines), so an interrupted run resumes."""
    skip = ("json_out", "jobs", "threads", "work_dir", "cache_dir", "n_boot")
    basis = {k: v for k, v in config.describe().items() if k not in skip}
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:12]
    return config.work / f"done-{digest}.jsonl"


def _load_done(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Everything; writes ``config.json_out`` and returns the document."""
    t_start = time.perf_counter()
    index = ensure_index(config.dataset, config.cache_dir)
    pool, test_rows, base = load_rows(index)
    config.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cv = bool(config.folds)
    parts: dict[str, Any] = {
        "pool": pool,
        "base": base,
        "test_rows": test_rows,
        "pool_cache": config.work / "pool-cache",
        "eval_cache": config.work / ("pool-cache" if cv else "eval-cache"),
    }
    tex = config.texture
    eval_samples(test_rows, base, parts["eval_cache"], texture=tex)  # warm both caches once
    eval_samples(pool, base, parts["pool_cache"], texture=tex)
    if cv:
        eval_samples(test_rows, base, parts["pool_cache"], texture=tex)
    print(f"{len(pool)} pool and {len(test_rows)} test slices preprocessed "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    done_path = _done_file(config)
    done = _load_done(done_path)
    finished = {(r["seed"], r.get("fold", 0), r["arm"]) for r in done}
    tasks: list[Task] = []
    plan: list[tuple[int, int]] = []
    for seed in config.seeds:
        for fold, fpool, ftest in _fold_plan(config, seed, pool, test_rows):
            plan.append((seed, fold))
            tasks += [t for t in prepare_seed(config, seed, parts, fold, fpool, ftest)
                      if (seed, fold, t.arm) not in finished]  # fmt: skip
    if finished:
        print(f"resuming: {len(finished)} task(s) already done ({done_path.name})", flush=True)

    def record(out: dict[str, Any]) -> None:
        with done_path.open("a") as fh:
            fh.write(json.dumps(out, default=str) + "\n")

    results = done + run_tasks(tasks, config.jobs, on_done=record)
    runs = [seed_record(s, parts["hospitals"][(s, f)], results, f) for s, f in plan]
    doc: dict[str, Any] = {
        "schema": "fedscan.experiment/2",
        "config": config.describe(),
        "note": SIMULATION_NOTE,
        "init": "random (no pretrained weights)",
        "index": str(index),
        "evaluation": (
            f"{config.folds}-fold patient-disjoint cross-validation over every slice "
            "(train + val + test of the official split); each fold's remaining patients are "
            "partitioned across the hospitals"
            if cv
            else "official test split"
        ),
        "pool": {
            "slices": len(pool),
            "patients": len({r.patient_key for r in pool}),
            "target_class_shares": class_shares(config.partition, config.nodes),
        },
        "test_set": {
            "slices": len(test_rows),
            "patients": len({r.patient_key for r in test_rows}),
            "covid": sum(r.label == "covid" for r in test_rows),
            "non_covid": sum(r.label == "non_covid" for r in test_rows),
        },
        "metric_definitions": "fl_protocol.metrics (positive class = covid); std = sample "
        "standard deviation over the runs (seeds, or seeds x folds)",
        "runs": runs,
        "predictions": [
            {
                k: r[k]
                for k in (
                    "seed",
                    "fold",
                    "arm",
                    "test_ids",
                    "test_labels",
                    "test_patients",
                    "scores",
                )
                if k in r
            }
            for r in results
        ],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if cv:
        doc["test_set"] = {"slices": len(pool) + len(test_rows), "note": "every slice, once"}
    _summaries(doc, config.n_boot)
    doc["seconds"] = time.perf_counter() - t_start
    _write(config.json_out, doc)
    return doc


def _summaries(doc: dict[str, Any], n_boot: int) -> None:
    agg = aggregate(doc["runs"])
    doc["arms"] = {k: agg[k] for k in ("local_only", "fedavg", "centralized")}
    doc["target"] = agg["target"]
    if doc.get("predictions"):
        seeds = sorted({r["seed"] for r in doc["predictions"]})
        doc["intervals"] = crossval.summarize(doc["predictions"], seeds, n_boot=n_boot)
    doc["markdown"] = markdown(doc)
    if doc.get("intervals"):
        doc["markdown"] += "\n" + crossval.markdown(doc["intervals"])


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def resummarize(path: Path, n_boot: int | None = None) -> dict[str, Any]:
    """Recompute the arms, the target check, the intervals and the table of an earlier run
    from its ``runs`` and ``predictions`` (no training); rewrites the file."""
    doc = load(path)
    _summaries(doc, n_boot or int(doc.get("config", {}).get("n_boot", N_BOOT)))
    _write(path, doc)
    return doc


def compare_files(path: Path, other: Path, n_boot: int | None = None) -> dict[str, Any]:
    """``path``'s run minus ``other``'s, arm by arm, paired on the same test slices (no
    training): written beside ``path`` as ``<stem>-vs-<other stem>.json``."""
    a, b = load(path), load(other)
    seeds = [
        s for s in a.get("config", {}).get("seeds", []) if s in b.get("config", {}).get("seeds", [])
    ]
    names = (path.stem, other.stem) if path.stem != other.stem else ("first", "second")
    try:
        cmp = crossval.compare(
            [a.get("predictions", []), b.get("predictions", [])],
            names,
            seeds,
            n_boot=n_boot or N_BOOT,
        )
    except ValueError as exc:
        raise ExperimentError(f"cannot compare {path.name} and {other.name}: {exc}") from None
    if not cmp["per_seed"]:
        raise ExperimentError(
            f"cannot compare {path.name} and {other.name}: no seed with complete folds in both"
        )
    cmp["configs"] = {names[0]: a.get("config"), names[1]: b.get("config")}
    cmp["markdown"] = crossval.compare_markdown(cmp)
    _write(path.with_name(f"{path.stem}-vs-{other.stem}.json"), cmp)
    return cmp


def load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(Path(path).read_text())
    return result
