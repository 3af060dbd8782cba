"""The federation's operating point, fitted from the nodes' validation statistics.

Each node evaluates the incoming global model on its local validation slices and sends, with
its ``EvalReport``, aggregate calibration statistics (``CalibrationReport``: summed NLL on a
fixed grid of temperatures, counts of covid / non-covid slices per logit-margin step; no
per-slice data). They are kept per (version, node) as ``<state>/calibration/v{N}/{node}.json``
(a repeated report replaces the node's earlier one). :meth:`CalibrationBook.operating_point`
sums a version's reports (each node weighs by its slice count) and fits temperature,
threshold and uncertain band (``fl_protocol.calibration.fit_operating_point``).

Timing: version N is exported and published as soon as it is aggregated, before any node has
evaluated it, so :meth:`CalibrationBook.metadata_for` gives version N the operating point
fitted on the newest earlier version with reports (normally N - 1, the model the nodes just
trained from), and names that version in ``fedscan.calibration_version``. The last version of a
run therefore carries its predecessor's operating point.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fl_protocol.calibration import CalibrationError, CalibrationStats, OperatingPoint, combine
from fl_protocol.calibration import fit_operating_point as fit
from fl_protocol.files import write_atomic
from fl_protocol.schemas import EvalReport
from fl_protocol.topics import check_id

log = logging.getLogger(__name__)


class CalibrationBook:
    """Stored calibration statistics of every (version, node) and the fits made from them."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "calibration"

    def add(self, report: EvalReport) -> bool:
        """Keep the report's statistics (False when it has none)."""
        if report.calibration is None:
            return False
        node = check_id(report.node, "node")
        folder = self.dir / f"v{int(report.model_version)}"
        payload = {k: v for k, v in report.calibration.to_dict().items() if k != "schema"}
        write_atomic(folder / f"{node}.json", (json.dumps(payload) + "\n").encode())
        return True

    def stats(self, version: int) -> CalibrationStats | None:
        """The summed statistics of ``version`` over the nodes that reported (None: none)."""
        folder = self.dir / f"v{int(version)}"
        items: list[CalibrationStats] = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                items.append(CalibrationStats.from_dict(json.loads(path.read_text())))
            except (OSError, ValueError, CalibrationError) as exc:
                log.warning("calibration statistics %s unreadable: %s", path.name, exc)
        return combine(items)

    def operating_point(self, version: int) -> OperatingPoint | None:
        total = self.stats(version)
        return None if total is None else fit(total)

    def metadata_for(self, version: int) -> dict[str, str] | None:
        """ONNX metadata for ``version``: the fit of the newest version < ``version`` (see the
        module docstring), or None when no earlier version has usable reports."""
        for v in range(int(version) - 1, -1, -1):
            op = self.operating_point(v)
            if op is not None:
                log.info(
                    "global v%d: operating point from the nodes' validation of v%d "
                    "(%d slices): T=%.3g, threshold %.3g, uncertain band %.2g",
                    version, v, op.n_val, op.temperature, op.threshold, op.uncertain_band,
                )  # fmt: skip
                return {**op.metadata(), "fedscan.calibration_version": str(v)}
        return None
