"""The report's ``index.html``: one self-contained page (inline CSS, PNGs referenced relatively,
no script, nothing fetched from the network), readable offline and printable."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fedscan.report.results import ModelEval, ReportResults, RoundPoint
from fedscan.report.table import header, rows

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 24px; color: #1b1f24; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f3f6f9; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.global td { font-weight: 600; background: #eef5ff; }
.notes li { margin: 4px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.85em;
         background: #fff4e5; border: 1px solid #f0b35a; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: 0.85em; color: #57606a; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if isinstance(value, list | tuple | dict):
        return f"<td>{_e(json.dumps(value, default=str))}</td>"
    return f"<td>{_e(value)}</td>"


def _kv_table(items: Mapping[str, Any]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th>{_cell(v)}</tr>" for k, v in items.items())
    return f"<table>{body}</table>"


def _records_table(records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        return "<p>none</p>"
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(_cell(r.get(k, "")) for k in keys) + "</tr>" for r in records)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def _round_record(r: RoundPoint) -> dict[str, Any]:
    reported = ", ".join(f"{node} {_pct(acc)}" for node, acc in sorted(r.reported.items()))
    return {
        "round": r.round,
        "global version": f"v{r.version}",
        "updates aggregated": r.accepted if r.round else "-",
        "test accuracy %": _pct(r.test_accuracy),
        "nodes' accuracy on local validation %": reported or "-",
        "weighted %": _pct(r.weighted_reported),
    }


def _paper_table(results: ReportResults) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header())
    body = []
    for model, cells in zip(results.models, rows(results.models), strict=True):
        cls = ' class="global"' if model.kind == "global" else ""
        tds = f"<td>{_e(cells[0])}</td>" + "".join(f'<td class="num">{c}</td>' for c in cells[1:])
        body.append(f"<tr{cls}>{tds}</tr>")
    return f'<table id="paper-table"><tr>{head}</tr>{"".join(body)}</table>'


def _op_record(m: ModelEval) -> dict[str, Any]:
    c = m.calibration or {}
    op = c.get("operating_point") or {}
    cal = c.get("calibrated") or {}
    return {
        "temperature": f"{op.get('temperature', float('nan')):.3g}",
        "threshold": f"{op.get('threshold', float('nan')):.3f}",
        "uncertain band": f"±{op.get('uncertain_band', float('nan')):.2f}",
        "fitted on (validation slices)": op.get("n_val"),
        "fitted from": op.get("source", "the model's own validation patients"),
        "test sensitivity %": _pct(cal.get("sensitivity")),
        "test specificity %": _pct(cal.get("specificity")),
        "test slices shown uncertain": c.get("uncertain"),
    }


def _figure(src: str, caption: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return (
        f'<figure><img src="{_e(src)}" alt="{_e(caption)}"{w}>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def render(
    results: ReportResults,
    *,
    accuracy_png: str | None,
    roc_png: str | None,
    confusion_pngs: Sequence[tuple[str, str]],
    reliability_png: str | None = None,
) -> str:
    """The whole page; image paths are relative to the page."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(results.generated_at))
    init = (
        '<span class="badge">random init: no pretrained weights were used</span>'
        if results.init == "random"
        else f'<span class="badge">initial weights: {_e(results.init)}</span>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(results.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(results.title)}</h1>",
        f'<p class="sub">generated {_e(when)} &middot; {init}</p>',
        "<h2>Results on the held-out test set</h2>",
    ]
    if results.test_set:
        desc = ", ".join(f"{_e(k)} {_e(v)}" for k, v in results.test_set.items())
        parts.append(f"<p>Test set: {desc}.</p>")
    parts.append(_paper_table(results))
    described = [m for m in results.models if m.description]
    notes = [*results.notes, *(f"{m.name}: {m.description}" for m in described)]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if accuracy_png:
        parts += ["<h2>Accuracy per round</h2>", _figure(accuracy_png, "accuracy per round")]
        if results.rounds:
            parts.append(_records_table([_round_record(r) for r in results.rounds]))
    if roc_png:
        parts += ["<h2>ROC curves</h2>", _figure(roc_png, "ROC curves", 520)]
    if reliability_png:
        parts += [
            "<h2>Calibration</h2>",
            "<p>Reliability of P(covid) on the test set (ECE: expected calibration error over 10 "
            "bins). Operating points (temperature, threshold, uncertain band) were fitted on "
            "validation data only: a hospital's own validation patients for its local-only "
            "model, the nodes' summed validation statistics for the global model.</p>",
            _figure(reliability_png, "reliability diagram", 520),
        ]
        ops = [
            {"model": m.name, **_op_record(m)}
            for m in results.models
            if (m.calibration or {}).get("operating_point")
        ]
        if ops:
            parts.append(_records_table(ops))
    if confusion_pngs:
        parts.append("<h2>Confusion matrices</h2>")
        figs = "".join(_figure(src, name, 300) for src, name in confusion_pngs)
        parts.append(f'<div class="grid">{figs}</div>')
    for title, records in results.extra_tables.items():
        parts += [f"<h2>{_e(title)}</h2>", _records_table(records)]
    parts += ["<h2>Configuration</h2>", _kv_table(results.config)]
    if results.timings:
        timings = {k: f"{v:.1f} s" for k, v in results.timings.items()}
        parts += ["<h2>Timings</h2>", _kv_table(timings)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
