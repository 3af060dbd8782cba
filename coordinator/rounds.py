"""The round state machine: open -> collecting -> aggregating -> closed, durable at each step.

    open         round row committed (config, deadline, version_in); manifest not yet published
    collecting   retained global manifest carries the round config; updates are accepted
    aggregating  quorum + deadline reached (or every expected node reported): see aggregate.py
    closed       new version committed with the close, or closed without one (no quorum)

Collecting ends when the deadline has passed with at least ``min_nodes`` accepted updates, or
as soon as every node of ``expected_nodes`` has reported with the quorum met. The quorum counts
the updates aggregation would use (``aggregate.screen_updates``): one that would be refused as
an outlier does not close the round early, and a round whose other updates still meet the
quorum is aggregated from them. A round that
reaches its deadline without quorum is extended once by ``round_timeout_s`` (manifest
republished with the new deadline), then closed without a new version; the next round opens
from the same global version. Round ids run 1..``num_rounds`` across restarts.

``start()`` resumes whatever the state says: an ``open`` round is published again, a
``collecting`` one keeps its deadline, an ``aggregating`` one is recomputed from the spool, and
after a ``closed`` one the next opens. Every update is admitted (``admit``) before its chunks
are collected and recorded (``complete``) in one row keyed (round, node): it is counted once.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from coordinator.aggregate import Hook, Screening, aggregate_round, screen_updates
from coordinator.config import CoordinatorConfig
from coordinator.errors import StateError, UpdateRejected
from coordinator.publisher import Publisher
from coordinator.receiver import Receiver
from coordinator.state import RoundRow, State, UpdateRow
from coordinator.strategy import Strategy
from coordinator.validate import ModelSpec, check_node, check_num_samples, check_round
from coordinator.validate import validate_update as validate_delta
from fl_protocol import codecs
from fl_protocol.errors import CodecError, ProtocolError
from fl_protocol.files import write_atomic
from fl_protocol.schedule import scheduled_lr
from fl_protocol.schemas import Ack, RoundConfig, UpdateManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchInfo:
    """What the coordinator knows about the architecture (computed once at start-up)."""

    arch: str
    texture_dim: int
    init: str  # random | hub | the weights file name
    trainable_keys: Mapping[str, frozenset[str]]  # train mode -> state keys it trains

    def metadata(self) -> dict[str, str]:
        """safetensors metadata of every checkpoint (export.weights' format)."""
        return {
            "format": "fedscan.weights/1",
            "arch": self.arch,
            "texture_dim": str(self.texture_dim),
            "init": self.init,
        }


class RoundMachine:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        state: State,
        strategy: Strategy,
        publisher: Publisher,
        model: ArchInfo,
        clock: Callable[[], float],
        hook: Hook | None = None,
        verify_update: Callable[[UpdateManifest], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rounds = cfg.rounds
        self.state = state
        self.strategy = strategy
        self.publisher = publisher
        self.model = model
        self.clock = clock
        self.hook: Hook = hook or (lambda _phase: None)
        self.verify_update = verify_update
        self.receiver: Receiver | None = None  # wired by the service
        self.current: RoundRow | None = None  # the collecting round
        self.done = False
        self._spec: ModelSpec | None = None
        self._spec_key: tuple[int, str | None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Resume from the state (a version 0 must exist)."""
        last = self.state.last_round()
        if last is None:
            self._next_round(0)
        elif last.status == "closed":
            self._next_round(last.id)
        elif last.status == "aggregating":
            log.info("resuming round %d: aggregating again from the spool", last.id)
            self._aggregate(last)
        else:
            log.info("resuming round %d (%s)", last.id, last.status)
            self._publish_and_collect(last)

    def tick(self) -> None:
        """Advance the collecting round if its end condition holds."""
        rnd = self.current
        if rnd is None or self.done:
            return
        now = self.clock()
        rows = self.state.updates(rnd.id)
        # what would count now: an update that aggregation would refuse does not make a quorum
        screen = self._screen([u for u in rows if u.accepted])
        accepted = screen.counted
        quorum = accepted >= self.rounds.min_nodes
        expected = set(self.rounds.expected_nodes)
        if expected and quorum and expected <= {u.node for u in rows}:
            log.info("round %d: every expected node reported (%d accepted)", rnd.id, accepted)
            self._aggregate(rnd)
        elif now < rnd.deadline:
            return
        elif quorum:
            self._aggregate(rnd)
        elif not rnd.extended:
            deadline = rnd.deadline + self.rounds.round_timeout_s
            log.warning(
                "round %d: deadline without quorum (%d of %d): extended once",
                rnd.id,
                accepted,
                self.rounds.min_nodes,
            )
            self.state.extend_deadline(rnd.id, deadline)
            self._publish_and_collect(self.state.round(rnd.id))
        else:
            log.warning(
                "round %d: no quorum (%d of %d) after the extension: closed without a new version",
                rnd.id,
                accepted,
                self.rounds.min_nodes,
            )
            for node in screen.outliers:
                log.warning("round %d: update of node %s refused: norm_outlier", rnd.id, node)
            outliers = dict.fromkeys(screen.outliers, "norm_outlier")
            self.state.close_round(rnd.id, "no_quorum", now, outliers=outliers)
            self._after_close(rnd.id)

    # -- transitions ---------------------------------------------------------------------------

    def _next_round(self, last_id: int) -> None:
        latest = self.state.latest_version()
        if latest is None:
            raise StateError("no global version 0 in the state")
        if last_id >= self.rounds.num_rounds:
            self.publisher.publish_manifest(latest.version, None)
            self.publisher.retire_before(latest.version - 1)
            log.info("all %d rounds done; global model v%d", self.rounds.num_rounds, latest.version)
            self.current = None
            self.done = True
            return
        now = self.clock()
        config = RoundConfig(
            round=last_id + 1,
            deadline_ts=now + self.rounds.round_timeout_s,
            strategy=self.rounds.strategy,
            mu=float(self.strategy.round_config().get("mu", self.rounds.mu)),
            codec=self.rounds.codec,
            trainable_only=self.rounds.trainable_only,
            train_mode=self.rounds.train_mode,
            local_epochs=self.rounds.local_epochs,
            lr=scheduled_lr(
                self.rounds.lr,
                self.rounds.lr_schedule,
                min(last_id, self.rounds.num_rounds - 1),
                self.rounds.num_rounds,
            ),
            batch_size=self.rounds.batch_size,
            min_labels=self.rounds.min_labels,
            seed=self.rounds.seed + last_id + 1,
        )
        rnd = self.state.open_round(
            config.round, config.to_dict(), now, config.deadline_ts, latest.version
        )
        log.info("round %d opened on global v%d", rnd.id, latest.version)
        self.hook("round_opened")
        self._publish_and_collect(rnd)
        self.publisher.retire_before(latest.version - 1)

    def _screen(self, accepted: list[UpdateRow]) -> Screening:
        return screen_updates(
            accepted,
            weighted=self.strategy.weighted,
            max_weight_share=self.cfg.validation.max_weight_share,
            max_norm_ratio=self.cfg.validation.max_norm_ratio,
        )

    def _round_config(self, rnd: RoundRow) -> RoundConfig:
        config = RoundConfig.from_dict(rnd.config)
        return dataclasses.replace(config, deadline_ts=rnd.deadline)

    def _publish_and_collect(self, rnd: RoundRow) -> None:
        self.publisher.publish_manifest(rnd.version_in, self._round_config(rnd))
        if rnd.status == "open":
            self.state.set_status(rnd.id, "collecting")
            self.hook("round_published")
        self.current = self.state.round(rnd.id)
        if self.receiver is not None:
            self.receiver.open_round = rnd.id

    def _aggregate(self, rnd: RoundRow) -> None:
        if rnd.status != "aggregating":
            self.state.set_status(rnd.id, "aggregating")
            self.hook("aggregating")
        self.current = None
        if self.receiver is not None:
            self.receiver.open_round = None
        aggregate_round(
            self.state,
            self.state.round(rnd.id),
            self.strategy,
            min_nodes=self.rounds.min_nodes,
            max_norm_ratio=self.cfg.validation.max_norm_ratio,
            metadata=self.model.metadata(),
            now=self.clock(),
            hook=self.hook,
            max_weight_share=self.cfg.validation.max_weight_share,
        )
        self._after_close(rnd.id)

    def _after_close(self, round_id: int) -> None:
        self.current = None
        if self.receiver is not None:
            self.receiver.open_round = None
            self.receiver.forget_round(round_id)
        shutil.rmtree(self.state.spool / f"round_{round_id}", ignore_errors=True)
        self._next_round(round_id)

    # -- updates (UpdateSink) ------------------------------------------------------------------

    def admit(self, manifest: UpdateManifest) -> Ack | None:
        """Refuse at once what cannot count (see ``coordinator.validate`` reason codes)."""
        rnd, node = self.current, manifest.node
        try:
            check_round(
                self.cfg.federation,
                manifest.federation,
                manifest.round,
                None if rnd is None else rnd.id,
            )
        except UpdateRejected as exc:
            log.info("update of node %s for round %d: %s", node, manifest.round, exc.reason)
            return Ack(round=manifest.round, node=node, status="stale", reason=str(exc)[:200])
        if rnd is None:  # unreachable: check_round refuses when no round is open
            raise StateError("no open round")
        previous = self.state.get_update(rnd.id, node)
        if previous is not None and previous.accepted:
            same = previous.nonce == manifest.nonce
            return Ack(
                round=rnd.id,
                node=node,
                status="complete" if same else "duplicate",
                reason="" if same else "an update of this node is already counted",
            )
        try:
            check_node(node, self.rounds.expected_nodes)
            check_num_samples(manifest.num_samples, self.cfg.validation.max_num_samples)
            if manifest.base_version != rnd.version_in:
                raise UpdateRejected("base_version", f"global v{rnd.version_in} is current")
            if manifest.codec not in codecs.list_codecs():
                raise UpdateRejected("codec", f"unknown codec {manifest.codec!r}")
            if self.verify_update is not None:
                try:
                    self.verify_update(manifest)
                except ProtocolError as exc:
                    raise UpdateRejected("signature", str(exc)) from exc
        except UpdateRejected as exc:
            return self._reject(rnd.id, manifest, exc)
        return None

    def complete(self, manifest: UpdateManifest, payload: bytes) -> Ack:
        """Decode, validate, spool and record one complete update."""
        early = self.admit(manifest)  # the round may have closed while chunks were arriving
        if early is not None:
            return early
        rnd = self.current
        if rnd is None:  # unreachable: admit() answers "stale" when no round is open
            raise StateError("no open round")
        try:
            try:
                delta = codecs.decode(payload)
            except CodecError as exc:
                raise UpdateRejected("codec", str(exc)) from exc
            norms = [u.norm for u in self.state.updates(rnd.id, accepted=True) if u.norm]
            norm = validate_delta(
                delta, manifest.num_samples, self._spec_for(rnd), self.cfg.validation, norms
            )
        except UpdateRejected as exc:
            return self._reject(rnd.id, manifest, exc)
        del delta
        path = self.state.spool_path(rnd.id, manifest.node)
        # verified wire bytes, decoded again to aggregate
        write_atomic(path, payload, sync_dir=True)
        self.hook("update_spooled")
        self.state.record_update(
            UpdateRow(
                round=rnd.id,
                node=manifest.node,
                nonce=manifest.nonce,
                num_samples=manifest.num_samples,
                accepted=True,
                reason=None,
                norm=norm,
                spool_path=str(path.relative_to(self.state.dir)),
                counted_in_aggregate=False,
                received_at=self.clock(),
            )
        )
        log.info(
            "round %d: update of node %s accepted (%d samples, norm %.4g)",
            rnd.id,
            manifest.node,
            manifest.num_samples,
            norm,
        )
        self.hook("update_recorded")
        return Ack(round=rnd.id, node=manifest.node, status="complete")

    def _reject(self, round_id: int, manifest: UpdateManifest, exc: UpdateRejected) -> Ack:
        log.warning("round %d: update of node %s rejected: %s", round_id, manifest.node, exc)
        self.state.record_update(
            UpdateRow(
                round=round_id,
                node=manifest.node,
                nonce=manifest.nonce,
                num_samples=manifest.num_samples,
                accepted=False,
                reason=exc.reason,
                norm=None,
                spool_path=None,
                counted_in_aggregate=False,
                received_at=self.clock(),
            )
        )
        return Ack(round=round_id, node=manifest.node, status="rejected", reason=str(exc)[:200])

    def _spec_for(self, rnd: RoundRow) -> ModelSpec:
        """What updates of ``rnd`` must look like (its own config: trainable-only or not)."""
        config = self._round_config(rnd)
        mode = config.train_mode if config.trainable_only else None
        if self._spec is None or self._spec_key != (rnd.version_in, mode):
            weights, _meta = self.state.load_checkpoint(rnd.version_in)
            expected = None if mode is None else self.model.trainable_keys[mode]
            self._spec = ModelSpec.from_weights(weights, expected)
            self._spec_key = (rnd.version_in, mode)
        return self._spec
