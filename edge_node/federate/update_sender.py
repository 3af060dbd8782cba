"""Send this node's contribution to a round: evaluation report, then the encoded weight delta.

After local training (``edge_node.train.trainer`` via ``edge_node.train.compute_service``):

1. ``delta = local - global`` (numpy, float32; only the trainable tensors when the round says
   ``trainable_only``), encoded with the round's codec (``fl_protocol.codecs``) and split into
   chunks of at most 1 MiB;
2. an ``UpdateManifest`` (signed with the node's Ed25519 key when ``federation.signing_key`` is
   configured) and the chunks go into the disk ``Outbox`` BEFORE anything is published, so a
   node killed mid-upload resends the very same update (same nonce: counted once);
3. the manifest is published on ``fl/F/round/R/update/N/manifest``, then every chunk on
   ``.../chunk/i`` (QoS 1);
4. the coordinator's ``Ack`` on ``fl/F/round/R/ack/N`` settles it: ``complete`` deletes it from
   the outbox, ``missing`` resends the listed chunks, ``stale`` / ``rejected`` / ``duplicate``
   drop it (logged with the reason). Without an answer the whole update is resent with
   exponential back-off while its round is open; an update whose round has closed is dropped.

The evaluation report (``fl/F/round/R/metrics/N``) carries the incoming global model's metrics on
the node's local validation split: aggregate numbers and the confusion matrix, nothing else. No
published byte carries a UID, path, patient key or pixel.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file

from edge_node.config import NodeConfig
from edge_node.errors import TrainingError
from edge_node.federate.model_sync import federation_dir
from edge_node.train.job import TrainResult
from fl_protocol import topics
from fl_protocol.chunking import DEFAULT_CHUNK_SIZE, Outbox, PendingUpdate, split
from fl_protocol.codecs import encode
from fl_protocol.errors import TransportError
from fl_protocol.files import write_atomic
from fl_protocol.metrics import Metrics
from fl_protocol.schemas import Ack, CalibrationReport, EvalReport, GlobalManifest, UpdateManifest
from fl_protocol.signing import load_private_key, sign_manifest
from fl_protocol.transport_base import Transport

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 30.0  # first resend of an unanswered update
MAX_BACKOFF_S = 300.0  # resends then double up to this
RETRY_S = 5.0  # after the broker refused a publish (not connected)
SUBMITTED_FILE = "submitted.json"
KEEP_SUBMITTED = 100  # rounds remembered as done (older ones can never be open again)
EVAL_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def compute_delta(
    local: dict[str, np.ndarray], base: dict[str, np.ndarray], keys: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """``local - base`` per tensor (float32 for float tensors); TrainingError on a mismatch."""
    names = sorted(base) if keys is None else sorted(keys)
    if set(local) != set(base):
        raise TrainingError("local and global weights have different tensors")
    delta: dict[str, np.ndarray] = {}
    for name in names:
        if name not in base:
            raise TrainingError(f"trainable tensor {name!r} is not in the global model")
        a, b = np.asarray(local[name]), np.asarray(base[name])
        if a.shape != b.shape:
            raise TrainingError(f"tensor {name!r}: local shape {a.shape} != global {b.shape}")
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            delta[name] = a.astype(np.float32) - b.astype(np.float32)
        else:
            delta[name] = a.astype(np.int64) - b.astype(np.int64)
    return delta


def metric_values(metrics: Metrics) -> dict[str, float]:
    """The finite scalar metrics (an undefined AUC is left out, never NaN)."""
    out: dict[str, float] = {}
    for key in EVAL_KEYS:
        value = getattr(metrics, key)
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def eval_report(
    round_: int,
    node: str,
    model_version: int,
    metrics: Metrics,
    calibration: dict[str, Any] | None = None,
) -> EvalReport:
    """What the node tells the coordinator about the incoming global model; ``calibration``:
    its aggregate calibration statistics (``TrainResult.init_val_calibration``), if any."""
    return EvalReport(
        round=round_,
        node=node,
        model_version=model_version,
        n_val=metrics.n,
        metrics=metric_values(metrics),
        confusion=metrics.confusion,
        calibration=CalibrationReport.from_dict(
            {**calibration, "schema": CalibrationReport.schema_id()}
        )
        if calibration
        else None,
    )


class UpdateSender:
    """Builds, stores, publishes and settles this node's updates (see the module docstring).

    Called from the federation client's worker thread only.
    """

    def __init__(
        self,
        config: NodeConfig,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.time,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.config = config
        self.chunk_size = chunk_size
        self.node = config.node_id
        self.federation = config.federation.federation
        self.transport = transport
        self.clock = clock
        self.ack_timeout_s = ack_timeout_s
        fed_dir = federation_dir(config)
        self.outbox = Outbox(fed_dir / "outbox")
        self._submitted_path = fed_dir / SUBMITTED_FILE
        # An update in the outbox counts as submitted even when a kill came between storing it
        # and writing the submitted list: a restarted node resends it, never trains it again.
        self._submitted = self._load_submitted() | {u.round for u in self.outbox.pending()}
        self.signing_key: Ed25519PrivateKey | None = None
        if config.federation.signing_key is not None:
            self.signing_key = load_private_key(config.federation.signing_key)
        self._next_send: dict[int, float] = {}  # round -> when to resend if still unanswered
        self._backoff: dict[int, float] = {}
        self.acks: list[Ack] = []  # every ack received (status API, tests)
        self.dp_epsilon: float | None = None  # privacy spent so far (DP on), a number only

    # -- bookkeeping -----------------------------------------------------------------------

    def _load_submitted(self) -> set[int]:
        try:
            return {int(r) for r in json.loads(self._submitted_path.read_text())}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, TypeError):
            log.warning("unreadable %s; assuming no round submitted", SUBMITTED_FILE)
            return set()

    def _mark_submitted(self, round_: int) -> None:
        self._submitted.add(round_)
        keep = sorted(self._submitted)[-KEEP_SUBMITTED:]
        self._submitted = set(keep)
        write_atomic(self._submitted_path, (json.dumps(keep) + "\n").encode())

    def has_submitted(self, round_: int) -> bool:
        """True once an update for ``round_`` was stored (whatever happened to it since)."""
        return round_ in self._submitted

    def pending(self) -> list[PendingUpdate]:
        return self.outbox.pending()

    # -- build -----------------------------------------------------------------------------

    def build(
        self, manifest: GlobalManifest, result: TrainResult, global_weights: Path
    ) -> PendingUpdate:
        """Delta -> codec -> chunks -> signed manifest -> outbox (nothing published yet)."""
        rc = manifest.round
        if rc is None:
            raise TrainingError("no open round to build an update for")
        if result.num_samples < 1:
            raise TrainingError("training used no samples; nothing to send")
        local, base = load_file(str(result.weights_path)), load_file(str(global_weights))
        keys = result.trainable_keys if rc.trainable_only else None
        delta = compute_delta(local, base, keys)
        delta = self._privatize(rc.round, delta)  # DP hook: identity unless dp_clip is set
        codec = rc.codec or self.config.federation.codec
        payload_manifest, chunks = split(encode(delta, codec), self.chunk_size)
        train_metrics = metric_values(result.train_metrics)
        train_metrics["epochs"] = float(result.epochs_run)
        if result.val_metrics is not None:
            train_metrics["val_accuracy"] = float(result.val_metrics.accuracy)
        update = UpdateManifest(
            federation=self.federation,
            round=rc.round,
            node=self.node,
            base_version=manifest.version,
            codec=codec,
            num_samples=result.num_samples,
            payload=payload_manifest,
            train_metrics=train_metrics,
        )
        if self.signing_key is not None:
            update = sign_manifest(update, self.signing_key, self.node)
        pending = self.outbox.put(update, chunks)
        self._mark_submitted(rc.round)
        log.info(
            "round %d: update stored (%s, %d tensor(s), %d bytes in %d chunk(s), %d samples)",
            rc.round, codec, len(delta), payload_manifest.total_size, len(chunks),
            result.num_samples,
        )  # fmt: skip
        return pending

    # -- differential privacy (edge_node/federate/privacy.py) -----------------------------

    def _privatize(self, round_: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Clip + noise the delta when ``[federation] dp_clip`` is set; else return it as is."""
        fed = self.config.federation
        if fed.dp_clip is None:
            return delta
        from edge_node.federate.privacy import DpParams, PrivacyLedger, privatize

        params = DpParams(fed.dp_clip, fed.dp_noise_multiplier, fed.dp_delta)
        noisy, outcome = privatize(delta, params, np.random.default_rng())  # OS entropy
        ledger = PrivacyLedger(federation_dir(self.config) / "privacy.json")
        ledger.record(round_, params.noise_multiplier)
        self.dp_epsilon = ledger.epsilon(params.delta)
        log.info(
            "round %d: DP update (clip %.4g, norm %.4g, sigma %.4g); epsilon %.4g at delta %.2g "
            "over %d round(s)",
            round_, params.clip, outcome.norm, outcome.sigma, self.dp_epsilon, params.delta,
            len(ledger.rounds),
        )  # fmt: skip
        return noisy

    # -- publish ---------------------------------------------------------------------------

    def send(self, pending: PendingUpdate, indices: Iterable[int] | None = None) -> bool:
        """Publish the manifest then every chunk, or only the chunks ``indices``; False if the
        broker could not take them (the update stays in the outbox and is resent later)."""
        round_ = pending.round
        todo = range(pending.num_chunks) if indices is None else sorted(set(indices))
        try:
            if indices is None:  # a partial resend answers a coordinator that has the manifest
                self.transport.publish(
                    topics.update_manifest(self.federation, round_, self.node),
                    pending.manifest.to_bytes(),
                    qos=1,
                )
            for i in todo:
                if not 0 <= i < pending.num_chunks:
                    log.warning("round %d: coordinator asked for chunk %d of %d", round_, i,
                                pending.num_chunks)  # fmt: skip
                    continue
                self.transport.publish(
                    topics.update_chunk(self.federation, round_, self.node, i),
                    pending.chunk(i),
                    qos=1,
                )
        except TransportError as exc:
            log.warning("round %d: update not sent (%s); will retry", round_, exc)
            self._next_send[round_] = self.clock() + min(RETRY_S, self.ack_timeout_s)
            return False
        backoff = self._backoff.setdefault(round_, self.ack_timeout_s)
        self._next_send[round_] = self.clock() + backoff
        log.info("round %d: update published (%d chunk(s))", round_, len(todo))
        return True

    def resend_soon(self) -> None:
        """After a (re)connect: resend every pending update at the next ``service``."""
        self._next_send.clear()

    def publish_eval(self, report: EvalReport) -> bool:
        try:
            self.transport.publish(
                topics.eval_report(self.federation, report.round, self.node),
                report.to_bytes(),
                qos=1,
            )
        except TransportError as exc:
            log.warning("round %d: evaluation report not sent: %s", report.round, exc)
            return False
        log.info("round %d: evaluation of global model %d sent (n_val=%d, accuracy %.3f)",
                 report.round, report.model_version, report.n_val,
                 report.metrics.get("accuracy", float("nan")))  # fmt: skip
        return True

    # -- acks and resends ------------------------------------------------------------------

    def on_ack(self, ack: Ack) -> None:
        if ack.node != self.node:
            return
        self.acks.append(ack)
        pending = self.outbox.get(ack.round)
        if pending is None:
            log.debug("round %d: ack %s for an update no longer pending", ack.round, ack.status)
            return
        if ack.status == "missing":
            log.info("round %d: coordinator misses %d chunk(s); resending", ack.round,
                     len(ack.missing))  # fmt: skip
            self.send(pending, ack.missing if ack.missing else None)
            return
        self._forget(ack.round)
        if ack.status == "complete":
            log.info("round %d: update acknowledged by the coordinator", ack.round)
        elif ack.status == "duplicate":
            log.info("round %d: coordinator already had this update", ack.round)
        else:
            log.warning("round %d: update %s by the coordinator: %s", ack.round, ack.status,
                        ack.reason or "no reason given")  # fmt: skip

    def _forget(self, round_: int) -> None:
        self.outbox.ack(round_)
        self._next_send.pop(round_, None)
        self._backoff.pop(round_, None)

    def service(self, open_round: int | None) -> None:
        """Resend what is due for the open round; drop pending updates of closed rounds.

        ``open_round`` is the round of the latest global manifest (None between rounds).
        """
        now = self.clock()
        for pending in self.outbox.pending():
            r = pending.round
            if r != open_round:
                log.warning("round %d closed before the coordinator acknowledged this node's "
                            "update; dropping it", r)  # fmt: skip
                self._forget(r)
                continue
            due = self._next_send.get(r)
            if due is None:  # never sent by this process (restart) or just reconnected
                self.send(pending)
            elif now >= due:
                backoff = min(self._backoff.get(r, self.ack_timeout_s) * 2, MAX_BACKOFF_S)
                self._backoff[r] = backoff
                log.info("round %d: no answer from the coordinator; resending", r)
                self.send(pending)
