"""The demo's results: the models scored on the held-out test set, the rounds, the nodes' live
predictions, and the configuration, as a ``fedscan.report.ReportResults``.

Everything is read from disk after the processes stopped: the coordinator's state and global
checkpoints (``coordinator.state``, read-only), each hospital's local-only weights, and each
node's ``predictions`` table (docs/CONTRACTS.md).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from fedscan.demo import evaluate as ev
from fedscan.demo.config import DemoConfig
from fedscan.demo.plan import DataPlan
from fedscan.report import ModelEval, ReportResults, RoundPoint

log = logging.getLogger(__name__)

TITLE = "fedscan demo: federated COVID / non-COVID CT classification"
LIVE_TABLE = "Live predictions of the unlabelled slices (on arrival)"


def live_predictions(
    node_dbs: dict[str, Path], truth: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """How each node's on-arrival predictions of its unlabelled slices fared
    (``truth``: node -> inbox path -> true label)."""
    out = []
    for node, db in node_dbs.items():
        node_truth = truth.get(node, {})
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                rows = conn.execute("SELECT path, label, model_version FROM predictions")
                preds = [(p, lab, v) for p, lab, v in rows if p in node_truth]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("%s: predictions unreadable: %s", node, exc)
            continue
        right = sum(1 for p, lab, _ in preds if lab == node_truth[p])
        versions = sorted({str(v) for _, _, v in preds}, key=lambda s: (len(s), s))
        out.append(
            {
                "node": node,
                "unlabelled slices": len(node_truth),
                "predicted on arrival": len(preds),
                "correct": right,
                "accuracy %": round(100.0 * right / len(preds), 1) if preds else None,
                "model versions used": ", ".join(f"v{v}" for v in versions),
            }
        )
    return out


def build_results(
    c: DemoConfig,
    plan: DataPlan,
    coordinator_state: Path,
    local: dict[str, Path],
    live: list[dict[str, Any]],
    *,
    eval_cache: Path,
    labels_needed: int,
    broker_port: int,
) -> ReportResults:
    """Score every model on the held-out test set and gather what the report shows."""
    from coordinator.reports import round_summaries
    from coordinator.state import State

    test = ev.load_test_set(plan.test, plan.base, eval_cache, texture=c.texture)
    state = State(coordinator_state, readonly=True)
    try:
        versions = state.versions()
        summaries = round_summaries(state)
        paths = {v.version: state.checkpoint_path(v.version) for v in versions}
        metrics_rows = state.metrics()
    finally:
        state.close()
    models: list[ModelEval] = []
    epochs = c.rounds * c.local_epochs
    for node, weights in local.items():
        m, roc, cal = ev.score_with_calibration(weights, test, local_operating_point(weights))
        models.append(ModelEval(
            name=f"{node} local-only", kind="local", node=node, metrics=m, roc=roc,
            calibration=cal,
            description=(
                f"trained on {node}'s own labels only (fedscan node train), from the same "
                f"random initial weights as global v0, for {epochs} epoch(s) = rounds x "
                "local epochs, the budget of its federated training; best epoch on its "
                "local validation patients"
            ),
        ))  # fmt: skip
    points: list[RoundPoint] = []
    accepted = {int(s["version_out"]): len(s["accepted"]) for s in summaries
                if s["version_out"] is not None}  # fmt: skip
    weighted: dict[int, float] = {}
    for s in summaries:
        if s["weighted"] and s["weighted"].get("accuracy") is not None:
            weighted[int(s["version_in"])] = float(s["weighted"]["accuracy"])
    val = validation_set(plan, eval_cache, texture=c.texture)
    val_accuracy: dict[int, float] = {}
    for version in sorted(paths):
        m, roc = ev.score(paths[version], test)
        if val is not None:
            val_accuracy[version] = ev.score(paths[version], val)[0].accuracy
        reported = {
            r.node: float(r.metrics["accuracy"])
            for r in metrics_rows
            if r.model_version == version and "accuracy" in r.metrics
        }
        points.append(RoundPoint(version, version, m.accuracy, reported,
                                 weighted.get(version), accepted.get(version, 0)))  # fmt: skip
    if paths:
        last = max(paths)
        chosen = select_version(val_accuracy, list(paths))
        models += _global_models(c, paths, chosen, last, coordinator_state, test, val, len(points))
    smallest = min(len(p.labelled) for p in plan.nodes)
    notes = (
        "Every model is scored on the same held-out test set: slices of patients that no "
        "node ever had a label for (they reached the inboxes unlabelled, and were only "
        "predicted).",
        f"Slices reached the inboxes over {c.feed_seconds:g} s once every node served the "
        f"first global model; in each round a node trained on the labels it held then (at "
        f"least {labels_needed} of its {smallest}), "
        + (
            "so the rounds trained on the same labels as the local-only baselines"
            if labels_needed >= smallest
            else "so early rounds saw part of the data"
        )
        + ". The local-only baselines were trained afterwards, on every label of their "
        "hospital.",
        "Round 0 is the random initial global model; the dashed lines are each node's own "
        "evaluation of the global model it received, on its local validation patients, as "
        "reported to the coordinator over MQTT.",
    )
    config = {
        **{k: v for k, v in c.describe().items() if k not in ("live", "min_labels")},
        "data": plan.source,
        "labelled per node": {p.node: len(p.labelled) for p in plan.nodes},
        "labels needed to train": labels_needed,
        "broker": f"python -m fl_protocol.broker on 127.0.0.1:{broker_port} (no TLS)",
        "strategy": "fedavg (coordinator), update codec fp16, signed global manifests",
    }
    return ReportResults(
        title=TITLE,
        models=models,
        rounds=points,
        config=config,
        test_set=plan.test_summary(),
        init="random",
        notes=notes,
        extra_tables={LIVE_TABLE: live},
    )


def local_operating_point(weights: Path) -> dict[str, Any] | None:
    """The operating point ``fedscan node train`` fitted on the hospital's own validation
    patients (``result.json`` beside the weights), or None."""
    from edge_node.errors import TrainingError
    from edge_node.train.job import RESULT_FILE, TrainResult

    try:
        return TrainResult.load(weights.parent / RESULT_FILE).operating_point
    except TrainingError:
        return None


def validation_set(plan: DataPlan, cache: Path, *, texture: bool = False) -> Any:
    """Every hospital's local validation patients, split as its trainer splits them (salt =
    the federation id, the node's ``val_fraction``); None when there are none."""
    from edge_node.config import TrainingConfig
    from edge_node.train.split import VAL, side_of
    from fedscan.demo.setup import FEDERATION

    fraction = TrainingConfig().val_fraction
    rows = [
        r
        for p in plan.nodes
        for r in p.labelled
        if side_of(r.patient_key, salt=FEDERATION, val_fraction=fraction) == VAL
    ]
    if not rows or len({r.label for r in rows}) < 2:
        return None
    return ev.load_test_set(rows, plan.base, cache, texture=texture)


