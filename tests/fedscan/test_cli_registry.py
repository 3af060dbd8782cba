"""The command tables (`fedscan`, `fedscan node`, `fedscan bench`): every module they name exists
and registers the same way, and a mistyped module path breaks the parser loudly instead of
silently dropping the command."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

import edge_node.cli
import fedscan.bench.cli
import fedscan.cli
from fedscan.cli import build_parser


def test_every_command_module_exists_and_has_add_parser() -> None:
    """`fedscan` commands and `fedscan node` groups expose add_parser(sub); benchmarks expose
    add_arguments(parser) and run(args)."""
    groups = [*fedscan.cli.COMMANDS.values(), *edge_node.cli.SUBCOMMANDS]
    for module in groups:
        assert importlib.util.find_spec(module) is not None, module
    for module in edge_node.cli.SUBCOMMANDS:
        assert callable(importlib.import_module(module).add_parser), module
    for module, _help in fedscan.bench.cli.BENCHMARKS.values():
        assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize(
    ("table", "patch"),
    [
        ("fedscan", lambda m: m.setitem(fedscan.cli.COMMANDS, "nodd", "edge_node.clii")),
        (
            "node",
            lambda m: m.setattr(
                edge_node.cli, "SUBCOMMANDS", (*edge_node.cli.SUBCOMMANDS, "edge_node.cli.labls")
            ),
        ),
        (
            "bench",
            lambda m: m.setitem(
                fedscan.bench.cli.BENCHMARKS, "inferenc", ("fedscan.bench.inferenc", "typo")
            ),
        ),
    ],
)
def test_a_mistyped_module_path_fails_loudly(table: str, patch: object, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A typo in a command table raises ModuleNotFoundError when the parser is built (it used
    to be shown as a command "not built yet", or dropped)."""
    patch(monkeypatch)  # type: ignore[operator]
    with pytest.raises(ModuleNotFoundError):
        build_parser()
