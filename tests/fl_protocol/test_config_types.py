"""Config values of the wrong type are refused at load, naming the section and the key.

For every field of every section of node.toml and coordinator.toml whose annotation is a
scalar, a path or a list of scalars, a value of the wrong TOML type gives one ConfigError
"[section] key must be ..." (exit 2) instead of reaching the daemon.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from coordinator import config as coordinator_config
from edge_node import config as node_config
from edge_node.errors import ConfigError as NodeConfigError
from fl_protocol.config_types import type_problem

WRONG: dict[str, Any] = {
    "bool": "yes",
    "int": "eighty",
    "float": "fast",
    "str": 5,
    "Path": 5,
    "tuple[str, ...]": "CT",
}


def _wrong_value(annotation: str) -> Any | None:
    base = annotation.replace(" | None", "").strip()
    return WRONG.get(base)


def _cases(sections: dict[str, type]) -> list[tuple[str, str, str, Any]]:
    cases = []
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            bad = _wrong_value(str(f.type))
            if bad is not None:
                cases.append((section, f.name, str(f.type), bad))
    return cases


def test_every_checked_annotation_of_both_configs_is_understood() -> None:
    """The checker knows every scalar annotation the two config modules use (no silent pass)."""
    cases = _cases(node_config._SECTIONS) + _cases(coordinator_config._SECTIONS)
    assert len(cases) > 60
    for section, name, annotation, bad in cases:
        assert type_problem(annotation, bad) is not None, (section, name, annotation)
    assert type_problem("int", True) == "must be an integer"  # TOML true is not 1
    assert type_problem("float", 3) is None and type_problem("float | None", None) is None
    assert type_problem("tuple[str, ...]", ["CT", 5]) == "must be a list of strings"


@pytest.mark.parametrize(
    ("section", "name", "bad"),
    [(s, n, b) for s, n, _a, b in _cases(node_config._SECTIONS)],
    ids=lambda v: str(v),
)
def test_node_toml_types_are_checked(tmp_path: Path, section: str, name: str, bad: Any) -> None:
    """node.toml from `fedscan node init` with one value of the wrong type: one clear error."""
    raw = tomllib.loads(node_config.default_toml("n1"))
    raw.setdefault(section, {})[name] = bad
    with pytest.raises(NodeConfigError, match=rf"^\[{section}\] {name} must be "):
        node_config.config_from_dict(raw, tmp_path)


@pytest.mark.parametrize(
    ("section", "name", "bad"),
    [(s, n, b) for s, n, _a, b in _cases(coordinator_config._SECTIONS)],
    ids=lambda v: str(v),
)
def test_coordinator_toml_types_are_checked(
    tmp_path: Path, section: str, name: str, bad: Any
) -> None:
    """coordinator.toml defaults with one value of the wrong type: one clear error."""
    from coordinator.errors import ConfigError

    raw = tomllib.loads(coordinator_config.default_toml())
    raw.setdefault(section, {})[name] = bad
    with pytest.raises(ConfigError, match=rf"^\[{section}\] {name} must be "):
        coordinator_config.config_from_dict(raw, tmp_path)


def test_the_issue_example_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`port = "eighty"` in node.toml: `fedscan node run` exits 2 with that one line."""
    from edge_node.cli.daemon import init_node
    from fedscan.cli import main

    toml = init_node(tmp_path / "n")
    toml.write_text(toml.read_text().replace("port = 8765", 'port = "eighty"'))
    assert main(["node", "run", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedscan: error: [api] port must be an integer (got a string)"
    coordinator = tmp_path / "coordinator.toml"
    coordinator.write_text(coordinator_config.default_toml() + "\n")
    raw = coordinator.read_text().replace('federation = "demo"', "federation = 7", 1)
    coordinator.write_text(raw)
    assert main(["coordinator", "status", "--config", str(coordinator)]) == 2
    assert "federation must be a string" in capsys.readouterr().err
