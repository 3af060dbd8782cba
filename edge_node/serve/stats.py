"""Node metrics: in-process counters and a latency histogram, rendered as Prometheus text.

No client library: the exposition format is a few lines of text. Counts of stored outcomes and
labels come from SQLite (they survive restarts); the latency histogram and per-reason counters
cover this process's lifetime. Labels here never carry UIDs or paths.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


class PipelineStats:
    """Counters and a file-to-stored-prediction latency histogram since start."""

    BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.buckets = [0] * len(self.BUCKETS_S)  # non-cumulative count per bucket
        self.latency_sum_s = 0.0
        self.latency_count = 0
        self.slices = 0
        self.batches = 0  # onnxruntime calls
        self.batch_slices = 0  # slices over those calls (mean batch = batch_slices / batches)

    def batch(self, slices: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_slices += slices

    def count(self, outcome: str, reason: str | None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if reason:
                self.reasons[reason.split(":", 1)[0]] += 1  # "modality:MR" -> "modality"

    def observe_ms(self, ms: float, slices: int) -> None:
        s = ms / 1000.0
        with self._lock:
            self.latency_sum_s += s
            self.latency_count += 1
            self.slices += slices
            for i, bound in enumerate(self.BUCKETS_S):
                if s <= bound:
                    self.buckets[i] += 1
                    break

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                outcomes=dict(self.outcomes),
                reasons=dict(self.reasons),
                buckets=list(self.buckets),
                latency_sum_s=self.latency_sum_s,
                latency_count=self.latency_count,
                slices=self.slices,
                batches=self.batches,
                batch_slices=self.batch_slices,
            )


@dataclass(frozen=True)
class StatsSnapshot:
    outcomes: dict[str, int]
    reasons: dict[str, int]
    buckets: list[int]
    latency_sum_s: float
    latency_count: int
    slices: int
    batches: int
    batch_slices: int


class DicomStats:
    """Counters of the DICOM listener and sender since start (no AE titles, no UIDs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


# DicomStats counter name -> (metric, help); the listener and sender count under these names
DICOM_COUNTERS: dict[str, tuple[str, str]] = {
    "associations_accepted": (
        "fedscan_dicom_associations_accepted_total",
        "Associations the C-STORE SCP accepted.",
    ),
    "associations_refused": (
        "fedscan_dicom_associations_refused_total",
        "Associations the C-STORE SCP refused (unknown calling/called AE, busy).",
    ),
    "echoes": ("fedscan_dicom_echoes_total", "C-ECHO requests answered."),
    "instances_stored": (
        "fedscan_dicom_instances_stored_total",
        "Instances received by C-STORE and written to the inbox.",
    ),
    "bytes_stored": ("fedscan_dicom_stored_bytes_total", "Bytes of those instances."),
    "store_failures": (
        "fedscan_dicom_store_failures_total",
        "C-STORE requests answered with a failure status (not written).",
    ),
    "sent": ("fedscan_dicom_results_sent_total", "Result objects the PACS accepted."),
    "send_failures": (
        "fedscan_dicom_send_failures_total",
        "Failed deliveries of a result object (each retry counts).",
    ),
}


def render_dicom(m: MetricsText, stats: DicomStats, outbox_pending: int | None) -> None:
    """Append the DICOM families to ``m``."""
    snap = stats.snapshot()
    for key, (name, help_text) in DICOM_COUNTERS.items():
        m.family(name, "counter", help_text)
        m.sample(name, snap.get(key, 0))
    if outbox_pending is not None:
        m.family("fedscan_dicom_outbox_pending", "gauge", "Result objects waiting for the PACS.")
        m.sample("fedscan_dicom_outbox_pending", outbox_pending)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class MetricsText:
    """Builder for the Prometheus text exposition format (version 0.0.4)."""

    lines: list[str] = field(default_factory=list)

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        lab = ""
        if labels:
            lab = "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"
        text = repr(float(value)) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{lab} {text}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(
    *,
    stats: PipelineStats,
    files_by_outcome: dict[str, int],
    predictions_by_label: dict[str, int],
    model_version: str | None,
    model_arch: str | None,
    queue_depth: dict[str, int],
    pending_files: int,
    model_swaps: int,
    dicom: DicomStats | None = None,
    dicom_outbox_pending: int | None = None,
) -> str:
    m = MetricsText()
    m.family("fedscan_files", "gauge", "Inbox files by recorded outcome (from the state database).")
    for outcome, n in sorted(files_by_outcome.items()):
        m.sample("fedscan_files", n, {"outcome": outcome})
    m.family("fedscan_predictions", "gauge", "Stored slice predictions by predicted label.")
    for label, n in sorted(predictions_by_label.items()):
        m.sample("fedscan_predictions", n, {"label": label})
    snap = stats.snapshot()
    m.family("fedscan_processed_files_total", "counter", "Files processed by this process.")
    for outcome, n in sorted(snap.outcomes.items()):
        m.sample("fedscan_processed_files_total", n, {"outcome": outcome})
    m.family("fedscan_refused_files_total", "counter", "Files skipped or quarantined, by reason.")
    for reason, n in sorted(snap.reasons.items()):
        m.sample("fedscan_refused_files_total", n, {"reason": reason})
    name = "fedscan_file_to_prediction_seconds"
    m.family(name, "histogram", "From file complete (close event / quiet period) to stored.")
    cum = 0
    for bound, n in zip(stats.BUCKETS_S, snap.buckets, strict=True):
        cum += n
        m.sample(f"{name}_bucket", cum, {"le": f"{bound:g}"})
    m.sample(f"{name}_bucket", snap.latency_count, {"le": "+Inf"})
    m.sample(f"{name}_sum", snap.latency_sum_s)
    m.sample(f"{name}_count", snap.latency_count)
    m.family("fedscan_predicted_slices_total", "counter", "Slices/frames predicted.")
    m.sample("fedscan_predicted_slices_total", snap.slices)
    m.family("fedscan_inference_batches_total", "counter", "onnxruntime calls (batches).")
    m.sample("fedscan_inference_batches_total", snap.batches)
    m.family("fedscan_inference_batch_slices_total", "counter", "Slices over those calls.")
    m.sample("fedscan_inference_batch_slices_total", snap.batch_slices)
    m.family("fedscan_model_info", "gauge", "The model being served (1), by version and arch.")
    if model_version is not None:
        m.sample("fedscan_model_info", 1, {"version": model_version, "arch": model_arch or ""})
    m.family("fedscan_model_swaps_total", "counter", "Models installed since start.")
    m.sample("fedscan_model_swaps_total", model_swaps)
    m.family("fedscan_queue_depth", "gauge", "Files waiting in each pipeline stage.")
    for stage, n in sorted(queue_depth.items()):
        m.sample("fedscan_queue_depth", n, {"stage": stage})
    m.sample("fedscan_queue_depth", pending_files, {"stage": "incomplete"})
    if dicom is not None:
        render_dicom(m, dicom, dicom_outbox_pending)
    return m.render()
