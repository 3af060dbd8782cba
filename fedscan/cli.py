"""The `fedscan` console script: one parser, subcommands delegated to their owning packages.

Each command module exposes ``add_parser(subparsers)`` and sets ``func`` on its parser; the
function returns an exit code. Command modules are imported lazily so that `fedscan node run`
and `fedscan predict` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> module that registers it (module import must be light: no torch at top level)
COMMANDS: dict[str, str] = {
    "node": "edge_node.cli",
    "predict": "edge_node.cli_predict",
    "export": "fedscan.export_cmd",
    "coordinator": "coordinator.cli",
    "dataset": "fedscan.dataset_cmd",
    "bench": "fedscan.bench.cli",
    "demo": "fedscan.demo.cli",
    "experiment": "fedscan.experiment.cli",
    "provision": "fedscan.provision.cli",
}


def _error_types() -> tuple[type[BaseException], ...]:
    """Every package's base error; each carries an ``exit_code``."""
    types: list[type[BaseException]] = []
    for mod, name in (
        ("fedscan.errors", "FedscanError"),
        ("edge_node.errors", "NodeError"),
        ("coordinator.errors", "CoordinatorError"),
        ("export.errors", "ExportError"),
        ("fl_protocol.errors", "ProtocolError"),
    ):
        try:
            types.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedscan",
        description="Federated COVID / non-COVID CT classification (edge nodes + coordinator).",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # command not built yet / optional extra missing
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    errors = _error_types()
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except errors as exc:
        print(f"fedscan: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())