def select_version(val_accuracy: dict[int, float], versions: list[int]) -> int:
    """The global version (not v0) with the best accuracy on the hospitals' validation
    patients (ties: the later); the last version when there is no validation data."""
    candidates = [(acc, v) for v, acc in val_accuracy.items() if v in versions and v > 0]
    return max(candidates)[1] if candidates else max(versions)


def _global_models(
    c: DemoConfig,
    paths: dict[int, Path],
    chosen: int,
    last: int,
    coordinator_state: Path,
    test: Any,
    val: Any,
    n_points: int,
) -> list[ModelEval]:
    """The global model chosen on validation (and the last version when that differs). Its
    operating point: fitted from the nodes' calibration statistics of that version (their
    eval reports), or, for a version no node evaluated (the last one), from the same
    statistics computed here on the hospitals' validation patients."""
    from coordinator.calibration import CalibrationBook
    from fl_protocol.calibration import calibration_stats, fit_operating_point

    book = CalibrationBook(coordinator_state)
    out = []
    for version in sorted({chosen, last}):
        op = book.operating_point(version)
        source = "the nodes' eval reports"
        if op is None and val is not None:
            op = fit_operating_point(calibration_stats(ev.covid_logits(paths[version], val),
                                                       val.labels))  # fmt: skip
            source = "the hospitals' validation patients (computed by the demo)"
        op_dict = None if op is None else {**op.to_dict(), "source": source}
        m, roc, cal = ev.score_with_calibration(paths[version], test, op_dict)
        how = (
            "chosen on validation: the version with the best accuracy on the hospitals' local "
            "validation patients (the split each node trains with), never on the test set"
            if version == chosen
            else "the last version (shown for comparison; not chosen on validation)"
        )
        out.append(ModelEval(
            name=f"global v{version} (FedAvg)" + (", chosen" if version == chosen else ", last"),
            kind="global" if version == chosen else "other", metrics=m, roc=roc,
            calibration=cal,
            description=(
                f"{how}; {n_points - 1} round(s) of FedAvg over MQTT, every hospital training "
                f"{c.local_epochs} epoch(s) per round from the current global model"
            ),
        ))  # fmt: skip
    return out
