"""`fedscan bench federation --json OUT.json`: what federating costs, measured in one run.

1. ``bytes``: bytes one node publishes per round (manifest + every chunk) for each codec
   (fp32, fp16, int8, int8_channel, and each restricted to the ``head`` mode's trainable
   tensors) on resnet18 and efficientnet_b0, with real deltas (``wire_bytes``).
2. ``accuracy``: one FedAvg step of three hospitals, the same updates aggregated through each
   codec; test accuracy vs the fp32 aggregate (``accuracy``; UCSD when present).
3. ``aggregation``: time and peak memory of the coordinator's aggregation step for 10, 50 and
   100 resnet18-sized updates (``aggregate``, one fresh process per run).
4. ``round``: protocol overhead of a 3-node round of real daemons through real Mosquitto,
   round wall time minus the slowest node's training time (``rounds``).
5. ``swarm``: one round completed by 100 simulated nodes (real federation clients, one MQTT
   connection each) against the real coordinator on Mosquitto (``swarm``).

Weights start from random init (no internet here: ``"init": "random"``). The machine may be
shared: the load average at start and end is recorded. Parts that cannot run (no Mosquitto)
are skipped with the reason in ``skipped``; a part that fails is reported in ``errors`` (exit
code 1) and the others still run. ``--quick`` shrinks every size for the smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedscan.bench.federation.common import REPO_ROOT, PartSkipped, loadavg, machine
from fedscan.errors import BenchError

PARTS = ("bytes", "accuracy", "aggregation", "round", "swarm")
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "covid-ct-ucsd"

# full run / --quick; flags given on the command line win over both
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "bytes_archs": ["resnet18", "efficientnet_b0"],
        "bytes_slices": 12,
        "accuracy_archs": ["cnn2d", "resnet18"],
        "accuracy_limit": None,
        "local_epochs": {"cnn2d": 2, "resnet18": 1, "efficientnet_b0": 1},
        "aggregation_arch": "resnet18",
        "aggregation_nodes": [10, 50, 100],
        "aggregation_extra_codecs": ["fp32", "int8"],
        "round_nodes": 3,
        "round_rounds": 2,
        "round_slices": 12,
        "swarm_nodes": 100,
    },
    "quick": {
        "bytes_archs": ["cnn2d"],
        "bytes_slices": 4,
        "accuracy_archs": ["cnn2d"],
        "accuracy_limit": 8,
        "local_epochs": {"cnn2d": 1},
        "aggregation_arch": "cnn2d",
        "aggregation_nodes": [2, 3],
        "aggregation_extra_codecs": [],
        "round_nodes": 2,
        "round_rounds": 1,
        "round_slices": 8,
        "swarm_nodes": 4,
    },
}

TARGETS = {
    "bytes_ratio_fp32_over_int8": (">=", 3.5, "int8 >= 3.5x fewer bytes than fp32"),
    "accuracy_abs_diff_points_int8": ("<=", 0.5, "int8 FedAvg accuracy within 0.5 points"),
    "aggregation_peak_ratio_100_nodes": ("<", 3.0, "aggregation peak < 3x one model (100)"),
    "protocol_overhead_s": ("<", 5.0, "protocol overhead < 5 s per round on loopback"),
    "nodes_completed_100": (">=", 100, "100 simulated nodes counted in the new version"),
}

MEANING = {
    "init": "every model starts from random weights (no pretrained download here)",
    "bytes_per_round_<codec>": "bytes one node publishes for its update in one round: the "
    "signed UpdateManifest JSON + every chunk payload (1 MiB chunks), resnet18, all tensors; "
    "`bytes.<arch>.codecs.<variant>.mqtt_bytes` adds MQTT PUBLISH framing and topics",
    "bytes_per_round_<codec>_head": "same, only the tensors `head` mode trains (trainable-only)",
    "bytes_ratio_fp32_over_<codec>": "bytes_per_round_fp32 / bytes_per_round_<codec>",
    "accuracy_diff_points_<codec>[_<arch>]": "test accuracy (percentage points) of one FedAvg "
    "step aggregated from the <codec>-encoded updates minus the same step from fp32 updates "
    "(same three hospital deltas); without _<arch>: the first architecture (accuracy_arch)",
    "accuracy_abs_diff_points_int8": "the largest |int8 - fp32| difference over the archs",
    "aggregation_peak_mb_<N>_nodes": "tracemalloc peak (MB) of the coordinator's whole "
    "aggregation step (aggregate_round: load global checkpoint, decode + fold N updates one at "
    "a time, write the new checkpoint) in a fresh process; fp16 updates (coordinator default)",
    "aggregation_peak_ratio_<N>_nodes": "that peak / the fp32 size of one model",
    "aggregation_streaming_peak_ratio_<N>_nodes": "what the streaming fold adds on top of the "
    "resident global model, / one model",
    "aggregation_seconds_<N>_nodes": "wall time of that step (without tracemalloc)",
    "protocol_overhead_s": "steady-state (last) round of 3 real node daemons + real "
    "coordinator over Mosquitto: coordinator closed_at - opened_at minus the slowest node's "
    "train_once seconds (result.json); round.rounds[i].critical_path breaks it down",
    "protocol_overhead_first_round_s": "the same for round 1 (cold: first fetch and export)",
    "nodes_completed_<N>": "simulated nodes whose update was accepted and counted in the new "
    "global version (coordinator SQLite counted_in_aggregate)",
    "swarm_round_wall_s": "that round's closed_at - opened_at",
    "loadavg_start / loadavg_end": "1/5/15-min load average: the 2-core machine is shared",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", required=True, help="write all figures here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="UCSD COVID-CT folder")
    p.add_argument("--mosquitto", help="mosquitto binary (default: PATH, /usr/sbin)")
    p.add_argument("--work-dir", type=Path, help="keep logs and states here (default: temp)")
    p.add_argument("--bytes-archs", nargs="+", help="archs for part 1")
    p.add_argument("--accuracy-archs", nargs="+", help="part 2 (default cnn2d resnet18)")
    p.add_argument(
        "--local-epochs", type=int, help="part 2: epochs per hospital (default cnn2d 2, else 1)"
    )
    p.add_argument("--aggregation-nodes", nargs="+", type=int, help="part 3: update counts")
    p.add_argument(
        "--round-node-process",
        choices=("client", "daemon"),
        default="client",
        help="part 4: node = federation client process (default) or `fedscan node run`",
    )
    p.add_argument("--swarm-nodes", type=int, help="part 5: simulated nodes (default 100)")
    p.add_argument("--swarm-chunk-kib", type=int, default=32, help="part 5: chunk size")
    p.add_argument("--timeout", type=float, default=300.0, help="round deadline / wait (s)")


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    sizes = dict(SIZES["quick" if args.quick else "full"])
    for key in ("bytes_archs", "accuracy_archs", "aggregation_nodes"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.local_epochs is not None:
        sizes["local_epochs"] = dict.fromkeys(sizes["accuracy_archs"], args.local_epochs)
    if args.swarm_nodes is not None:
        sizes["swarm_nodes"] = args.swarm_nodes
    return sizes


# -- the parts -----------------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace, work: Path, sizes: dict[str, Any]) -> None:
        self.args, self.work, self.sizes = args, work, sizes
        self.deltas: dict[str, Any] = {}  # arch -> (global weights, delta) from part 1

    def delta(self, arch: str) -> Any:
        if arch not in self.deltas:
            from fedscan.bench.federation.wire_bytes import ct_slices, realistic_delta

            images, _src = ct_slices(self.sizes["bytes_slices"], self.work)
            base, delta, _facts = realistic_delta(arch, images, batch=4)
            self.deltas[arch] = (base, delta)
        return self.deltas[arch]


def part_bytes(ctx: Context, out: dict[str, Any]) -> None:
    from fedscan.bench.federation.wire_bytes import ct_slices, measure_bytes

    images, source = ct_slices(ctx.sizes["bytes_slices"], ctx.work)
    tables = measure_bytes(ctx.sizes["bytes_archs"], images, batch=4, keep=ctx.deltas)
    out["bytes"] = {"slices": source, "train_batch": 4, "per_model": tables}
    arch = "resnet18" if "resnet18" in tables else next(iter(tables))
    rows = tables[arch]["codecs"]
    out["bytes_arch"] = arch
    for variant, row in rows.items():
        out[f"bytes_per_round_{variant}"] = row["bytes"]
        out[f"bytes_ratio_fp32_over_{variant}"] = row["fp32_over_this"]


def part_accuracy(ctx: Context, out: dict[str, Any]) -> None:
    from fedscan.bench.federation.accuracy import codec_accuracy, load_sets

    sets, source = load_sets(ctx.args.dataset, ctx.work, ctx.sizes["accuracy_limit"])
    print(f"  data: {source}; " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), flush=True)
    epochs = ctx.sizes["local_epochs"]
    results = {
        arch: codec_accuracy(arch, sets, epochs=epochs.get(arch, 1), batch=16)
        for arch in ctx.sizes["accuracy_archs"]
    }
    out["accuracy"] = {"data": source, "per_model": results}
    out["accuracy_arch"] = next(iter(results))
    for arch, res in results.items():
        for codec, row in res["codecs"].items():
            out[f"accuracy_{codec}_{arch}"] = row["accuracy"]
            out[f"accuracy_diff_points_{codec}_{arch}"] = row["accuracy_diff_points_vs_fp32"]
            if arch == out["accuracy_arch"]:
                out[f"accuracy_{codec}"] = row["accuracy"]
                out[f"accuracy_diff_points_{codec}"] = row["accuracy_diff_points_vs_fp32"]
    out["accuracy_abs_diff_points_int8"] = max(
        abs(res["codecs"]["int8"]["accuracy_diff_points_vs_fp32"]) for res in results.values()
    )


def part_aggregation(ctx: Context, out: dict[str, Any]) -> None:
    from fedscan.bench.federation.aggregate import measure_aggregation

    arch = ctx.sizes["aggregation_arch"]
    base, template = ctx.delta(arch)
    result = measure_aggregation(
        ctx.work,
        arch,
        base,
        template,
        node_counts=ctx.sizes["aggregation_nodes"],
        codec="fp16",
        extra_codecs=ctx.sizes["aggregation_extra_codecs"],
        distinct=4,
    )
    out["aggregation"] = result
    for n in ctx.sizes["aggregation_nodes"]:
        row = result["runs"][f"fp16_{n}"]
        out[f"aggregation_peak_mb_{n}_nodes"] = row["peak_traced_mb"]
        out[f"aggregation_peak_ratio_{n}_nodes"] = row["peak_traced_ratio"]
        out[f"aggregation_streaming_peak_ratio_{n}_nodes"] = row["streaming_peak_ratio"]
        out[f"aggregation_rss_peak_mb_{n}_nodes"] = row["rss_peak_above_start_mb"]
        out[f"aggregation_seconds_{n}_nodes"] = row["seconds"]


def part_round(ctx: Context, out: dict[str, Any]) -> None:
    from fedscan.bench.federation.rounds import protocol_round

    result = protocol_round(
        ctx.work / "round",
        ctx.args.mosquitto,
        n_nodes=ctx.sizes["round_nodes"],
        rounds=ctx.sizes["round_rounds"],
        slices_per_node=ctx.sizes["round_slices"],
        timeout_s=ctx.args.timeout,
        node_process=ctx.args.round_node_process,
    )
    out["round"] = result
    for key in ("protocol_overhead_s", "protocol_overhead_first_round_s", "round_wall_s"):
        out[key] = result[key]
    out["round_slowest_training_s"] = result["slowest_training_s"]


def part_swarm(ctx: Context, out: dict[str, Any]) -> None:
    from fedscan.bench.federation.swarm import swarm_round

    n = ctx.sizes["swarm_nodes"]
    result = swarm_round(
        ctx.work / "swarm",
        ctx.args.mosquitto,
        n_nodes=n,
        chunk_kib=ctx.args.swarm_chunk_kib,
        timeout_s=ctx.args.timeout,
    )
    out["swarm"] = result
    out[f"nodes_completed_{n}"] = result["nodes_completed"]
    out["swarm_round_wall_s"] = result["round_wall_s"]
    print(
        f"  {result['nodes_completed']}/{n} simulated nodes counted in v{result['version_out']}, "
        f"round {result['round_wall_s']:.1f} s",
        flush=True,
    )


RUNNERS: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "bytes": part_bytes,
    "accuracy": part_accuracy,
    "aggregation": part_aggregation,
    "round": part_round,
    "swarm": part_swarm,
}
TITLES = {
    "bytes": "bytes per node per round, per codec",
    "accuracy": "one FedAvg step through each codec",
    "aggregation": "aggregation time and peak memory",
    "round": "protocol overhead of a real round over Mosquitto",
    "swarm": "one round with many simulated nodes over Mosquitto",
}


# -- report --------------------------------------------------------------------------------------


def targets(out: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, (op, value, text) in TARGETS.items():
        measured = out.get(key)
        met = None
        if measured is not None:
            met = {
                ">=": measured >= value,
                "<=": measured <= value,
                "<": measured < value,
            }[op]
        result[key] = {"target": f"{op} {value}", "what": text, "measured": measured, "met": met}
    return result


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _met(out: dict[str, Any], key: str) -> str:
    t = out.get("targets", {}).get(key)
    if not t or t["met"] is None:
        return ""
    return "yes" if t["met"] else "**no**"


def markdown(out: dict[str, Any]) -> str:
    """README tables (markdown) from the result document."""
    lines: list[str] = []
    if "bytes" in out:
        lines += [
            "| bytes / node / round | " + " | ".join(out["bytes"]["per_model"]) + " |",
            "| --- |" + " --- |" * len(out["bytes"]["per_model"]),
        ]
        variants = next(iter(out["bytes"]["per_model"].values()))["codecs"]
        for v in variants:
            cells = []
            for table in out["bytes"]["per_model"].values():
                row = table["codecs"][v]
                ratio = row["fp32_over_this"]
                ratio_text = f"x{ratio:.2f}" if ratio < 100 else f"1/{ratio:,.0f} of fp32"
                cells.append(f"{_mb(row['bytes'])} ({ratio_text})")
            name = v.replace("_head", " (head only)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    summary = ["| measure | measured | target | met |", "| --- | --- | --- | --- |"]
    if "bytes" in out:
        arch = out["bytes_arch"]
        summary.append(
            f"| {arch} update, int8 vs fp32 | {_mb(out['bytes_per_round_int8'])} vs "
            f"{_mb(out['bytes_per_round_fp32'])} (x{out['bytes_ratio_fp32_over_int8']:.2f}) | "
            f">= 3.5x fewer | {_met(out, 'bytes_ratio_fp32_over_int8')} |"
        )
    if "accuracy" in out:
        for arch, res in out["accuracy"]["per_model"].items():
            accs = ", ".join(
                f"{c} {100 * r['accuracy']:.1f}% ({r['accuracy_diff_points_vs_fp32']:+.2f})"
                for c, r in res["codecs"].items()
            )
            int8 = res["codecs"]["int8"]
            met = "yes" if abs(int8["accuracy_diff_points_vs_fp32"]) <= 0.5 else "**no**"
            ref = res["codecs"]["fp32"]
            (tn, fp), (fn, tp) = ref["confusion"]
            aucs = f"; AUC fp32 {ref['auc']:.4f}, int8 {int8['auc']:.4f}" if ref["auc"] else ""
            blind = (
                "; one class predicted: accuracy cannot tell codecs apart"
                if not ((tp + fp) and (tn + fn))
                else ""
            )
            summary.append(
                f"| FedAvg step, {arch}, 3 hospitals, test n={res['n_test']} | {accs}{aucs}"
                f"{blind} | int8 within 0.5 points | {met} |"
            )
    if "aggregation" in out:
        agg = out["aggregation"]
        for key, row in agg["runs"].items():
            is_target = key == "fp16_100"
            summary.append(
                f"| aggregation, {row['nodes']} x {agg['arch']} ({row['codec']}) | "
                f"{row['seconds']:.1f} s, peak {row['peak_traced_mb']:.0f} MB = "
                f"{row['peak_traced_ratio']:.2f} x model (streaming +"
                f"{row['streaming_peak_ratio']:.2f} x) | "
                f"{'< 3x one model' if is_target else ''} | "
                f"{_met(out, 'aggregation_peak_ratio_100_nodes') if is_target else ''} |"
            )
    if "round" in out:
        who = "daemons" if out["round"]["node_process"] == "daemon" else "node processes"
        for r in out["round"]["rounds"]:
            steady = r["round"] == out["round"]["protocol_overhead_round"]
            summary.append(
                f"| {out['round']['nodes']}-node round {r['round']} ({who}, Mosquitto) | "
                f"overhead {r['overhead_s']:.1f} s = wall {r['wall_s']:.1f} s - slowest "
                f"training {r['slowest_training_s']:.1f} s | "
                f"{'< 5 s' if steady else ''} | "
                f"{_met(out, 'protocol_overhead_s') if steady else ''} |"
            )
    if "swarm" in out:
        s = out["swarm"]
        summary.append(
            f"| {s['nodes']} simulated nodes, one round (Mosquitto) | {s['nodes_completed']} "
            f"counted, round {s['round_wall_s']:.1f} s | all counted | "
            f"{_met(out, 'nodes_completed_100')} |"
        )
    load = out.get("loadavg_start"), out.get("loadavg_end")
    tail = [
        "",
        f"Random init; {out['machine'].get('cores')} cores, load average {load[0]} at start, "
        f"{load[1]} at end.",
    ]
    return "\n".join(lines + summary + tail)


def run(args: argparse.Namespace) -> int:
    try:
        import export.zoo  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"the export package (torch, timm) is needed: {exc}") from exc
    import torch

    torch.set_num_threads(args.threads)
    sizes = _sizes(args)
    out: dict[str, Any] = {
        "schema": "fedscan.bench_federation/1",
        "init": "random",
        "quick": bool(args.quick),
        "threads": args.threads,
        "sizes": sizes,
        "machine": machine(),
        "loadavg_start": loadavg(),
        "meaning": MEANING,
        "skipped": {},
        "errors": {},
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedscan-bench-fed-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args, work, sizes)
        for part in PARTS:
            if part not in args.parts:
                continue
            print(f"{part}: {TITLES[part]}", flush=True)
            t0 = time.perf_counter()
            try:
                RUNNERS[part](ctx, out)
            except PartSkipped as exc:
                out["skipped"][part] = str(exc)
                print(f"  skipped: {exc}", flush=True)
            except Exception as exc:  # one part failing must not lose the others' figures
                out["errors"][part] = f"{type(exc).__name__}: {exc}"[:4000]
                print(f"  FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                traceback.print_exc()
            out.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
    out["seconds"] = time.perf_counter() - t_start
    out["loadavg_end"] = loadavg()
    out["targets"] = targets(out)
    out["summary_markdown"] = markdown(out)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(out["summary_markdown"])
    print(f"wrote {path}")
    return 1 if out["errors"] else 0
