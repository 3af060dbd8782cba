"""`fedscan node ...`: subcommands registered by the modules that own them.

Each module in ``SUBCOMMANDS`` exposes ``add_parser(sub)``, like every command module of
``fedscan.cli``; imports stay light (no torch). A module that cannot be imported is an error.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

SUBCOMMANDS: tuple[str, ...] = (
    "edge_node.cli.daemon",  # init, run
    "edge_node.cli.labels",  # label
    "edge_node.cli.train",  # train
    "edge_node.cli.audit",  # audit
    "edge_node.cli.global_model",  # sync, rollback
)


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("node", help="edge node daemon and tools")
    node_sub = parser.add_subparsers(dest="node_command", metavar="NODE_COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(node_sub)

    def _help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)
