"""The edge node's federation client: follow the global model, train in rounds, send updates.

``FederationClient(config, on_new_model, transport=None)`` talks MQTT through the narrow
``fl_protocol`` ``Transport`` (``PahoTransport`` from ``[federation]`` by default, a
``MemoryTransport`` in unit tests). Transport handlers only queue messages; one worker thread
does everything else in order (``step()`` / ``tick()``; tests drive them directly):

- ``fl/F/global/current`` (retained): a verified manifest of a newer version starts the fetch
  of its chunks (``edge_node.federate.model_sync``); once installed, ``on_new_model(path, version)``
  swaps the served model. An older version is refused (rollback), a bad signature too.
- When the manifest's round is open (deadline ahead), this node has not contributed to it yet,
  holds that round's global model and has at least ``round.min_labels`` labels: train from the
  global weights with the round's settings (``edge_node.train.compute_service``: a low-priority
  subprocess), publish the evaluation of the incoming model on the local validation split, and
  the encoded delta (``edge_node.federate.update_sender``: outbox first, then publish, then acks).
- ``fl/F/round/+/ack/N``: settles the pending update (complete, missing chunks, stale, ...).
- ``fl/F/node/N/status`` (retained): online with the served model version and capabilities on
  every connect and after every swap; the last will says offline.

Without the ``train`` extra (no torch: the predict-only install) the node cannot export or
train: it follows the global model through the coordinator's ONNX export of each version
(``fl/F/global/V/onnx/i``, see ``edge_node.federate.model_sync``), reports the ``predict`` and
``sync`` capabilities, and never trains, evaluates or sends an update.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_node.config import NodeConfig
from edge_node.errors import NodeError
from edge_node.federate.model_sync import ModelSync, NewModelCallback, federation_dir
from edge_node.federate.update_sender import ACK_TIMEOUT_S, UpdateSender, eval_report
from edge_node.labels import LabelBook
from edge_node.train.compute_service import Compute, WorkerCompute, torch_available
from edge_node.train.job import TrainJob
from fl_protocol import topics
from fl_protocol.errors import ProtocolError, ReplayError, SignatureError, TransportError
from fl_protocol.schemas import Ack, GlobalManifest, NodeStatus
from fl_protocol.transport_base import Message, MqttSettings, Transport

log = logging.getLogger(__name__)

TICK_S = 1.0  # worker wake-up period for resends and deferred training
LABEL_CHECK_S = 10.0  # how often to recount labels while a round waits for enough of them
CONNECT_RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class _Connected:
    """Queued by the transport's connect callback."""


_STOP = object()
Event = Message | _Connected | object


def make_transport(config: NodeConfig, client_suffix: str = "") -> Transport:
    """A ``PahoTransport`` for ``[federation]`` (TLS when ``ca_file`` is set).

    The client id is stable per node (``fedscan-node-<id>``) so the broker keeps its session
    (QoS 1 messages queued while it is away); a tool running beside the daemon adds a suffix
    so that it does not take the daemon's session over."""
    from fl_protocol.transport import PahoTransport

    fed = config.federation

    def opt(p: Path | None) -> str | None:
        return None if p is None else str(p)

    settings = MqttSettings.from_url(
        fed.broker,
        client_id=f"fedscan-node-{config.node_id}{client_suffix}",
        ca_file=opt(fed.ca_file),
        cert_file=opt(fed.cert_file),
        key_file=opt(fed.key_file),
    )
    return PahoTransport(settings)


