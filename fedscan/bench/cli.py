"""`fedscan bench inference|train|federation`: each subcommand lives in its own module.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args)``; the modules are
imported when the parser is built (their top level is light). One whose optional extra is
missing still gets a subcommand that says so; a module of ours that cannot be found is an error.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from fedscan.errors import BenchError

BENCHMARKS: dict[str, tuple[str, str]] = {
    "inference": ("fedscan.bench.inference", "onnxruntime vs torch, file-to-prediction latency"),
    "train": ("fedscan.bench.train", "local training speed on real slices"),
    "federation": ("fedscan.bench.federation.command", "rounds over a real broker"),
    "dp": ("fedscan.bench.dp", "accuracy cost of differential privacy on updates (UCSD)"),
    "series-rule": ("fedscan.bench.series_rule", "series verdict rules judged per patient (UCSD)"),
    "dicom": ("fedscan.bench.dicom", "C-STORE receive vs DCMTK storescp, series to SR at a PACS"),
}


def _unavailable(name: str, why: str) -> Any:
    def run(_args: argparse.Namespace) -> int:
        raise BenchError(f"fedscan bench {name} is not available: {why}")

    return run


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("bench", help="benchmarks (JSON output)")
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] in {"fedscan", "edge_node", "coordinator", "export"}:
                raise  # a mistyped module path or a broken build, not a missing extra
            why = f"missing dependency {exc.name} (install fedscan[train])"
            p.set_defaults(func=_unavailable(name, why))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
