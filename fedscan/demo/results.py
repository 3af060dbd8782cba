"""The demo's results: the models scored on the held-out test set, the rounds, the nodes' live
predictions, and the configuration, as a ``fedscan.report.ReportResults``.

Everything is read from disk after the processes stopped: the coordinator's state and global
checkpoints (``coordinator.state``, read-only), each hospital's local-only weights, and each
node's ``predictions`` table (docs/CONTRACTS.md).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from fedscan.demo import evaluate as ev
from fedscan.demo.config import DemoConfig
from fedscan.demo.plan import DataPlan
from fedscan.report import ModelEval, ReportResults, RoundPoint

log = logging.getLogger(__name__)

TITLE = "fedscan demo: federated COVID / non-COVID CT classification"
LIVE_TABLE = "Live predictions of the unlabelled slices (on arrival)"


def live_predictions(
    node_dbs: dict[str, Path], truth: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """How each node's on-arrival predictions of its unlabelled slices fared
    (``truth``: node -> inbox path -> true label)."""
    out = []
    for node, db in node_dbs.items():
        node_truth = truth.get(node, {})
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                rows = conn.execute("SELECT path, label, model_version FROM predictions")
                preds = [(p, lab, v) for p, lab, v in rows if p in node_truth]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("%s: predictions unreadable: %s", node, exc)
            continue
        right = sum(1 for p, lab, _ in preds if lab == node_truth[p])
        versions = sorted({str(v) for _, _, v in preds}, key=lambda s: (len(s), s))
        out.append(
            {
                "node": node,
                "unlabelled slices": len(node_truth),
                "predicted on arrival": len(preds),
                "correct": right,
                "accuracy %": round(100.0 * right / len(preds), 1) if preds else None,
                "model versions used": ", ".join(f"v{v}" for v in versions),
            }
        )
    return out


def build_results(
    c: DemoConfig,
    plan: DataPlan,
    coordinator_state: Path,
    local: dict[str, Path],
    live: list[dict[str, Any]],
    *,
    eval_cache: Path,
    labels_needed: int,
    broker_port: int,
) -> ReportResults:
    """Score every model on the held-out test set and gather what the report shows."""
    from coordinator.reports import round_summaries
    from coordinator.state import State

    test = ev.load_test_set(plan.test, plan.base, eval_cache)
    state = State(coordinator_state, readonly=True)
    try:
        versions = state.versions()
        summaries = round_summaries(state)
        paths = {v.version: state.checkpoint_path(v.version) for v in versions}
        metrics_rows = state.metrics()
    finally:
        state.close()
    models: list[ModelEval] = []
    epochs = c.rounds * c.local_epochs
    for node, weights in local.items():
        m, roc = ev.score(weights, test)
        models.append(ModelEval(
            name=f"{node} local-only", kind="local", node=node, metrics=m, roc=roc,
            description=(
                f"trained on {node}'s own labels only (fedscan node train), from the same "
                f"random initial weights as global v0, for {epochs} epoch(s) = rounds x "
                "local epochs, the budget of its federated training; best epoch on its "
                "local validation patients"
            ),
        ))  # fmt: skip
    points: list[RoundPoint] = []
    final_eval: ModelEval | None = None
    accepted = {int(s["version_out"]): len(s["accepted"]) for s in summaries
                if s["version_out"] is not None}  # fmt: skip
    weighted = {}
    for s in summaries:
        if s["weighted"]:
            weighted[int(s["version_in"])] = s["weighted"].get("accuracy")
    for version in sorted(paths):
        m, roc = ev.score(paths[version], test)
        reported = {
            r.node: float(r.metrics["accuracy"])
            for r in metrics_rows
            if r.model_version == version and "accuracy" in r.metrics
        }
        points.append(RoundPoint(version, version, m.accuracy, reported,
                                 weighted.get(version), accepted.get(version, 0)))  # fmt: skip
        if version == max(paths):
            final_eval = ModelEval(
                name=f"global v{version} (FedAvg)", kind="global", metrics=m, roc=roc,
                description=(
                    f"the federation's final model: {len(points) - 1} round(s) of FedAvg "
                    f"over MQTT, every hospital training {c.local_epochs} epoch(s) per round "
                    "from the current global model"
                ),
            )  # fmt: skip
    if final_eval is not None:
        models.append(final_eval)
    notes = (
        "Every model is scored on the same held-out test set: slices of patients that no "
        "node ever had a label for (they reached the inboxes unlabelled, and were only "
        "predicted).",
        f"Slices reached the inboxes over {c.feed_seconds:g} s once every node served the "
        f"first global model; in each round a node trained on the labels it held then (at "
        f"least {labels_needed}), so early rounds saw part of the data. The local-only "
        "baselines were trained afterwards, on every label of their hospital.",
        "Round 0 is the random initial global model; the dashed lines are each node's own "
        "evaluation of the global model it received, on its local validation patients, as "
        "reported to the coordinator over MQTT.",
    )
    config = {
        **{k: v for k, v in c.describe().items() if k not in ("live", "min_labels")},
        "data": plan.source,
        "labelled per node": {p.node: len(p.labelled) for p in plan.nodes},
        "labels needed to train": labels_needed,
        "broker": f"python -m fl_protocol.broker on 127.0.0.1:{broker_port} (no TLS)",
        "strategy": "fedavg (coordinator), update codec fp16, signed global manifests",
    }
    return ReportResults(
        title=TITLE,
        models=models,
        rounds=points,
        config=config,
        test_set=plan.test_summary(),
        init="random",
        notes=notes,
        extra_tables={LIVE_TABLE: live},
    )
