"""What every benchmark does with its figures: judge them against the targets, write the JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def judge(
    result: Mapping[str, Any],
    targets: Mapping[str, float],
    *,
    is_ceiling: Callable[[str], bool],
    strict: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{key: {target, measured, met}}``; a ceiling key is met below its target (``strict``:
    strictly below), any other key at or above it; ``met`` is None when nothing was measured."""

    def met(key: str, target: float) -> bool | None:
        value = result.get(key)
        if value is None:
            return None
        if is_ceiling(key):
            return bool(value < target) if strict else bool(value <= target)
        return bool(value >= target)

    return {
        k: {"target": v, "measured": result.get(k), "met": met(k, v)} for k, v in targets.items()
    }


def write_result(result: Mapping[str, Any], out: str | Path | None) -> int:
    """The figures as JSON: into ``out`` (saying so) or on stdout. Returns the exit code 0."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
    return 0
