"""Type checks of TOML values against the annotations of the config dataclasses.

Both daemons load their TOML into frozen dataclasses (``edge_node.config``,
``coordinator.config``). Without a check, ``port = "eighty"`` reaches the code as a string and
fails far from the file, or not at all. ``type_problem`` reads the field's annotation as
written (``int``, ``float | None``, ``tuple[str, ...]``, ``Path | None``; the modules use
``from __future__ import annotations``, so these are strings) and says what the value must be.
Annotations it does not know (nested section dataclasses, ``Any``) are left to their loaders.
"""

from __future__ import annotations

import os
from typing import Any

_SCALARS: dict[str, tuple[str, str]] = {
    # annotation -> (what it must be, plural for lists)
    "bool": ("true or false", "booleans"),
    "int": ("an integer", "integers"),
    "float": ("a number", "numbers"),
    "str": ("a string", "strings"),
    "Path": ("a path (a string)", "paths"),
}


def _fits_scalar(name: str, value: Any) -> bool:
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "str":
        return isinstance(value, str)
    return isinstance(value, str | os.PathLike)  # Path


def _item_type(option: str) -> str | None:
    """``tuple[str, ...]`` / ``list[str]`` -> ``str``; None for anything else."""
    for prefix in ("tuple[", "list["):
        if option.startswith(prefix) and option.endswith("]"):
            inner = option[len(prefix) : -1].split(",")[0].strip()
            return inner if inner in _SCALARS else None
    return None


def type_problem(annotation: str, value: Any) -> str | None:
    """None when ``value`` fits ``annotation``, else ``"must be ..."`` for the error message."""
    options = [part.strip() for part in str(annotation).split("|")]
    if value is None:
        return None if "None" in options else "must be set"
    wanted: list[str] = []
    for option in options:
        if option == "None":
            continue
        if option in _SCALARS:
            if _fits_scalar(option, value):
                return None
            wanted.append(_SCALARS[option][0])
            continue
        item = _item_type(option)
        if item is None:
            return None  # not ours to check (a nested table, Any, ...)
        if isinstance(value, list | tuple) and all(_fits_scalar(item, v) for v in value):
            return None
        wanted.append(f"a list of {_SCALARS[item][1]}")
    return "must be " + " or ".join(wanted) if wanted else None


def kind_of(value: Any) -> str:
    """What a TOML value is, for messages (never the value: it may be a secret)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__
