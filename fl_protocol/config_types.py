"""Type checks of TOML values against the annotations of the config dataclasses.

Both daemons load their TOML into frozen dataclasses (``edge_node.config``,
``coordinator.config``). Without a check, ``port = "eighty"`` reaches the code as a string and
fails far from the file, or not at all. ``type_problem`` reads the field's annotation as
written (``int``, ``float | None``, ``tuple[str, ...]``, ``Path | None``; the modules use
``from __future__ import annotations``, so these are strings) and says what the value must be.
Annotations it does not know (nested section dataclasses, ``Any``) are left to their loaders.

``read_toml`` and ``build_section`` are the loader both daemons share: read the file, apply the
CLI overrides, and turn each ``[section]`` table into its dataclass (unknown keys and wrong types
refused with the daemon's own ``ConfigError``); what a value becomes (a path resolved against the
file's folder, a nested table) is the daemon's ``convert``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
# (field name, annotation as written, TOML value) -> the value the dataclass gets
Convert = Callable[[str, str, Any], Any]

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


def read_toml(
    path: Path, overrides: dict[str, dict[str, Any]] | None, error: type[Exception]
) -> dict[str, Any]:
    """The TOML file as a dict, ``overrides`` (CLI flags; None values ignored) applied per
    section and key; a missing or invalid file raises ``error``."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise error(f"config file not found: {path}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return raw


def build_section(
    cls: type[T], raw: dict[str, Any], section: str, convert: Convert, error: type[Exception]
) -> T:
    """``cls(**raw)`` for the ``[section]`` table: unknown keys and values of the wrong type
    raise ``error`` naming the section and key; each value goes through ``convert`` first."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(known)
    if unknown:
        raise error(f"[{section}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        ftype = str(known[name].type)
        problem = type_problem(ftype, value)  # port = "eighty" -> "[api] port must be an integer"
        if problem is not None:
            raise error(f"[{section}] {name} {problem} (got {kind_of(value)})")
        kwargs[name] = convert(name, ftype, value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise error(f"[{section}]: {exc}") from exc


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(doc: Mapping[str, Any], _prefix: str = "") -> str:
    """A small TOML writer for config files: scalars and lists first, then (nested) tables;
    ``None`` values are left out (TOML has no null)."""
    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in doc.items()
        if v is not None and not isinstance(v, dict)
    ]
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{_prefix}{k}"
            lines += ["", f"[{name}]"]
            body = dump_toml(v, f"{name}.").strip("\n")
            if body:
                lines.append(body)
    return "\n".join(lines) + "\n"


def plain_fields(obj: Any) -> dict[str, Any]:
    """The fields of a dataclass instance as JSON-able values: paths as strings, tuples as
    lists, nested objects with a ``to_dict()`` as their dict (job files, experiment JSON)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif hasattr(v, "to_dict"):
            v = v.to_dict()
        out[f.name] = v
    return out
