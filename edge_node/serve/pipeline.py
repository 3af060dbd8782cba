"""Ready files -> preprocess -> batch -> predict -> store, in two overlapping stages.

Stage 1 (preprocess workers) reads and preprocesses each ready file; stage 2 (one inference
thread) gathers what is prepared into batches, runs onnxruntime (which releases the GIL, so
the stages overlap) and writes each file's outcome and predictions in one transaction. A lone
file is predicted as soon as it is prepared (no batching wait); during a burst the queue fills
while a batch runs, so batches form by themselves.

Nothing a file contains can stop the pipeline: unreadable files are quarantined with a reason,
valid DICOM we do not predict on is recorded as skipped, a SOP instance already predicted from
another file is skipped as a duplicate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.config import PreprocessConfig
from edge_node.errors import InputError, NodeError, SkippedInput, StoreError
from edge_node.ingest.preprocess import (
    DecodeLimits,
    PreprocessKey,
    PreprocessParams,
    model_key,
    prepare,
)
from edge_node.ingest.quarantine import Quarantine, path_tag
from edge_node.ingest.watcher import ReadyFile
from edge_node.serve.crash_guard import CRASHED_DECODER, CrashGuard
from edge_node.serve.inference import ModelHolder, OnnxModel
from edge_node.serve.stats import PipelineStats
from edge_node.store import FileRecord, PredictionRow, SeriesNote, Store

log = logging.getLogger(__name__)

_STOP = object()
DUPLICATE = "duplicate_sop_instance_uid"  # skip reason of a second file with a known SOP UID


@dataclass
class Prepared:
    """A preprocessed file waiting for the inference stage."""

    ready: ReadyFile
    meta: Any  # edge_node.ingest.preprocess.SliceMeta
    frames: list[np.ndarray]
    key: PreprocessKey  # (window center, width, size, texture) used
    texture: np.ndarray | None
    read_ms: float | None
    preprocess_ms: float


@dataclass
class Outcome:
    """What happened to one file (returned by ``process_now``)."""

    outcome: str  # predicted | skipped | quarantined | vanished | retry
    reason: str | None = None
    sop_instance_uid: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)


class Pipeline:
    """Turns ``ReadyFile``s into stored outcomes; ``submit`` is the watcher's sink."""

    def __init__(
        self,
        *,
        holder: ModelHolder,
        store: Store,
        quarantine: Quarantine,
        preprocess: PreprocessConfig,
        files_per_batch: int = 32,
        slices_per_run: int = 16,
        batch_wait_ms: float = 5.0,
        preprocess_workers: int = 1,
        on_finished: Callable[[ReadyFile], None] | None = None,
        on_retry: Callable[[ReadyFile], None] | None = None,
        stats: PipelineStats | None = None,
        decoding_dir: Path | None = None,
        chest: Any = None,
    ) -> None:
        self.holder = holder
        # edge_node.series.chest.ChestPolicy: non-chest images are skipped (not_chest:*)
        # before inference; None = every usable image is predicted.
        self.chest = chest
        self.store = store
        self.quarantine = quarantine
        self.preprocess_config = preprocess
        self.files_per_batch = files_per_batch
        self.slices_per_run = slices_per_run
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.on_finished = on_finished or (lambda _r: None)
        self.on_retry = on_retry or self.on_finished
        self.stats = stats or PipelineStats()
        self._ready_q: queue.Queue[Any] = queue.Queue()
        # Bounded: during a burst of thousands of files, preprocessing waits for inference
        # instead of holding every prepared slice in memory.
        self._prepared_q: queue.Queue[Any] = queue.Queue(maxsize=2 * files_per_batch + 8)
        self._n_workers = preprocess_workers
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._sop_lock = threading.Lock()
        self._sops_inflight: dict[str, str] = {}
        self._params_cache: dict[PreprocessKey, PreprocessParams] = {}
        self._texture_fn: Callable[[np.ndarray], np.ndarray] | None = None
        # How logs name a file: a path tag by default (file names often carry patient names);
        # the daemon sets the inbox-relative path when [watcher] log_paths is on.
        self.file_ref: Callable[[Path], str] = path_tag
        # Crash-loop guard (serve/crash_guard.py) over decoding_dir; None: no guard (tests).
        self.guard = (
            CrashGuard(decoding_dir, lambda p: self.file_ref(p))
            if decoding_dir is not None
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self._n_workers):
            t = threading.Thread(target=self._preprocess_loop, name=f"preprocess-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        t.start()
        self._threads.append(t)

    def submit(self, ready: ReadyFile) -> None:
        self._ready_q.put(ready)

    def queue_depth(self) -> dict[str, int]:
        return {"ready": self._ready_q.qsize(), "prepared": self._prepared_q.qsize()}

    def drain(self, timeout: float = 60.0) -> bool:
        """Finish every file already submitted, then stop the threads; True if all finished."""
        self._stopping.set()
        for _ in range(self._n_workers):
            self._ready_q.put(_STOP)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # -- synchronous path (API upload, `fedscan predict` uses OnnxModel directly) ----------

    def process_now(self, path: Path) -> Outcome:
        """Preprocess, predict and store one file in the calling thread."""
        st = path.stat()
        ready = ReadyFile(path, st.st_size, st.st_mtime, True, time.monotonic(), "upload")
        model = self.holder.current()
        if model is None:
            raise NodeError("no model loaded yet")
        result = self._prepare(ready, model)
        if isinstance(result, Outcome):
            return result
        rows = self._predict_and_store([result], model)
        sop = str(result.meta.sop_instance_uid)
        return Outcome("predicted", None, sop, rows.get(str(path), []))

    # -- stage 1 ---------------------------------------------------------------------------

    def _preprocess_loop(self) -> None:
        while True:
            item = self._ready_q.get()
            if item is _STOP:
                self._prepared_q.put(_STOP)
                return
            ready: ReadyFile = item
            model = self.holder.current()
            while model is None and not self._stopping.is_set():
                model = self.holder.wait(0.5)
            if model is None:  # shutting down before any model arrived: next start scans again
                continue
            try:
                result = self._prepare(ready, model)
            except Exception:
                log.exception("preprocess stage failed on file %s", self.file_ref(ready.path))
                self._safe_finish(ready)
                continue
            if isinstance(result, Prepared):
                self._prepared_q.put(result)

    def _params(self, key: PreprocessKey) -> PreprocessParams:
        p = self._params_cache.get(key)
        if p is None:
            p = PreprocessParams(
                window_center=key[0],
                window_width=key[1],
                size=key[2],
                modalities=tuple(self.preprocess_config.modalities),
                limits=DecodeLimits.from_config(self.preprocess_config),  # DICOM bomb bounds
                chest=self.chest,
            )
            self._params_cache[key] = p
        return p

    def _texture(self, frames: list[np.ndarray]) -> np.ndarray:
        if self._texture_fn is None:
            from edge_node.ingest.texture import texture_features  # scikit-image: only when needed

            self._texture_fn = texture_features
        return np.stack([self._texture_fn(f) for f in frames]).astype(np.float32)

    def _prepare(self, ready: ReadyFile, model: OnnxModel) -> Prepared | Outcome:
        """Preprocess one file; every failure becomes a stored outcome (or a retry)."""
        key = model_key(model, self.preprocess_config)
        marker = self._mark_decoding(ready)
        try:
            return self._prepare_marked(ready, model, key)
        finally:
            # The outcome of a refused file is stored by now; a prepared one is past decoding
            # (if the process dies later, decoding it again at the next start is safe).
            if marker is not None and self.guard is not None:
                self.guard.done(ready.path, marker)

    def _prepare_marked(
        self,
        ready: ReadyFile,
        model: OnnxModel,
        key: PreprocessKey,
    ) -> Prepared | Outcome:
        try:
            pf = prepare(ready.path, self._params(key))
        except FileNotFoundError:
            self._safe_finish(ready)  # deleted before we got to it: nothing to record
            log.info("file %s vanished before it was read (no outcome)", self.file_ref(ready.path))
            return Outcome("vanished")
        except SkippedInput as exc:  # a non-chest image carries its header (series row)
            meta = getattr(exc, "meta", None)
            return self._finish_unusable(ready, "skipped", exc.reason, str(exc), meta)
        except InputError as exc:
            if not ready.stable:
                self.on_retry(ready)  # maybe still being written: wait for a quiet period
                return Outcome("retry", exc.reason)
            return self._finish_unusable(ready, "quarantined", exc.reason, str(exc), None)
        except Exception as exc:  # a decoder bug must not take the node down
            if not ready.stable:
                self.on_retry(ready)
                return Outcome("retry", "error")
            detail = f"{type(exc).__name__}: {exc}"
            return self._finish_unusable(ready, "quarantined", "error", detail, None)
        sop = str(pf.meta.sop_instance_uid)
        if not self._claim_sop(sop, str(ready.path)):
            why = "same SOP instance as another file"
            return self._finish_unusable(ready, "skipped", DUPLICATE, why, pf.meta)
        try:
            texture = self._texture(pf.frames) if model.info.needs_texture else None
        except Exception as exc:
            self._release_sop(sop)
            detail = f"{type(exc).__name__}: {exc}"
            return self._finish_unusable(ready, "quarantined", "texture_error", detail, pf.meta)
        return Prepared(
            ready=ready,
            meta=pf.meta,
            frames=list(pf.frames),
            key=key,
            texture=texture,
            read_ms=pf.read_ms,
            preprocess_ms=pf.preprocess_ms,
        )

    # -- crash-loop guard (serve/crash_guard.py) ----------------------------------------------

    def _mark_decoding(self, ready: ReadyFile) -> Path | None:
        """Note that ``ready`` is being decoded; the marker to remove, None without a guard."""
        if self.guard is None or ready.via == "upload":
            return None
        return self.guard.mark(ready.path, path_tag(ready.path))

    def recover_crashed(self) -> int:
        """At start, before the catch-up scan: quarantine (reason ``crashed_decoder``, outcome
        stored) each file the process died decoding ``DECODE_ATTEMPTS`` times. Returns how many
        were quarantined."""
        if self.guard is None:
            return 0
        crashed = self.guard.recover()
        for c in crashed:
            ready = ReadyFile(c.path, c.size, c.mtime, True, time.monotonic(), "catchup")
            detail = f"the node process died {c.attempts} times while decoding this file"
            self._finish_unusable(ready, "quarantined", CRASHED_DECODER, detail, None)
        return len(crashed)

    def _claim_sop(self, sop: str, path: str) -> bool:
        """False when another file with this SOP instance is in flight or already predicted."""
        with self._sop_lock:
            other = self._sops_inflight.get(sop) or self.store.predicted_path(sop)
            if other is not None and other != path:
                return False
            self._sops_inflight[sop] = path
            return True

    def _release_sop(self, sop: str) -> None:
        with self._sop_lock:
            self._sops_inflight.pop(sop, None)

    def _finish_unusable(
        self, ready: ReadyFile, outcome: str, reason: str, detail: str, meta: Any
    ) -> Outcome:
        if outcome == "quarantined" and ready.via != "upload":
            self.quarantine.put(ready.path, reason, detail)
        sop = str(meta.sop_instance_uid) if meta is not None else None
        n_frames = int(meta.n_frames) if meta is not None else None
        rec = FileRecord(
            str(ready.path), ready.size, ready.mtime, sop, outcome, f"{reason}: {detail}", n_frames
        )
        note = None
        if outcome == "skipped" and reason != DUPLICATE and meta is not None:
            note = series_note(meta, reason)
        if ready.via != "upload":
            self.store.record_file(rec, (), note)
        self.stats.count(outcome, reason)
        log.info("file %s %s (%s)", self.file_ref(ready.path), outcome, reason)
        self._safe_finish(ready)
        return Outcome(outcome, reason, sop)

    def record_ignored(self, ready: ReadyFile, reason: str, detail: str) -> None:
        """An inbox file the watcher does not hand over (extension not allowed, a dangling
        link, not a regular file): its row says so, so every inbox file has one outcome."""
        self._finish_unusable(ready, "skipped", reason, detail, None)

    def _safe_finish(self, ready: ReadyFile) -> None:
        if ready.via == "upload":  # not a watched file
            return
        try:
            self.on_finished(ready)
        except Exception:
            log.exception("watcher callback failed")

    # -- stage 2 ---------------------------------------------------------------------------

    def _inference_loop(self) -> None:
        stops = 0
        while stops < self._n_workers:
            item = self._prepared_q.get()
            if item is _STOP:
                stops += 1
                continue
            batch: list[Prepared] = [item]
            stops += self._gather(batch)
            model = self.holder.current()
            if model is None:  # cannot happen: stage 1 only prepares with a model
                continue
            try:
                self._predict_and_store(batch, model)
            except StoreError as exc:  # the state, not the files: the next start redoes them
                log.error("outcomes of %d file(s) not stored: %s", len(batch), exc)
            except Exception:
                log.exception("inference batch of %d files failed; retrying one by one", len(batch))
                for p in batch:
                    try:
                        self._predict_alone(p, model)
                    except Exception:  # this thread must outlive any one file
                        log.exception("file %s: no outcome stored", self.file_ref(p.ready.path))

    def _gather(self, batch: list[Prepared]) -> int:
        """Add already-prepared files to ``batch`` (briefly waiting only during a burst)."""
        stops = 0
        deadline = time.monotonic() + self.batch_wait_s
        burst = not self._prepared_q.empty() or not self._ready_q.empty()
        while len(batch) < self.files_per_batch:
            try:
                if burst:
                    item = self._prepared_q.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._prepared_q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stops += 1
                if stops >= self._n_workers:
                    break
                continue
            batch.append(item)
        return stops

    def _predict_alone(self, p: Prepared, model: OnnxModel) -> None:
        try:
            self._predict_and_store([p], model)
        except Exception as exc:
            self._release_sop(str(p.meta.sop_instance_uid))
            detail = f"{type(exc).__name__}: {exc}"
            self._finish_unusable(p.ready, "quarantined", "inference_error", detail, p.meta)

    def _refresh(self, batch: list[Prepared], model: OnnxModel) -> list[Prepared]:
        """Prepare again the files prepared for a model that was swapped out meanwhile."""
        key = model_key(model, self.preprocess_config)
        out: list[Prepared] = []
        for p in batch:
            redo = p if p.key == key else self._prepare(p.ready, model)
            if isinstance(redo, Prepared):
                out.append(redo)
            else:
                self._release_sop(str(p.meta.sop_instance_uid))
        return out

    def _infer(
        self, batch: list[Prepared], model: OnnxModel
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Labels, confidence, P(covid), ms and verdict per slice, in runs of
        ``slices_per_run``."""
        images = np.stack([f for p in batch for f in p.frames])[:, None, :, :]
        texture = None
        if model.info.needs_texture:
            texture = np.concatenate([p.texture for p in batch if p.texture is not None])
        labels: list[str] = []
        verdicts: list[str] = []
        conf, covid = np.zeros(len(images), np.float32), np.zeros(len(images), np.float32)
        infer_ms = np.zeros(len(images), np.float64)
        for lo in range(0, len(images), self.slices_per_run):
            hi = lo + self.slices_per_run
            t0 = time.perf_counter()
            pred = model.predict(images[lo:hi], None if texture is None else texture[lo:hi])
            infer_ms[lo:hi] = (time.perf_counter() - t0) * 1000.0 / len(pred)
            self.stats.batch(len(pred))
            labels += pred.labels
            verdicts += pred.verdicts or pred.labels
            conf[lo:hi], covid[lo:hi] = pred.confidence, pred.prob_covid
        return labels, conf, covid, infer_ms, verdicts

    def _predict_and_store(
        self, batch: list[Prepared], model: OnnxModel
    ) -> dict[str, list[dict[str, Any]]]:
        """Predict every frame of ``batch`` and store all files in one transaction."""
        batch = self._refresh(batch, model)
        if not batch:
            return {}
        labels, confidence, prob_covid, infer_ms, verdicts = self._infer(batch, model)
        version = model.info.model_version
        records: list[tuple[FileRecord, list[PredictionRow]]] = []
        notes: list[SeriesNote | None] = []
        i = 0
        now = time.monotonic()
        for p in batch:
            m, path = p.meta, str(p.ready.path)
            rows = []
            for frame in range(len(p.frames)):
                pc = float(prob_covid[i])
                rows.append(
                    PredictionRow(
                        sop_instance_uid=str(m.sop_instance_uid),
                        frame=frame,
                        series_instance_uid=_opt(m.series_instance_uid),
                        study_instance_uid=_opt(m.study_instance_uid),
                        patient_key=_opt(m.patient_key),
                        path=path,
                        label=labels[i],
                        confidence=float(confidence[i]),
                        prob_covid=None if np.isnan(pc) else pc,
                        model_version=version,
                        read_ms=p.read_ms,
                        preprocess_ms=p.preprocess_ms,
                        infer_ms=float(infer_ms[i]),
                        total_ms=(now - p.ready.detected) * 1000.0,
                        verdict=verdicts[i] if i < len(verdicts) else None,
                    )
                )
                i += 1
            sop, size, n = str(m.sop_instance_uid), p.ready.size, len(p.frames)
            rec = FileRecord(path, size, p.ready.mtime, sop, "predicted", None, n)
            records.append((rec, rows))
            notes.append(series_note(m, None))
        ids = self.store.record_files(records, notes)
        for p in batch:
            self._release_sop(str(p.meta.sop_instance_uid))
            self.stats.count("predicted", None)
            self.stats.observe_ms((time.monotonic() - p.ready.detected) * 1000.0, len(p.frames))
            self._safe_finish(p.ready)
            log.info(
                "file %s predicted (%d frame(s), model %s, %.0f ms)",
                self.file_ref(p.ready.path),
                len(p.frames),
                version,
                (time.monotonic() - p.ready.detected) * 1000.0,
            )
        log.debug("batch: %d files, %d slices, model %s", len(batch), len(labels), version)
        return {
            rec.path: [{"id": rid, **asdict(r)} for rid, r in zip(row_ids, rows, strict=True)]
            for (rec, rows), row_ids in zip(records, ids, strict=True)
        }


def series_note(meta: Any, skip_reason: str | None) -> SeriesNote | None:
    """The study/series header of a predicted (or skipped) slice, for the series tables;
    None when the file names no series (nothing to group)."""
    h = getattr(meta, "header", None)
    if h is None or not meta.series_instance_uid or not meta.study_instance_uid:
        return None
    return SeriesNote(
        study_instance_uid=str(meta.study_instance_uid),
        series_instance_uid=str(meta.series_instance_uid),
        sop_instance_uid=str(meta.sop_instance_uid),
        patient_key=_opt(meta.patient_key),
        modality=str(meta.modality or ""),
        header=h,
        skip_reason=skip_reason,
    )


def _opt(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)
