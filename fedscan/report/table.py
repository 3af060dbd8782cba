"""The paper's table as text: one row per model, accuracy, precision, recall, specificity, F1,
AUC (argmax decision), then calibration: ECE of the softmax probability, and the accuracy and
ECE with the temperature and threshold fitted on validation data (``-`` when not measured)."""

from __future__ import annotations

from collections.abc import Sequence

from fedscan.report.results import ModelEval

COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("specificity", "Specificity"),
    ("f1", "F1"),
    ("auc", "AUC"),
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def _calibration_cells(m: ModelEval) -> list[str]:
    """ECE at the softmax, then accuracy and ECE at the operating point fitted on validation."""
    c = m.calibration or {}
    cal = c.get("calibrated") or {}
    return [_pct(c.get("ece")), _pct(cal.get("accuracy")), _pct(c.get("ece_calibrated"))]


def rows(models: Sequence[ModelEval]) -> list[list[str]]:
    """Cells per model: name, the metrics in percent, calibration, and the test set size."""
    out = []
    for m in models:
        d = m.metrics.to_dict()
        out.append(
            [
                m.name,
                *(_pct(d[key]) for key, _ in COLUMNS),
                *_calibration_cells(m),
                str(m.metrics.n),
            ]
        )
    return out


CALIBRATION_HEADER = ("ECE %", "Accuracy at fitted threshold %", "ECE after T %")


def header() -> list[str]:
    return ["Model", *(title + " %" for _, title in COLUMNS[:-1]), "AUC %", *CALIBRATION_HEADER,
            "n"]  # fmt: skip


def markdown_table(models: Sequence[ModelEval]) -> str:
    """A GitHub markdown table (metrics in percent)."""
    head = header()
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(models)]
    return "\n".join(lines)


def text_table(models: Sequence[ModelEval]) -> str:
    """Aligned plain text for a terminal."""
    head = header()
    body = rows(models)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = [f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]]
    lines = ["  ".join(f.format(c) for f, c in zip(fmt, head, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f.format(c) for f, c in zip(fmt, r, strict=True)) for r in body]
    return "\n".join(lines)
