"""One complete series -> its DICOM results (SR, SC) -> the outbox; what ``results_json`` says.

The source instances are read again from the paths their predictions name (headers only,
plus the pixels of the key slices for the summary image); a file gone since (retention) is
left out of the references. Each object is enqueued in ``Outbox(<state_dir>/outbox)``
(edge_node.dicomnet.outbox), whose sender delivers it to the PACS when ``[dicom] send_to`` is
set; without a sender the objects wait in ``outbox/pending``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from edge_node.results.common import SeriesFinding

log = logging.getLogger(__name__)


def _headers(paths: Sequence[str]) -> dict[str, tuple[str, Dataset]]:
    """SOP Instance UID -> (path, header) of every source file still readable."""
    import pydicom

    out: dict[str, tuple[str, Dataset]] = {}
    for path in dict.fromkeys(paths):
        try:  # a file the pipeline read whole already: the header is all we need again
            ds = pydicom.dcmread(Path(path), stop_before_pixels=True)
        except Exception as exc:  # gone or changed since it was predicted
            log.warning("a source instance is not referenced (%s)", type(exc).__name__)
            continue
        out[str(ds.get("SOPInstanceUID") or "")] = (path, ds)
    return out


def _key_slices(
    finding: SeriesFinding, headers: dict[str, tuple[str, Dataset]], n: int
) -> list[Any]:
    """The ``n`` slices with the highest P(covid), in the lung window (sc.KeySlice)."""
    from edge_node.ingest.preprocess import PreprocessParams, prepare
    from edge_node.results.sc import KeySlice

    ranked = sorted(finding.slices, key=lambda s: -s.prob_covid)
    keys: list[KeySlice] = []
    for s in ranked:
        if len(keys) >= n:
            break
        if s.sop_instance_uid not in headers:
            continue
        path, ds = headers[s.sop_instance_uid]
        try:
            frames = prepare(Path(path), PreprocessParams(size=256, modalities=("*",))).frames
            image = frames[min(s.frame, len(frames) - 1)]
        except Exception as exc:
            log.warning("key slice not rendered (%s)", type(exc).__name__)
            continue
        number = ds.get("InstanceNumber")
        keys.append(
            KeySlice(
                np.asarray(image),
                s.prob_covid,
                s.verdict,
                None if number in (None, "") else int(number),
            )
        )
    return keys


class ResultPublisher:
    """The tracker's ``publish``: builds the configured objects and enqueues them."""

    def __init__(self, outbox_root: Path, *, sr: bool = True, sc: bool = True, key_slices: int = 4):
        self.outbox_root = outbox_root
        self.sr = sr
        self.sc = sc
        self.key_slices = key_slices
        self._outbox: Any = None

    def warm(self) -> None:
        """Import highdicom now (seconds on a loaded machine), not when a series completes."""
        import edge_node.results.sc
        import edge_node.results.sr  # noqa: F401

    def _enqueue(self, ds: Dataset) -> Path:
        if self._outbox is None:
            from edge_node.dicomnet.outbox import Outbox

            self._outbox = Outbox(self.outbox_root)
        return Path(self._outbox.enqueue(ds))

    def __call__(self, finding: SeriesFinding, row: dict[str, Any]) -> dict[str, Any]:
        from edge_node.results.sc import build_sc
        from edge_node.results.sr import build_sr

        headers = _headers(list(row.get("paths") or []))
        if not headers:
            return {"error": "no source instance readable: no result objects"}
        sources = [ds for _p, ds in headers.values()]
        out: dict[str, Any] = {}
        made: list[tuple[str, Dataset]] = []
        if self.sr:
            # the image library describes the key slices; the evidence lists every instance
            ranked = sorted(finding.slices, key=lambda s: -s.prob_covid)
            library = [
                headers[s.sop_instance_uid][1] for s in ranked if s.sop_instance_uid in headers
            ]
            library = list({id(d): d for d in library}.values())[: self.key_slices]
            made.append(("sr", build_sr(finding, sources, library=library)))
        if self.sc:
            keys = _key_slices(finding, headers, self.key_slices)
            made.append(("sc", build_sc(finding, sources[0], keys)))
        for kind, ds in made:
            path = self._enqueue(ds)
            out[kind] = {
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "sop_class_uid": str(ds.SOPClassUID),
                "outbox": "pending",
                "file": path.name,
            }
        log.info("series results queued: %s", ", ".join(sorted(out)) or "none")
        return out
