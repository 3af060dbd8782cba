"""Completes series and makes their verdict: the node's "study complete" logic.

A series (rows of ``series``, filed by the pipeline with each predicted or skipped instance)
is complete when its expected instance count is reached (a header's NumberOfSlices /
ImagesInAcquisition, or ``Store.set_expected_instances``), or else ``quiet_time_s`` after
its last instance, as AI gateways do. Then the verdict rule (edge_node.series.verdict)
decides from the slice P(covid) at the served model's operating point, the row becomes
``complete`` with the verdict and how it was made, and ``publish`` (edge_node.results) makes
the DICOM result objects, whose UIDs and outbox state land in ``results_json``.

The state lives in the table, not here: after a restart the open series are simply found
again and complete on the same clock (wall time, ``last_seen``). The clock is injected, so the
logic is tested in memory; ``start()`` runs ``tick()`` in a thread for the daemon.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_node.errors import StoreError
from edge_node.results.common import SeriesFinding, SliceScore
from edge_node.series.verdict import decide
from edge_node.store import Store

log = logging.getLogger(__name__)

Publish = Callable[[SeriesFinding, dict[str, Any]], dict[str, Any]]  # (finding, series row)


@dataclass(frozen=True)
class OperatingPoint:
    """The served model's decision settings (edge_node.serve.inference.ModelInfo)."""

    threshold: float = 0.5
    uncertain_band: float = 0.10
    calibrated: bool = False
    untrained: bool = True
    model_version: str = "?"


def operating_point_of(info: Any) -> OperatingPoint:
    return OperatingPoint(
        threshold=float(info.threshold),
        uncertain_band=float(info.uncertain_band),
        calibrated=bool(info.calibrated),
        untrained=bool(info.untrained),
        model_version=str(info.model_version),
    )


class SeriesTracker:
    """Finds due series in the store, decides them, publishes their results."""

    def __init__(
        self,
        store: Store,
        *,
        rule: str,
        top_k: int,
        quiet_time_s: float,
        operating_point: Callable[[], OperatingPoint | None],
        publish: Publish | None = None,
        clock: Callable[[], float] = time.time,
        check_interval_s: float = 0.25,
    ) -> None:
        self.store = store
        self.rule = rule
        self.top_k = top_k
        self.quiet_time_s = quiet_time_s
        self.operating_point = operating_point
        self.publish = publish
        self.clock = clock
        self.check_interval_s = check_interval_s
        self.completed = 0  # series completed by this process (metrics)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- decisions -------------------------------------------------------------------------

    def due(self, row: dict[str, Any], now: float) -> bool:
        expected, n = row.get("expected_instances"), int(row.get("n_instances") or 0)
        if expected and n >= int(expected):
            return True
        return now - float(row.get("last_seen") or 0.0) >= self.quiet_time_s

    def tick(self) -> list[str]:
        """Complete every due open series; returns their SeriesInstanceUIDs."""
        op = self.operating_point()
        if op is None:  # no model served yet: nothing was predicted either
            return []
        now = self.clock()
        done = []
        for row in self.store.open_series():
            if self.due(row, now) and self._complete(row, op):
                done.append(str(row["series_instance_uid"]))
        return done

    def _complete(self, row: dict[str, Any], op: OperatingPoint) -> bool:
        uid = str(row["series_instance_uid"])
        preds = self.store.series_predictions(uid)
        probs = [float(p["prob_covid"]) for p in preds if p.get("prob_covid") is not None]
        v = decide(
            probs,
            rule=self.rule,
            threshold=op.threshold,
            band=op.uncertain_band,
            top_k=self.top_k,
        )
        versions = Counter(str(p.get("model_version")) for p in preds)
        version = versions.most_common(1)[0][0] if versions else op.model_version
        values: dict[str, Any] = {
            "verdict": v.verdict,
            "score": v.score,
            "threshold": v.threshold,
            "uncertain_band": v.band,
            "rule": v.rule,
            "n_slices_used": v.n_slices,
            "model_version": version,
            "calibrated": int(op.calibrated),
        }
        if not self.store.complete_series(uid, float(row["last_seen"]), values):
            return False  # an instance arrived meanwhile: the next tick looks again
        self.completed += 1
        log.info(
            "series complete: %d slice(s), verdict %s (%s, score %s)",
            v.n_slices,
            v.verdict,
            v.rule,
            "-" if v.score is None else f"{v.score:.3f}",
        )
        if self.publish is None:
            return True
        finding = SeriesFinding(
            series_instance_uid=uid,
            verdict=v.verdict,
            score=v.score,
            threshold=v.threshold,
            uncertain_band=v.band,
            rule=v.rule,
            n_slices_used=v.n_slices,
            model_version=version,
            calibrated=op.calibrated,
            untrained=op.untrained,
            slices=[
                SliceScore(
                    str(p["sop_instance_uid"]),
                    int(p["frame"] or 0),
                    float(p["prob_covid"]),
                    p.get("verdict"),
                )
                for p in preds
                if p.get("prob_covid") is not None
            ],
        )
        try:
            results = self.publish(finding, {**row, "paths": [p["path"] for p in preds]})
        except Exception as exc:  # results are extra: the verdict is stored already
            log.exception("series results not made")
            results = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            self.store.set_series_results(uid, json.dumps(results, sort_keys=True))
        except StoreError as exc:
            log.error("series results not recorded: %s", exc)
        return True

    # -- thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="series-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        warm = getattr(self.publish, "warm", None)
        if warm is not None:
            try:
                warm()
            except Exception:
                log.exception("results warm-up failed")
        while not self._stop.wait(self.check_interval_s):
            try:
                self.tick()
            except Exception:  # the tracker must outlive one bad series or a locked database
                log.exception("series tracker tick failed")
