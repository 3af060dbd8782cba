"""Benchmark figures judged against their targets and written as JSON (fedscan.bench.results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedscan.bench.results import judge, write_result


def test_ceilings_and_floors_and_unmeasured_figures() -> None:
    """A latency is met at or under its ceiling (strictly under with strict), a throughput at
    or over its floor, and a figure not measured is neither met nor missed."""
    result = {"p95_ms": 50.0, "rate": 39.9, "skipped_s": None}
    targets = {"p95_ms": 50.0, "rate": 40.0, "skipped_s": 2.0}
    got = judge(result, targets, is_ceiling=lambda k: k.endswith(("_ms", "_s")))
    assert {k: v["met"] for k, v in got.items()} == {
        "p95_ms": True,
        "rate": False,
        "skipped_s": None,
    }
    strict = judge(result, targets, is_ceiling=lambda k: k.endswith("_ms"), strict=True)
    assert strict["p95_ms"] == {"target": 50.0, "measured": 50.0, "met": False}


def test_write_result_to_a_file_or_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a path the JSON goes to the file and one line says so; without, to stdout."""
    out = tmp_path / "r.json"
    assert write_result({"a": 1}, out) == 0
    assert json.loads(out.read_text()) == {"a": 1} and f"wrote {out}" in capsys.readouterr().out
    write_result({"b": 2}, None)
    assert json.loads(capsys.readouterr().out) == {"b": 2}
