"""A model file the node refused is moved aside with its reason; the served one is put back.

When ``models/current.onnx`` is replaced by a file that does not load (truncated, wrong
metadata, fails on a blank image), the node keeps serving the model it has in memory. Leaving
the refused file in place would make the next start fail (exit 3) and hide the problem behind
a healthy ``/health``. So the refused file goes to ``<model_dir>/refused/<name>.<ts>.onnx`` with
``<name>.<ts>.reason.json`` beside it, ``current.onnx`` gets the served model's bytes back
(from ``<model_dir>/.served.onnx``, a copy taken whenever a model from that path is installed),
and the refusal shows in ``/health`` (``model_refused``) and ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_node.serve.stats import MetricsText
from fl_protocol.files import sha256_file

log = logging.getLogger(__name__)

REFUSED_DIR = "refused"
SERVED_COPY = ".served.onnx"


@dataclass(frozen=True)
class Refusal:
    """One refused model file (shown in /health)."""

    file: str  # where the refused file now is, relative to the model dir
    reason: str  # the ModelError message
    at: float  # unix time of the refusal
    restored: bool  # current.onnx holds the served model again


class RefusedModels:
    """Keeps the served copy of ``path`` and moves refused replacements of it aside."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.folder = self.path.parent / REFUSED_DIR
        self.served_copy = self.path.parent / SERVED_COPY
        self._lock = threading.Lock()
        self.count = 0
        self.last: Refusal | None = None

    def keep_served(self, source: Path, sha256: str) -> None:
        """Copy the file a model was just loaded from, if it is ``path`` and still that model."""
        if Path(source) != self.path:
            return
        tmp = self.served_copy.with_name(self.served_copy.name + ".tmp")
        try:
            shutil.copyfile(source, tmp)
            if sha256_file(tmp) != sha256:  # replaced again meanwhile: the next install copies
                tmp.unlink(missing_ok=True)
                return
            os.replace(tmp, self.served_copy)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("copy of the served model not kept: %s", exc.strerror)

    def refuse(self, reason: str, served_sha256: str | None) -> Refusal | None:
        """Move ``path`` aside with ``reason``; put the served model back when we have it."""
        with self._lock:
            ts = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            stem = f"{self.path.stem}.{ts}"
            for i in range(1, 1000):
                if not (self.folder / f"{stem}.onnx").exists():
                    break
                stem = f"{self.path.stem}.{ts}-{i}"
            dst = self.folder / f"{stem}.onnx"
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, dst)
            except FileNotFoundError:
                return None  # replaced or removed meanwhile: nothing to move aside
            except OSError as exc:  # a read-only model folder: the file stays, the old model serves
                log.error("refused model file %s not moved aside: %s", self.path.name, exc.strerror)
                self.count += 1
                self.last = Refusal(
                    file=self.path.name, reason=reason, at=time.time(), restored=False
                )
                return self.last
            restored = self._restore(served_sha256)
            refusal = Refusal(
                file=str(dst.relative_to(self.path.parent)),
                reason=reason,
                at=time.time(),
                restored=restored,
            )
            record = {**asdict(refusal), "original": self.path.name}
            reason_file = self.folder / f"{stem}.reason.json"
            try:
                reason_file.write_text(json.dumps(record, indent=2) + "\n")
            except OSError as exc:
                log.error("reason file of the refused model not written: %s", exc.strerror)
            self.count += 1
            self.last = refusal
        after = "restored to the served model" if restored else "absent: no served copy"
        log.error(
            "model file %s refused and moved to %s (%s); %s %s",
            self.path.name,
            refusal.file,
            reason,
            self.path.name,
            after,
        )
        return refusal

    def _restore(self, served_sha256: str | None) -> bool:
        if served_sha256 is None or not self.served_copy.is_file():
            return False
        tmp = self.path.with_name(f".{self.path.name}.restore.tmp")
        try:
            if sha256_file(self.served_copy) != served_sha256:
                return False
            shutil.copyfile(self.served_copy, tmp)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("served model not restored to %s: %s", self.path.name, exc.strerror)
            return False
        return True


def refusal_json(refused: RefusedModels) -> dict[str, object] | None:
    """The last refusal for ``/health`` (None when no model file was refused)."""
    last = refused.last
    return None if last is None else {**asdict(last), "count": refused.count}


def render_refusals(refused: RefusedModels) -> str:
    """Prometheus families for refused model files (appended to ``/metrics``)."""
    m = MetricsText()
    name = "fedscan_model_refused_total"
    m.family(name, "counter", "Model files refused and moved to models/refused/.")
    m.sample(name, refused.count)
    name = "fedscan_model_refused_last_timestamp_seconds"
    m.family(name, "gauge", "Unix time of the last refused model file (0: none).")
    m.sample(name, refused.last.at if refused.last else 0.0)
    return m.render()