class FederationClient:
    """One node's side of the federation (see the module docstring)."""

    def __init__(
        self,
        config: NodeConfig,
        on_new_model: NewModelCallback,
        transport: Transport | None = None,
        *,
        compute: Compute | None = None,
        clock: Callable[[], float] = time.time,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        label_check_s: float = LABEL_CHECK_S,
        can_train: bool | None = None,
        participate: bool = True,
    ) -> None:
        self.config = config
        self.node = config.node_id
        self.federation = config.federation.federation
        self.transport = transport if transport is not None else make_transport(config)
        self.compute = (
            compute
            if compute is not None
            else WorkerCompute(config.training.torch_threads, config.training.nice)
        )
        self.clock = clock
        self.label_check_s = label_check_s
        self.can_train = torch_available() if can_train is None else can_train
        self.participate = participate  # False: follow the global model only (fedscan node sync)
        federation_dir(config).mkdir(parents=True, exist_ok=True)
        self.sync = ModelSync(config, self.compute, on_new_model, can_export=self.can_train)
        self.sender = UpdateSender(config, self.transport, clock=clock, ack_timeout_s=ack_timeout_s)
        self.manifest: GlobalManifest | None = None  # latest verified global manifest
        self._events: queue.Queue[Event] = queue.Queue()
        self._chunk_filter: str | None = None
        self._failed_rounds: set[int] = set()
        self._next_label_check = 0.0
        self._waiting_logged: set[int] = set()
        self._wired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_tick = 0.0
        if not self.can_train:
            log.info(
                "federation: predict-only node (torch / onnx, the 'train' extra, are not "
                "installed): it installs the coordinator's ONNX export of each global model, "
                "and does not train or evaluate (install fedscan[train] for that)"
            )

    # -- wiring ----------------------------------------------------------------------------

    @property
    def capabilities(self) -> tuple[str, ...]:
        caps = ["predict", "sync"]  # sync: from the weights, or from the ONNX export
        if self.can_train:
            caps += ["eval", "train"]
        if self.config.federation.safety_margin is not None and self.can_train:
            caps.append("safety_gate")  # the gate evaluates with torch
        return tuple(caps)

    def _status(self, state: str) -> bytes:
        return NodeStatus(
            node=self.node,
            state=state,
            model_version=self.sync.state.served_version,
            capabilities=self.capabilities,
        ).to_bytes()

    def _wire(self) -> None:
        if self._wired:
            return
        self._wired = True
        if self.participate:
            self.transport.set_will(
                topics.node_status(self.federation, self.node),
                self._status("offline"),
                retain=True,
            )
            acks = topics.acks_filter(self.federation, self.node)
            self.transport.subscribe(acks, self._events.put)
        self.transport.subscribe(topics.global_current(self.federation), self._events.put)
        self.transport.add_connect_callback(lambda: self._events.put(_Connected()))

    def connect(self) -> None:
        """Subscribe and connect (no worker thread: drive with ``step`` / ``run_until_idle``)."""
        self._wire()
        self.transport.connect()

    def start(self) -> None:
        """Connect (retrying while the broker is away) and process events in a thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="federation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Publish "offline", disconnect, and stop the worker (pending updates stay on disk)."""
        self._stop.set()
        self._events.put(_STOP)
        # A running training or export is interrupted (the trainer resumes from its checkpoint
        # next time), so shutting the daemon down never waits for a job.
        self.compute.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("federation worker still busy (training?); leaving it behind")
        self._thread = None
        if self.participate and self.transport.is_connected:
            try:
                self.transport.publish(
                    topics.node_status(self.federation, self.node),
                    self._status("offline"),
                    qos=1,
                    retain=True,
                )
            except TransportError as exc:
                log.warning("could not publish offline status: %s", exc)
        try:
            self.transport.disconnect()
        finally:
            self.sync.close()

    def _run(self) -> None:
        delay = 1.0
        prestart = getattr(self.compute, "prestart", None)
        if self.can_train and self.participate and prestart is not None:
            try:
                prestart()  # torch loads in the worker while we connect and fetch
            except OSError as exc:
                log.warning("cannot start the compute worker yet: %s", exc)
        self._wire()
        while not self._stop.is_set():
            try:
                self.transport.connect()
                break
            except TransportError as exc:
                log.warning("federation broker unreachable (%s); retrying in %.0f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, CONNECT_RETRY_MAX_S)
        while not self._stop.is_set():
            try:
                self.step(timeout=TICK_S)
                if time.monotonic() - self._last_tick >= TICK_S:
                    self.tick()
            except Exception:  # the client must outlive any one bad message or failed job
                log.exception("federation worker error")

    # -- event processing ------------------------------------------------------------------

    def step(self, timeout: float | None = 0.0) -> bool:
        """Handle one queued event; False if none came within ``timeout`` seconds."""
        try:
            event = self._events.get(timeout=timeout) if timeout else self._events.get_nowait()
        except queue.Empty:
            return False
        if event is _STOP:
            return False
        if isinstance(event, _Connected):
            self._on_connected()
        elif isinstance(event, Message):
            self._on_message(event)
        return True

    def run_until_idle(self, max_events: int = 100_000) -> int:
        """Handle every queued event (and what they cause), then ``tick``; returns the count."""
        n = 0
        while n < max_events:
            while self.step():
                n += 1
            self.tick()
            if self._events.empty():
                return n
        return n

    def tick(self) -> None:
        """Periodic work: resend unanswered updates, train once enough labels arrived."""
        self._last_tick = time.monotonic()
        if self.manifest is None:
            return
        if not self.participate:
            return
        open_round = self.manifest.round.round if self.manifest.round is not None else None
        self.sender.service(open_round)
        self._maybe_train()

    def status(self) -> dict[str, Any]:
        """A snapshot for the local API / logs (no identifiers: versions and rounds only)."""
        st = self.sync.state
        m = self.manifest
        return {
            "federation": self.federation,
            "node": self.node,
            "connected": self.transport.is_connected,
            "capabilities": list(self.capabilities),
            "global_version": m.version if m else None,
            "open_round": m.round.round if m and m.round else None,
            "installed_version": st.installed_version,
            "served_version": st.served_version,
            "refused_version": st.refused_version,
            "fetching_version": self.sync.fetching.version if self.sync.fetching else None,
            "pending_rounds": [p.round for p in self.sender.pending()],
            "last_ack": (
                {"round": self.sender.acks[-1].round, "status": self.sender.acks[-1].status}
                if self.sender.acks
                else None
            ),
        }

    def _on_connected(self) -> None:
        log.info("federation %s: connected as node %s", self.federation, self.node)
        self._publish_status()
        self.sender.resend_soon()

    def _publish_status(self) -> None:
        if not self.participate:
            return
        try:
            self.transport.publish(
                topics.node_status(self.federation, self.node),
                self._status("online"),
                qos=1,
                retain=True,
            )
        except TransportError as exc:
            log.warning("could not publish node status: %s", exc)

    def _on_message(self, msg: Message) -> None:
        try:
            info = topics.parse_topic(msg.topic)
        except ProtocolError:
            log.debug("ignoring message on an unknown topic")
            return
        if info.federation != self.federation:
            return
        try:
            if info.kind == "global_current":
                if msg.payload:  # an empty retained payload only clears the topic
                    self._on_manifest(GlobalManifest.from_bytes(msg.payload))
            elif info.kind == "global_chunk" and info.version is not None:
                self._on_chunk(info.version, info.index or 0, msg.payload)
            elif info.kind == "global_onnx_chunk" and info.version is not None:
                self._on_chunk(info.version, info.index or 0, msg.payload, onnx=True)
            elif info.kind == "ack" and info.node == self.node:
                self.sender.on_ack(Ack.from_bytes(msg.payload))
        except SignatureError as exc:
            log.error("refused a global manifest: %s", exc)
        except ReplayError as exc:
            log.warning("refused a global manifest: %s", exc)
        except ProtocolError as exc:
            log.warning("refused a %s message: %s", info.kind, exc)

    def _on_manifest(self, manifest: GlobalManifest) -> None:
        self.sync.check_manifest(manifest)
        self.manifest = manifest
        if self.sync.offer(manifest):
            self._follow_chunks(manifest.version, onnx=self.sync.fetching_onnx)
        self.tick()

    def _follow_chunks(self, version: int | None, *, onnx: bool = False) -> None:
        if self._chunk_filter is not None:
            self.transport.unsubscribe(self._chunk_filter)
            self._chunk_filter = None
        if version is not None:
            if onnx:
                self._chunk_filter = topics.global_onnx_filter(self.federation, version)
            else:
                self._chunk_filter = topics.global_chunks_filter(self.federation, version)
            self.transport.subscribe(self._chunk_filter, self._events.put)

    def _on_chunk(self, version: int, index: int, data: bytes, *, onnx: bool = False) -> None:
        if not self.sync.add_chunk(version, index, data, onnx=onnx):
            return
        self._follow_chunks(None)
        installed = self.sync.complete()
        if installed is not None and installed.served:
            self._publish_status()
        self.tick()

    # -- rounds ----------------------------------------------------------------------------

    def _count_labels(self) -> int:
        book = LabelBook(self.config.paths.database)
        try:
            if self.config.paths.inbox.is_dir():
                book.ingest_folder(self.config.paths.inbox)
            return sum(book.counts().values())
        finally:
            book.close()

    def _maybe_train(self) -> None:
        m = self.manifest
        if m is None or m.round is None or not self.can_train:
            return
        rc = m.round
        if self.sender.has_submitted(rc.round) or rc.round in self._failed_rounds:
            return
        now = self.clock()
        if rc.deadline_ts <= now:
            return
        if self.sync.state.installed_version != m.version:
            return  # the round's global model is still being fetched
        if now < self._next_label_check:
            return
        try:
            n_labels = self._count_labels()
        except NodeError as exc:
            log.error("round %d: cannot count labels: %s", rc.round, exc)
            n_labels = 0
        if n_labels < rc.min_labels:
            self._next_label_check = now + self.label_check_s
            if rc.round not in self._waiting_logged:
                self._waiting_logged.add(rc.round)
                log.info("round %d: %d label(s), %d needed; not training yet", rc.round,
                         n_labels, rc.min_labels)  # fmt: skip
            return
        self._train_round(m)

    def _train_round(self, m: GlobalManifest) -> None:
        rc = m.round
        if rc is None:
            return
        log.info("round %d: training from global model %d (%s, %d epoch(s), mu=%g)",
                 rc.round, m.version, rc.train_mode, rc.local_epochs, rc.mu)  # fmt: skip
        try:
            job = TrainJob.from_config(
                self.config,
                out_dir=federation_dir(self.config) / "rounds" / f"round-{rc.round}",
                init_weights=self.sync.global_weights,
                mode=rc.train_mode,
                epochs=rc.local_epochs,
                lr=rc.lr,
                lr_schedule="constant",  # the coordinator schedules across rounds
                batch_size=rc.batch_size,
                seed=rc.seed,
                mu=rc.mu,
            )
            result = self.compute.train(job)
        except NodeError as exc:
            self._failed_rounds.add(rc.round)
            log.error("round %d: local training failed: %s", rc.round, exc)
            return
        if result.init_val_metrics is not None and result.init_val_metrics.n > 0:
            self.sender.publish_eval(
                eval_report(
                    rc.round,
                    self.node,
                    m.version,
                    result.init_val_metrics,
                    result.init_val_calibration,
                )
            )
        else:
            log.info("round %d: no local validation slices; no evaluation report", rc.round)
        try:
            pending = self.sender.build(m, result, self.sync.global_weights)
        except (NodeError, ProtocolError) as exc:
            self._failed_rounds.add(rc.round)
            log.error("round %d: update not built: %s", rc.round, exc)
            return
        self.sender.send(pending)
