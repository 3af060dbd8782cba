"""The coordinator's main loop: wire state, strategy, publisher, receiver and round machine to a
``Transport``, then process messages on one worker thread until the last round is done.

MQTT handlers only put messages on a queue; ``step()`` takes them off and dispatches them
(update manifests and chunks to the receiver, eval reports to the state), then lets the
receiver ask for missing chunks and the round machine check its deadline. Tests drive ``step``
directly over ``MemoryTransport`` with a fake clock; ``run`` loops it against a real broker. A
``TransportError`` during a transition (broker gone) is not fatal: once connected again the
machine resumes from the durable state, exactly as after a restart.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from coordinator.aggregate import Hook
from coordinator.config import CoordinatorConfig, RoundsConfig
from coordinator.model_init import ModelSource, ensure_initial_version, torch_model_source
from coordinator.onnx_artifact import OnnxArtifacts, OnnxExporter, torch_onnx_exporter
from coordinator.publisher import ManifestSigner, ModelIdentity, Publisher
from coordinator.receiver import Receiver
from coordinator.reports import store_eval_report
from coordinator.rounds import RoundMachine
from coordinator.state import State
from coordinator.strategy import Strategy, create_strategy
from coordinator.trust import NodeKeys
from fl_protocol import topics
from fl_protocol.errors import SchemaError, TransportError
from fl_protocol.schemas import GlobalManifest
from fl_protocol.transport import Message, MqttSettings, PahoTransport, Transport

log = logging.getLogger(__name__)

COORDINATOR_KEY_ID = "coordinator"


def build_strategy(rounds: RoundsConfig) -> Strategy:
    """The configured strategy; FedProx takes ``rounds.mu`` unless strategy_args sets it."""
    kwargs: dict[str, Any] = dict(rounds.strategy_args)
    if rounds.strategy == "fedprox":
        kwargs.setdefault("mu", rounds.mu)
    return create_strategy(rounds.strategy, **kwargs)


def build_signer(cfg: CoordinatorConfig) -> ManifestSigner | None:
    if cfg.signing_key is None:
        return None
    from fl_protocol.signing import load_private_key, sign_manifest

    key = load_private_key(cfg.signing_key)

    def sign(manifest: GlobalManifest) -> GlobalManifest:
        return sign_manifest(manifest, key, COORDINATOR_KEY_ID)

    return sign


def mqtt_settings(cfg: CoordinatorConfig, port: int | None = None) -> MqttSettings:
    """Settings for the configured broker (or the embedded one on ``port``)."""
    b = cfg.broker
    if b.url is None:
        return MqttSettings(
            host=b.embedded_host, port=port or b.embedded_port, client_id=b.client_id
        )
    return MqttSettings.from_url(
        b.url,
        b.client_id,
        keepalive=b.keepalive_s,
        ca_file=None if b.ca_file is None else str(b.ca_file),
        cert_file=None if b.cert_file is None else str(b.cert_file),
        key_file=None if b.key_file is None else str(b.key_file),
    )


@contextlib.contextmanager
def broker_transport(cfg: CoordinatorConfig) -> Iterator[Transport]:
    """A PahoTransport to the configured broker, starting the embedded broker when none is
    configured (its port is written to ``state_dir/broker.port``)."""
    if cfg.broker.url is not None:
        yield PahoTransport(mqtt_settings(cfg))
        return
    from fl_protocol.broker import EmbeddedBroker

    broker = EmbeddedBroker(
        host=cfg.broker.embedded_host,
        port=cfg.broker.embedded_port,
        max_queued=cfg.broker.embedded_max_queued_messages,
        max_queued_bytes=cfg.broker.embedded_max_queued_bytes,
    )
    port = broker.start()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "broker.port").write_text(f"{port}\n")
    log.info("embedded MQTT broker on %s:%d", cfg.broker.embedded_host, port)
    try:
        yield PahoTransport(mqtt_settings(cfg, port))
    finally:
        broker.stop()


class CoordinatorService:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        transport: Transport,
        *,
        model_source: ModelSource = torch_model_source,
        clock: Callable[[], float] = time.time,
        hook: Hook | None = None,
        onnx_exporter: OnnxExporter | None = None,
    ) -> None:
        """``onnx_exporter``: makes the ONNX file published beside each version's weights
        (``run_from_config`` passes the torch one; None publishes weights only)."""
        self.cfg = cfg
        self.transport = transport
        self.clock = clock
        self.state = State(cfg.state_dir)
        self.model = ensure_initial_version(self.state, cfg.model, model_source)
        self.strategy = build_strategy(cfg.rounds)
        onnx = None
        if onnx_exporter is not None and cfg.model.publish_onnx:
            onnx = OnnxArtifacts(
                self.state,
                window_center=cfg.model.window_center,
                window_width=cfg.model.window_width,
                exporter=onnx_exporter,
            )
        self.publisher = Publisher(
            transport,
            cfg.federation,
            self.state,
            ModelIdentity(self.model.arch, self.model.texture_dim),
            build_signer(cfg),
            onnx=onnx,
        )
        verify = None
        if cfg.node_keys_dir is not None:
            verify = NodeKeys(cfg.node_keys_dir, cfg.revoked_file).verify
        self.machine = RoundMachine(
            cfg, self.state, self.strategy, self.publisher, self.model, clock, hook, verify
        )
        self.receiver = Receiver(
            transport,
            cfg.federation,
            self.machine,
            cfg.state_dir / "incoming",
            cfg.rounds.chunk_timeout_s,
            clock,
        )
        self.machine.receiver = self.receiver
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._needs_resume = True
        transport.subscribe(topics.updates_filter(cfg.federation), self._inbox.put)
        transport.subscribe(topics.eval_reports_filter(cfg.federation), self._inbox.put)

    @property
    def done(self) -> bool:
        return self.machine.done

    def start(self) -> None:
        """Connect and resume (or begin) the rounds."""
        log.info("coordinator config: %s", self.cfg.describe())
        self.transport.connect()
        self._resume()

    def _resume(self) -> None:
        try:
            self.machine.start()
            self._needs_resume = False
        except TransportError as exc:
            log.warning("broker unavailable (%s); resuming when it is back", exc)
            self._needs_resume = True

    def step(self, timeout: float = 0.0) -> int:
        """Handle the queued messages (waiting up to ``timeout`` for the first), then the
        timers. Returns the number of messages handled."""
        handled = 0
        try:
            message: Message | None = self._inbox.get(timeout=timeout) if timeout > 0 else None
        except queue.Empty:
            message = None
        try:
            while True:
                if message is None:
                    try:
                        message = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                self._dispatch(message)
                handled += 1
                message = None
            self.receiver.tick()
            if self._needs_resume:
                if self.transport.is_connected:
                    self._resume()
            else:
                self.machine.tick()
        except TransportError as exc:
            log.warning("broker error (%s); resuming from the state once reconnected", exc)
            self._needs_resume = True
        return handled

    def _dispatch(self, message: Message) -> None:
        try:
            info = topics.parse_topic(message.topic)
        except SchemaError:
            log.debug("ignoring topic %s", message.topic[:80])
            return
        if info.federation != self.cfg.federation:
            return
        if info.kind == "update_manifest":
            self.receiver.on_manifest(info, message.payload)
        elif info.kind == "update_chunk":
            self.receiver.on_chunk(info, message.payload)
        elif info.kind == "eval_report":
            store_eval_report(self.state, info, message.payload)

    def run(self, stop: threading.Event | None = None, poll_s: float = 0.2) -> int:
        """Run until every round is done (then wait ``rounds.eval_wait_s`` for the last
        evaluation reports) or ``stop`` is set. Returns an exit code."""
        stop = stop or threading.Event()
        self.start()
        while not self.done and not stop.is_set():
            self.step(poll_s)
        wait_until = time.monotonic() + self.cfg.rounds.eval_wait_s
        while self.done and not stop.is_set() and time.monotonic() < wait_until:
            self.step(poll_s)
        self.close()
        return 0

    def close(self) -> None:
        with contextlib.suppress(TransportError):
            self.transport.disconnect()
        self.state.close()


def run_from_config(cfg: CoordinatorConfig, stop: threading.Event | None = None) -> int:
    """``fedscan coordinator run``: the real broker (or the embedded one), the torch zoo, and
    an ONNX export of every version for predict-only nodes (``[model] publish_onnx``)."""
    with broker_transport(cfg) as transport:
        service = CoordinatorService(cfg, transport, onnx_exporter=torch_onnx_exporter)
        return service.run(stop)


def read_broker_port(state_dir: Path) -> int | None:
    """The embedded broker's port written at start-up (for tools and tests)."""
    try:
        return int((Path(state_dir) / "broker.port").read_text().strip())
    except (OSError, ValueError):
        return None
