"""Evaluation report: ``write_report(out_dir, results) -> Path`` of ``index.html``.

The folder gets ``index.html`` (self-contained: inline CSS, PNGs referenced relatively),
``results.json`` (the input, re-loadable with ``ReportResults.from_dict``),
``accuracy_per_round.png``, ``roc.png``, ``reliability.png`` (when the models carry
calibration figures) and ``confusion_<i>.png`` per model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fedscan.report.results import ModelEval, ReportResults, RoundPoint
from fedscan.report.table import markdown_table, text_table

__all__ = [
    "ModelEval",
    "ReportResults",
    "RoundPoint",
    "markdown_table",
    "text_table",
    "write_report",
]


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(out_dir: str | Path, results: ReportResults) -> Path:
    """Render ``results`` into ``out_dir`` (created); returns the path of ``index.html``."""
    from fedscan.report import charts  # matplotlib only when a report is written
    from fedscan.report.page import render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("confusion_*.png"):
        old.unlink()  # a previous report with more models must not leave strays
    accuracy = None
    if results.rounds:
        accuracy = charts.accuracy_per_round(results.rounds, out / "accuracy_per_round.png").name
    roc = None
    if any(m.roc is not None for m in results.models):
        roc = charts.roc_curves(results.models, out / "roc.png").name
    reliability = None
    if any((m.calibration or {}).get("reliability") for m in results.models):
        reliability = charts.reliability_curves(results.models, out / "reliability.png").name
    confusions = [
        (charts.confusion_matrix(m, out / f"confusion_{i}.png").name, m.name)
        for i, m in enumerate(results.models)
    ]
    _write_text(out / "results.json", json.dumps(results.to_dict(), indent=1) + "\n")
    page = render(
        results,
        accuracy_png=accuracy,
        roc_png=roc,
        confusion_pngs=confusions,
        reliability_png=reliability,
    )
    index = out / "index.html"
    _write_text(index, page)
    return index
