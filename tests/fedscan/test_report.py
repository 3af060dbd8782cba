"""fedscan.report: the page, the charts and results.json from real metrics objects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fedscan.report import ModelEval, ReportResults, RoundPoint, markdown_table, write_report
from fl_protocol.metrics import classification_metrics, roc_curve


def _model(name: str, kind: str, seed: int, skill: float, node: str | None = None) -> ModelEval:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    score = np.clip(y * skill + rng.normal(0.5 - skill / 2, 0.25, 60), 0, 1)
    pred = (score >= 0.5).astype(int)
    return ModelEval(
        name=name,
        kind=kind,
        node=node,
        metrics=classification_metrics(y, pred, score),
        roc=roc_curve(y, score),
        description=f"{name} made for the test",
    )


def _results() -> ReportResults:
    models = [
        _model("hospital-1 local-only", "local", 1, 0.3, "hospital-1"),
        _model("hospital-2 local-only", "local", 2, 0.4, "hospital-2"),
        _model("global v3", "global", 3, 0.6),
    ]
    rounds = [
        RoundPoint(0, 0, 0.5),
        RoundPoint(1, 1, 0.61, {"hospital-1": 0.55, "hospital-2": 0.6}, 0.58, 2),
        RoundPoint(2, 2, 0.72, {"hospital-1": 0.7}, 0.7, 2),
    ]
    return ReportResults(
        title="fedscan demo <report>",
        models=models,
        rounds=rounds,
        config={"nodes": 2, "rounds": 2, "arch": "cnn2d", "lr": 0.001},
        test_set={"slices": 60, "patients": 6},
        notes=("local-only: trained on its own labels only",),
        timings={"federation": 12.5},
        extra_tables={"Live predictions": [{"node": "hospital-1", "predicted": 10}]},
    )


def test_report_folder_has_page_charts_and_json(tmp_path: Path) -> None:
    """A report of three models and three rounds: every referenced PNG exists, is a real
    image, the page holds the table values, escapes text and fetches nothing remote."""
    results = _results()
    index = write_report(tmp_path / "report", results)
    assert index == tmp_path / "report" / "index.html"
    page = index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert "accuracy_per_round.png" in srcs and "roc.png" in srcs
    assert sum(s.startswith("confusion_") for s in srcs) == 3
    for src in srcs:
        assert not src.startswith(("/", "http")), src
        with Image.open(index.parent / src) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 150
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "fedscan demo &lt;report&gt;" in page  # escaped
    assert "random init" in page
    acc = results.models[2].metrics.accuracy
    assert f"{100 * acc:.1f}" in page
    assert "local-only: trained on its own labels only" in page
    assert "Live predictions" in page and "Configuration" in page

    loaded = ReportResults.from_dict(json.loads((index.parent / "results.json").read_text()))
    assert loaded.to_dict() == results.to_dict()


def test_markdown_table_has_one_row_per_model_in_percent() -> None:
    results = _results()
    table = markdown_table(results.models).splitlines()
    assert table[0].startswith("| Model | Accuracy % | Precision % | Recall % | Specificity %")
    assert len(table) == 2 + len(results.models)
    m = results.models[0].metrics
    assert f"| {100 * m.f1:.1f} |" in table[2]


def test_rerendering_with_fewer_models_leaves_no_stray_charts(tmp_path: Path) -> None:
    results = _results()
    write_report(tmp_path, results)
    fewer = ReportResults(title="t", models=results.models[:1], init="hub")
    page = write_report(tmp_path, fewer).read_text()
    assert sorted(p.name for p in tmp_path.glob("confusion_*.png")) == ["confusion_0.png"]
    assert "random init" not in page and "initial weights: hub" in page
    assert "Accuracy per round" not in page


def test_calibration_is_shown_next_to_accuracy(tmp_path: Path) -> None:
    """A model with calibration figures from the demo's scorer (an operating point fitted on
    validation): the table gets ECE and the accuracy at the fitted threshold, the page a
    reliability diagram and the operating point, and results.json keeps them."""
    from dataclasses import replace

    from fedscan.demo.evaluate import calibration_figures

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 80)
    logits = np.stack([np.zeros(80), 4.0 * (y - 0.5) + rng.normal(0, 2.0, 80)], axis=1)
    op = {"temperature": 2.0, "threshold": 0.45, "uncertain_band": 0.1, "n_val": 30}
    cal = calibration_figures(logits, y, op)
    assert 0 <= cal["ece"] <= 1 and cal["calibrated"]["n"] == 80 and cal["uncertain"] >= 0
    results = _results()
    results = replace(results, models=[replace(results.models[2], calibration=cal)])
    index = write_report(tmp_path / "r", results)
    page = index.read_text()
    assert (tmp_path / "r" / "reliability.png").is_file() and "reliability.png" in page
    assert "ECE %" in page and "Accuracy at fitted threshold %" in page
    assert f"{100 * cal['calibrated']['accuracy']:.1f}" in page and "0.450" in page
    saved = ReportResults.from_dict(json.loads((tmp_path / "r" / "results.json").read_text()))
    assert saved.models[0].calibration == json.loads(json.dumps(cal))
