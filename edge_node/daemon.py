"""The edge node daemon: config -> store, model holder, watcher, pipeline, model monitor, API.

``Daemon.run()`` blocks until SIGTERM/SIGINT (or ``stop()``), then drains: the watcher stops
handing over files, every file already handed over is predicted and stored, the API closes,
and ``run`` returns 0. Files still being written are not waited for: the catch-up scan at the
next start finds them. A model file replaced on disk is loaded, checked and swapped in
atomically by the model monitor; the federation client calls ``holder.swap()`` directly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from edge_node.config import NodeConfig
from edge_node.errors import ConfigError, ModelError
from edge_node.federate.model_refusal import RefusedModels
from edge_node.file_modes import tighten_state
from edge_node.ingest.quarantine import Quarantine
from edge_node.ingest.watcher import Watcher, inbox_relative
from edge_node.retention import RetentionSweeper
from edge_node.serve.inference import ModelHolder
from edge_node.serve.pipeline import Pipeline
from edge_node.serve.stats import DicomStats, PipelineStats
from edge_node.state_lock import StateLock
from edge_node.store import Store
from fl_protocol.files import sha256_file, write_atomic

log = logging.getLogger(__name__)

MODEL_POLL_S = 0.5  # how often the model file is checked for a replacement


class ModelMonitor:
    """Swaps in the model file whenever its (size, mtime, inode) changes and it loads."""

    def __init__(self, path: Path, holder: ModelHolder, poll_s: float = MODEL_POLL_S) -> None:
        self.path = path
        self.holder = holder
        self.poll_s = poll_s
        self._seen: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # A replacement that failed to load and then stayed unchanged for refuse_after_s (not a
        # copy still in progress) is moved aside; the served model goes back in its place.
        self.refusals = RefusedModels(path)
        self.refuse_after_s = max(2 * poll_s, 1.0)
        self._failed: tuple[tuple[int, int, int], float, str] | None = None
        holder.on_swap(lambda m: self.refusals.keep_served(m.info.path, m.info.sha256))

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def load_now(self) -> bool:
        """Load the file if it is there (at start); raises ModelError if it cannot be used."""
        sig = self._signature()
        if sig is None:
            return False
        self._seen = sig
        self.holder.swap(self.path)
        return True

    def check(self) -> None:
        sig = self._signature()
        if sig is None or sig == self._seen:
            failed = self._failed
            if (
                sig is not None
                and failed is not None
                and failed[0] == sig
                and time.monotonic() - failed[1] >= self.refuse_after_s
            ):
                self._refuse(failed[2])
            return
        self._seen = sig
        self._failed = None
        current = self.holder.current()
        try:
            if current is not None and current.info.sha256 == sha256_file(self.path):
                return  # touched or copied over with the same content
            self.holder.swap(self.path)
        except ModelError as exc:
            # A half-copied file fails here and loads on the next change; the old model serves.
            log.error(
                "new model file not used, still serving %s: %s",
                current.info.model_version if current else None,
                exc,
            )
            self._failed = (sig, time.monotonic(), str(exc))

    def _refuse(self, reason: str) -> None:
        self._failed = None
        current = self.holder.current()
        self.refusals.refuse(reason, current.info.sha256 if current else None)
        self._seen = self._signature()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="model-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:
                log.exception("model monitor check failed")


def _chest_policy(config: NodeConfig) -> Any:
    if not config.series.chest_only:
        return None
    from edge_node.series.chest import ChestPolicy

    return ChestPolicy(min_lung_air=config.series.min_lung_air)


class Daemon:
    """One running edge node."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        paths = config.paths
        # The inbox is the PACS's folder: the node never creates or writes it, so a missing or
        # mistyped one is a configuration error, not an empty folder watched forever.
        check_inbox(paths.inbox)
        for folder in (paths.state_dir, paths.quarantine_dir, paths.model_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = StateLock(paths.state_dir)
        self.lock.acquire()  # one node per state dir; ConfigError (exit 2) names the holder
        try:
            self._open(config)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, config: NodeConfig) -> None:
        paths = config.paths
        self.store = Store(paths.database)
        # patient data at rest: owner-only, whatever umask an earlier run had (file_modes)
        toml = (config.source,) if config.source else ()
        tighten_state(paths.state_dir, paths.quarantine_dir, toml)
        self.retention = RetentionSweeper(config)  # uploads, thumbnails, quarantine by age
        self.holder = ModelHolder(config.inference.intra_op_threads)
        self.stats = PipelineStats()
        self.pipeline = Pipeline(
            holder=self.holder,
            store=self.store,
            # no copy of a file too large to read (limit:file_size): its reason file only
            quarantine=Quarantine(paths.quarantine_dir, config.preprocess.max_dataset_mb << 20),
            preprocess=config.preprocess,
            files_per_batch=config.watcher.batch_size,
            slices_per_run=config.inference.batch_size,
            batch_wait_ms=config.watcher.batch_wait_ms,
            stats=self.stats,
            decoding_dir=paths.state.decoding,  # crash-loop guard (serve/crash_guard.py)
            chest=_chest_policy(config),  # [series] chest_only: skip head, abdomen, scouts
        )
        # A file the previous process died decoding (a native decoder abort) is quarantined
        # now, so that the catch-up scan below does not hand it over again: no crash loop.
        crashed = self.pipeline.recover_crashed()
        if crashed:
            log.error("%d file(s) quarantined: the previous run died decoding them", crashed)
        self.watcher = Watcher(
            paths.inbox, config.watcher, self.pipeline.submit, known=self.store.file_signatures()
        )
        self.pipeline.on_finished = self.watcher.finished
        self.pipeline.on_retry = self.watcher.retry
        self.watcher.on_ignored = self.pipeline.record_ignored  # one row for every inbox file
        if config.watcher.log_paths:
            self.pipeline.file_ref = functools.partial(inbox_relative, self.watcher.inbox)
        self.monitor = ModelMonitor(config.model_path, self.holder)
        self.api: ApiServerLike | None = None
        self.federation: FederationLike | None = None
        self.dicom_stats = DicomStats()
        self.dicom: DicomLike | None = None  # [dicom] listener / sender (edge_node/dicomnet)
        self.series_tracker = self._series_tracker(config)  # None when [series] is off
        self._stop = threading.Event()
        self.started_at = time.time()

    def start(self) -> None:
        log.info("config: %s", json.dumps(self.config.describe(), default=str, sort_keys=True))
        if not self.monitor.load_now():
            if self.config.inference.model is not None:
                raise ModelError(f"model file not found: {self.config.model_path}")
            log.warning(
                "no model at %s yet: files wait until one is installed", self.config.model_path
            )
        self._log_window()
        self.holder.on_swap(lambda _m: self._log_window())
        self.pipeline.start()
        self.watcher.start()
        self.monitor.start()
        self.retention.start()
        if self.series_tracker is not None:
            self.series_tracker.start()  # open series of an earlier run complete as well
        self._start_dicom()
        if self.config.api.enabled:
            from edge_node.serve.api import ApiServer

            self.api = ApiServer(self)
            try:
                port = self.api.start()
            except OSError as exc:
                self.api = None
                where = f"{self.config.api.host}:{self.config.api.port}"
                raise ConfigError(f"api: cannot listen on {where}: {exc.strerror}") from exc
            # atomic: a reader (operator script, test) never sees an empty file
            write_atomic(self.config.paths.state.api_port, f"{port}\n".encode())
            log.info(
                "API on http://%s:%d (token %s)",
                self.config.api.host,
                port,
                "required" if self.config.api.token else "off",
            )
        if self.config.federation.enabled:
            self._start_federation()
        log.info("node %s running", self.config.node_id)

    def _series_tracker(self, config: NodeConfig) -> Any:
        """Completes series and queues their DICOM results (edge_node.series, .results)."""
        if not config.series.enabled:
            return None
        from edge_node.results.publish import ResultPublisher
        from edge_node.series.tracker import SeriesTracker, operating_point_of

        res = config.results
        publish = None
        if res.structured_report or res.secondary_capture:
            publish = ResultPublisher(
                config.paths.state.outbox,
                sr=res.structured_report,
                sc=res.secondary_capture,
                key_slices=res.key_slices,
            )

        def operating_point() -> Any:
            model = self.holder.current()
            return None if model is None else operating_point_of(model.info)

        return SeriesTracker(
            self.store,
            rule=config.series.rule,
            top_k=config.series.top_k,
            quiet_time_s=config.series.quiet_time_s,
            operating_point=operating_point,
            publish=publish,
            check_interval_s=config.series.check_interval_s,
        )

    def _start_dicom(self) -> None:
        """C-STORE SCP into the inbox and/or the outbox sender, when ``[dicom]`` asks for them."""
        dicom = self.config.dicom
        if not (dicom.listener.enabled or dicom.send_to.enabled or dicom.results_dir):
            return
        from edge_node.dicomnet.services import DicomServices

        self.dicom = DicomServices(self.config, self.dicom_stats)
        self.dicom.start()

    def _start_federation(self) -> None:
        """Follow the global model (and train in rounds); torch stays in its worker process."""
        from edge_node.federate.client import FederationClient

        def on_new_model(path: Path, version: int) -> None:
            self.holder.swap(path)  # checked and warmed up before it replaces the served one

        client = FederationClient(self.config, on_new_model)
        client.start()
        self.federation = client
        log.info(
            "federation %s via %s", self.config.federation.federation, self.config.federation.broker
        )

    def _log_window(self) -> None:
        model = self.holder.current()
        if model is None:
            return
        info, pre = model.info, self.config.preprocess
        if info.window_center is not None and info.window_width is not None:
            log.info(
                "lung window from model metadata: L%g/W%g (config L%g/W%g)",
                info.window_center,
                info.window_width,
                pre.window_center,
                pre.window_width,
            )
        else:
            log.info(
                "lung window from config: L%g/W%g (model has none)",
                pre.window_center,
                pre.window_width,
            )

    def stop(self) -> None:
        """Ask ``run`` to drain and return (thread- and signal-safe)."""
        self._stop.set()

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Stop intake, finish in-flight files, close everything; True if fully drained."""
        t0 = time.monotonic()
        if self.federation is not None:
            try:
                self.federation.stop()  # "offline" status; a running training job is interrupted
            except Exception:
                log.exception("federation client did not stop cleanly")
        if self.dicom is not None:
            self.dicom.stop_intake()  # no new instances while the pipeline drains
        self.watcher.stop()
        self.monitor.stop()
        self.retention.stop()
        drained = self.pipeline.drain(timeout)
        if self.series_tracker is not None:
            self.series_tracker.stop()
        if self.dicom is not None:
            self.dicom.stop()
        if self.api is not None:
            self.api.stop()
        self.store.close()
        self.lock.release()
        log.info(
            "node stopped (%s in %.0f ms)",
            "drained" if drained else "drain timed out",
            (time.monotonic() - t0) * 1000,
        )
        return drained

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain; returns the exit code (0)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        try:
            self.start()
        except BaseException:
            self.shutdown(timeout=5)  # whatever did start (threads, database) stops cleanly
            raise
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: draining", signal.Signals(signum).name)
        self._stop.set()


def check_inbox(inbox: Path) -> None:
    """Raise ``ConfigError`` (exit 2) unless ``inbox`` is a folder the node can list."""
    if not inbox.exists():
        raise ConfigError(
            f"[paths] inbox {inbox} does not exist (the node never creates its inbox: "
            "create it, or point [paths] inbox at the PACS export folder)"
        )
    if not inbox.is_dir():
        raise ConfigError(f"[paths] inbox {inbox} is not a folder")
    if not os.access(inbox, os.R_OK | os.X_OK):
        raise ConfigError(f"[paths] inbox {inbox} is not readable by this user")


class DicomLike(Protocol):
    """What the daemon needs from edge_node.dicomnet.services.DicomServices."""

    def stop_intake(self) -> None: ...

    def stop(self) -> None: ...

    def outbox_pending(self) -> int: ...


class FederationLike(Protocol):
    """What the daemon needs from edge_node.federate.client.FederationClient."""

    def stop(self, timeout: float = 10.0) -> None: ...


class ApiServerLike(Protocol):
    """What the daemon needs from the API server (edge_node.serve.api.ApiServer)."""

    def start(self) -> int: ...

    def stop(self) -> None: ...
