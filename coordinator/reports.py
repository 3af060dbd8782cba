"""Evaluation reports from nodes, and the per-round summaries `coordinator status` prints.

Nodes evaluate each incoming global model on their own held-out labelled scans and publish an
``EvalReport`` (counts and rates only) on ``fl/F/round/R/metrics/N``. Each is stored per
(round, node, model_version); the round summary adds the weighted metrics over nodes
(weights = validation set sizes, ``fl_protocol.metrics.weighted_average``) and the pooled
confusion matrix. Summaries read only SQLite, so `status` works while the coordinator runs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from coordinator.calibration import CalibrationBook
from coordinator.state import MetricsRow, State
from fl_protocol.errors import ProtocolError
from fl_protocol.metrics import Metrics, from_confusion, weighted_average
from fl_protocol.schemas import EvalReport
from fl_protocol.topics import TopicInfo

log = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def store_eval_report(state: State, info: TopicInfo, data: bytes) -> MetricsRow | None:
    """Parse and store one report; malformed or mismatching reports are logged and dropped."""
    try:
        report = EvalReport.from_bytes(data)
    except ProtocolError as exc:
        log.warning("eval report from node %s refused: %s", info.node, exc)
        return None
    if (report.round, report.node) != (info.round, info.node):
        log.warning("eval report from node %s does not match its topic", info.node)
        return None
    metrics: dict[str, Any] = {k: float(v) for k, v in report.metrics.items()}
    metrics["confusion"] = [list(report.confusion[0]), list(report.confusion[1])]
    row = MetricsRow(
        round=report.round,
        node=report.node,
        model_version=report.model_version,
        metrics=metrics,
        n_val=report.n_val,
        received_at=time.time(),
    )
    state.record_metrics(row)
    if CalibrationBook(state.dir).add(report):  # the operating point of the next export
        log.debug("round %d: node %s sent calibration statistics", report.round, report.node)
    log.info(
        "round %d: node %s evaluated global v%d on %d scans (accuracy %.3f)",
        report.round,
        report.node,
        report.model_version,
        report.n_val,
        metrics.get("accuracy", float("nan")),
    )
    return row


def _as_metrics(row: MetricsRow) -> Metrics:
    (tn, fp), (fn, tp) = row.metrics["confusion"]
    auc = row.metrics.get("auc")
    return from_confusion(int(tn), int(fp), int(fn), int(tp), auc=None if auc is None else auc)


def weighted(rows: list[MetricsRow]) -> dict[str, Any] | None:
    """Metrics averaged over nodes weighted by their validation size (None without rows)."""
    if not rows:
        return None
    return weighted_average((_as_metrics(r), float(r.n_val)) for r in rows).to_dict()


def round_summaries(state: State) -> list[dict[str, Any]]:
    """One JSON-ready dict per round: status, updates, versions, per-node and weighted metrics."""
    out: list[dict[str, Any]] = []
    metrics_by_round: dict[int, list[MetricsRow]] = {}
    for row in state.metrics():
        metrics_by_round.setdefault(row.round, []).append(row)
    for rnd in state.rounds():
        updates = state.updates(rnd.id)
        rows = metrics_by_round.get(rnd.id, [])
        out.append(
            {
                "round": rnd.id,
                "status": rnd.status,
                "outcome": rnd.outcome,
                "version_in": rnd.version_in,
                "version_out": rnd.version_out,
                "opened_at": rnd.opened_at,
                "deadline": rnd.deadline,
                "closed_at": rnd.closed_at,
                "strategy": rnd.config.get("strategy"),
                "accepted": sorted(u.node for u in updates if u.accepted),
                "rejected": {u.node: u.reason for u in updates if not u.accepted},
                "counted": sorted(u.node for u in updates if u.counted_in_aggregate),
                "samples": sum(int(u.num_samples or 0) for u in updates if u.accepted),
                "metrics": {
                    r.node: {"model_version": r.model_version, "n_val": r.n_val, **r.metrics}
                    for r in rows
                },
                "weighted": weighted(rows),
            }
        )
    return out


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Plain-text view of ``round_summaries`` for a terminal."""
    head = ["round", "status", "v_in", "v_out", "accepted", "rejected", *METRIC_NAMES]
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for s in summaries:
        w = s["weighted"] or {}
        reasons = Counter(s["rejected"].values())
        cells = [
            str(s["round"]),
            s["outcome"] or s["status"],
            str(s["version_in"]),
            "-" if s["version_out"] is None else str(s["version_out"]),
            str(len(s["accepted"])),
            str(sum(reasons.values())),
            *(_fmt(w.get(m)) for m in METRIC_NAMES),
        ]
        lines.append("  ".join(f"{c:>9}" for c in cells))
        for node, m in sorted(s["metrics"].items()):
            node_cells = ["", f"{node[:9]}", f"v{m['model_version']}", "", "", f"n={m['n_val']}"]
            node_cells += [_fmt(m.get(k)) for k in METRIC_NAMES]
            lines.append("  ".join(f"{c:>9}" for c in node_cells))
        for node, reason in sorted(s["rejected"].items()):
            lines.append(f"{'':>9}  rejected {node}: {reason}")
    return "\n".join(lines)
