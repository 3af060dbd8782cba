"""The `fedscan` console script: one parser, subcommands delegated to their owning packages.

Each command module exposes ``add_parser(subparsers)`` and sets ``func`` on its parser; the
function returns an exit code. Command modules are imported lazily so that `fedscan node run`
and `fedscan predict` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fedscan.errors import MissingExtraError

# subcommand -> module that registers it (module import must be light: no torch at top level)
COMMANDS: dict[str, str] = {
    "node": "edge_node.cli",
    "predict": "edge_node.cli.predict",
    "export": "fedscan.export_cmd",
    "coordinator": "coordinator.cli",
    "dataset": "fedscan.dataset_cmd",
    "bench": "fedscan.bench.cli",
    "demo": "fedscan.demo.cli",
    "experiment": "fedscan.experiment.cli",
    "pretrain": "fedscan.pretrain.cli",
    "provision": "fedscan.provision.cli",
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# What the `train` extra installs (pyproject [project.optional-dependencies] train), by import
# name; and the commands that cannot run without it (checked before they start anything).
TRAIN_EXTRA_MODULES = frozenset(
    {"torch", "torchvision", "timm", "onnx", "onnxscript", "matplotlib", "dp_accounting"}
)
TRAIN_COMMANDS: frozenset[tuple[str, ...]] = frozenset(
    {
        ("export",),
        ("coordinator", "run"),
        ("demo",),
        ("node", "train"),
        ("experiment",),
        ("pretrain",),
        ("bench", "inference"),
        ("bench", "train"),
        ("bench", "federation"),
        ("bench", "dp"),
    }
)
# sub-command attribute of each command group's namespace
_GROUP_DEST = {
    "node": "node_command",
    "coordinator": "coordinator_command",
    "bench": "bench_command",
    "dataset": "dataset_command",
    "provision": "provision_command",
}


def version() -> str:
    try:
        return importlib.metadata.version("fedscan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _command_path(args: argparse.Namespace) -> tuple[str, ...]:
    command = getattr(args, "command", None)
    if command is None:
        return ()
    sub = getattr(args, _GROUP_DEST.get(command, ""), None)
    return (command, sub) if sub else (command,)


def _missing_train_module() -> str | None:
    """The first module of the train extra that cannot be found (None: the extra is there)."""
    for name in ("torch", "torchvision", "timm", "onnx"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _missing_extra(command: tuple[str, ...], module: str) -> MissingExtraError:
    return MissingExtraError(
        f"`fedscan {' '.join(command)}` needs the 'train' extra ({module} is not installed): "
        "install fedscan with the train extra (from the repository: uv sync --extra train, or "
        f"pip install '.[train]'); exit {MissingExtraError.exit_code}"
    )


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
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=_log_level,
        metavar="LEVEL",
        help=f"log level: {', '.join(LOG_LEVELS)} (default INFO)",
    )
    parser.add_argument(
        "--version", action="version", version=f"fedscan {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only a missing train extra is expected; a mistyped or missing module of ours is a
            # broken build and fails here, loudly.
            if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
                raise
            _needs_train_parser(sub, name)
            continue
        mod.add_parser(sub)
    return parser


def _needs_train_parser(sub: Any, name: str) -> None:
    """A command whose module needs the train extra: it parses anything and says so."""
    p = sub.add_parser(name, help="(needs the 'train' extra)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command")
    module = _missing_train_module() or "torch"

    def run(_args: argparse.Namespace) -> int:
        raise _missing_extra((name,), module)

    p.set_defaults(func=run)


def command_lines(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """``fedscan <command> [<subcommand>]  <help>`` for every command: README's CLI block."""
    rows: list[tuple[str, str]] = []

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                rows.append((f"{prefix} {name}", str(helps.get(name, ""))))
                walk(sub, f"{prefix} {name}")

    walk(parser or build_parser(), "fedscan")
    width = max(len(cmd) for cmd, _ in rows) + 2
    return [f"{cmd:<{width}}{text}".rstrip() for cmd, text in rows]


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
    command = _command_path(args)
    try:
        if command in TRAIN_COMMANDS:
            missing = _missing_train_module()
            if missing is not None:  # before anything starts (the demo spawns processes)
                raise _missing_extra(command, missing)
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        err = _missing_extra(command, exc.name or "torch")
        print(f"fedscan: error: {err}", file=sys.stderr)
        return err.exit_code
    except errors as exc:
        print(f"fedscan: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())
