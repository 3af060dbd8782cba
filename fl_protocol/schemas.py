"""JSON messages of the federation: frozen dataclasses, canonical bytes, strict parsing.

Every message carries ``"schema": "fedscan.<kind>/<version>"`` (version 1 for every kind but a
global manifest that carries an ONNX export, version 2). ``to_bytes()`` writes canonical JSON
(sorted keys, no spaces, ASCII) so that signatures cover exactly one byte string;
``Cls.from_bytes(data)`` refuses anything that is not exactly that message: another kind or
schema version, unknown or missing fields, wrong types, bools where numbers belong, NaN or
infinity, negative counts, bad hex digests, more than 64 KiB. Construction in code runs the
same checks (``__post_init__``), so a sender cannot build what a receiver would refuse.

Privacy: there is no free-form field. Ids are ``[A-Za-z0-9_-]{1,64}``, names (codec, arch,
strategy, metric keys, capabilities) ``[A-Za-z0-9_.-]{1,64}``, the only prose is ``Ack.reason``
(at most 256 printable characters, written by the coordinator). Nothing here can carry a DICOM
tag, UID, path or pixel: only counts, hashes, model hyper-parameters and aggregate metrics.
Sequences are stored as tuples (lists are accepted and converted).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import secrets
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, Union, get_args, get_origin, get_type_hints

from fl_protocol.errors import SchemaError
from fl_protocol.topics import check_id, check_number

SCHEMA_VERSION = 1
ONNX_MANIFEST_VERSION = 2  # a global manifest with the ``onnx`` artifact (older builds refuse it)
MAX_MESSAGE_BYTES = 64 * 1024  # a manifest of ~900 chunks; anything bigger is refused
MAX_CHUNK_SIZE = 1024 * 1024  # chunks are at most 1 MiB (broker max packet is 2 MiB)
MAX_ITEMS = 4096  # any list in a message
MAX_MAP_ITEMS = 64  # metric dictionaries
MAX_STR = 256
# what a node trains: everything, the last backbone stage + head, or the head only (the one
# list; export.net.TrainMode spells the same names for torch, checked by the tests)
TRAIN_MODES: tuple[str, ...] = ("full", "last_stage", "head")
ACK_STATUSES = ("complete", "missing", "stale", "rejected", "duplicate")
NODE_STATES = ("online", "offline")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_SCHEMA_RE = re.compile(r"fedscan\.([a-z_]{1,32})/([0-9]{1,6})")


def new_nonce() -> str:
    """16 random bytes as hex: makes every update manifest unique (replay detection)."""
    return secrets.token_hex(16)


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise SchemaError(f"invalid {what} {value[:80]!r}: use 1-64 of [A-Za-z0-9_.-]")
    return value


def check_sha256(value: str, what: str = "sha256") -> str:
    if not _HEX64_RE.fullmatch(value):
        raise SchemaError(f"invalid {what}: expected 64 lowercase hex digits")
    return value


def _check_signature(value: str | None) -> None:
    if value is None:
        return
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise SchemaError("signature is not base64") from None
    if len(raw) != 64:
        raise SchemaError("signature must be 64 bytes (Ed25519), base64-encoded")


def _reject_constant(name: str) -> Any:
    raise SchemaError(f"non-finite number {name} in message")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SchemaError(f"duplicate key {key[:40]!r} in message")
        out[key] = value
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the field annotation ``tp``; return the normalised value."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: expected true/false")
        return value
    if tp is int:
        return check_number(value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SchemaError(f"{where}: expected a number")
        if not math.isfinite(value):
            raise SchemaError(f"{where}: must be finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or len(value) > MAX_STR:
            raise SchemaError(f"{where}: expected a string of at most {MAX_STR} characters")
        return value
    if origin is Sequence:  # stored as a tuple; lists are accepted
        if not isinstance(value, list | tuple) or len(value) > MAX_ITEMS:
            raise SchemaError(f"{where}: expected a list of at most {MAX_ITEMS} items")
        return tuple(_coerce(v, args[0], f"{where}[]") for v in value)
    if origin is dict:
        if not isinstance(value, dict) or len(value) > MAX_MAP_ITEMS:
            raise SchemaError(f"{where}: expected an object of at most {MAX_MAP_ITEMS} entries")
        return {
            check_name(_coerce(k, str, where), f"{where} key"): _coerce(v, args[1], f"{where}.{k}")
            for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, JsonMessage):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value)
        raise SchemaError(f"{where}: expected a {tp.KIND} object")
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in this module, not bad input


def _to_json(value: Any) -> Any:
    if isinstance(value, JsonMessage):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


class JsonMessage:
    """Base of every message: generic (de)serialisation driven by the field annotations."""

    KIND: ClassVar[str]
    VERSIONS: ClassVar[tuple[int, ...]] = (SCHEMA_VERSION,)  # schema versions this build reads
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()  # fields newer than schema version 1

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            where = f"{self.KIND}.{f.name}"
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], where))
        self._validate()

    def _validate(self) -> None:
        """Checks beyond types (ranges, formats, consistency); overridden per message."""

    @classmethod
    def schema_id(cls) -> str:
        return f"fedscan.{cls.KIND}/{SCHEMA_VERSION}"

    def schema_version(self) -> int:
        """The schema version this message is written in (its fields decide)."""
        return SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {
            f.name: _to_json(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not (f.name in self.OMIT_IF_NONE and getattr(self, f.name) is None)
        }
        out["schema"] = f"fedscan.{self.KIND}/{self.schema_version()}"
        return out

    def to_bytes(self) -> bytes:
        data = json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")
        if len(data) > MAX_MESSAGE_BYTES:
            raise SchemaError(f"{self.KIND} is {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
        return data

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        if not isinstance(obj, dict):
            raise SchemaError(f"{cls.KIND}: expected a JSON object")
        version = check_schema(obj.get("schema"), cls.KIND, cls.VERSIONS)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(obj) - names - {"schema"})
        if unknown:
            raise SchemaError(f"{cls.KIND}: unknown field(s) {[u[:40] for u in unknown[:5]]}")
        try:
            msg = cls(**{k: v for k, v in obj.items() if k != "schema"})
        except TypeError as exc:  # missing required fields
            raise SchemaError(f"{cls.KIND}: {exc}") from None
        if msg.schema_version() != version:  # e.g. a version-1 manifest with an ONNX export
            raise SchemaError(
                f"{cls.KIND}: fields of schema version {msg.schema_version()} "
                f"in a version {version} message"
            )
        return msg

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SchemaError(f"{cls.KIND}: expected bytes")
        if len(data) > MAX_MESSAGE_BYTES:
            raise SchemaError(f"{cls.KIND}: message of {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
        try:
            obj = json.loads(
                bytes(data).decode("utf-8"),
                parse_constant=_reject_constant,
                object_pairs_hook=_no_duplicates,
            )
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SchemaError(f"{cls.KIND}: not valid JSON ({type(exc).__name__})") from None
        return cls.from_dict(obj)


def check_schema(schema: Any, kind: str, versions: Sequence[int] = (SCHEMA_VERSION,)) -> int:
    """Refuse a message of another kind or an unsupported schema version, saying which;
    returns the version."""
    want = f"fedscan.{kind}/{versions[-1]}"
    match = _SCHEMA_RE.fullmatch(schema) if isinstance(schema, str) else None
    if match is None:
        raise SchemaError(f"expected a {want} message, got schema {str(schema)[:60]!r}")
    if match.group(1) != kind:
        raise SchemaError(f"expected a {want} message, got a {match.group(1)} message")
    version = int(match.group(2))
    if version not in versions:
        supported = " or ".join(str(v) for v in versions)
        raise SchemaError(
            f"{kind} schema version {version} is not supported "
            f"(this build supports version {supported}; upgrade fedscan to read newer messages)"
        )
    return version


@dataclass(frozen=True)
class PayloadManifest(JsonMessage):
    """Size and SHA-256 of a chunked payload and of each chunk (see chunking.split)."""

    KIND: ClassVar[str] = "payload"
    total_size: int  # bytes of the whole payload
    sha256: str  # hex digest of the whole payload
    chunk_size: int  # bytes per chunk (the last one may be shorter), <= 1 MiB
    chunk_sha256: Sequence[str]  # hex digest of each chunk, in order (a tuple)

    def _validate(self) -> None:
        check_sha256(self.sha256)
        for digest in self.chunk_sha256:
            check_sha256(digest, "chunk sha256")
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise SchemaError(f"payload.chunk_size must be in [1, {MAX_CHUNK_SIZE}]")
        expected = -(-self.total_size // self.chunk_size)
        if len(self.chunk_sha256) != expected:
            raise SchemaError(
                f"payload: {len(self.chunk_sha256)} chunk digests for {self.total_size} bytes "
                f"in chunks of {self.chunk_size} (expected {expected})"
            )

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sha256)

    def chunk_length(self, index: int) -> int:
        """Expected byte length of chunk ``index``."""
        return min(self.chunk_size, self.total_size - index * self.chunk_size)


@dataclass(frozen=True)
class RoundConfig(JsonMessage):
    """What the coordinator asks nodes to do in an open round."""

    KIND: ClassVar[str] = "round_config"
    round: int  # round number; updates for any other round are stale
    deadline_ts: float  # unix time after which the coordinator may aggregate without you
    strategy: str = "fedavg"  # aggregation strategy name (coordinator registry)
    mu: float = 0.0  # FedProx proximal term weight (0 = plain local SGD)
    codec: str = "fp16"  # update codec name (fl_protocol.codecs registry)
    trainable_only: bool = False  # send only the tensors trainable in train_mode
    train_mode: str = "full"  # full | last_stage | head
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    min_labels: int = 8  # labelled slices a node needs before it trains this round
    seed: int = 0

    def _validate(self) -> None:
        check_name(self.strategy, "strategy")
        check_name(self.codec, "codec")
        if self.train_mode not in TRAIN_MODES:
            raise SchemaError(f"round_config.train_mode must be one of {TRAIN_MODES}")
        if self.mu < 0 or self.lr <= 0 or self.deadline_ts < 0:
            raise SchemaError("round_config: mu and deadline_ts must be >= 0, lr > 0")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise SchemaError("round_config: local_epochs and batch_size must be >= 1")


@dataclass(frozen=True)
class ServingPoint(JsonMessage):
    """The operating point the coordinator wrote into its ONNX export of a global version
    (temperature, threshold, uncertain band: ``fl_protocol.calibration``), repeated in the
    manifest so a training node, which exports the weights itself, serves the same one."""

    KIND: ClassVar[str] = "serving_point"
    temperature: float
    threshold: float
    uncertain_band: float
    n_val: int  # validation slices (over the nodes) it was fitted on
    calibration_version: int  # the global version whose validation reports it was fitted from

    def _validate(self) -> None:
        if not 0.01 <= self.temperature <= 100.0:
            raise SchemaError("serving_point.temperature must be in [0.01, 100]")
        if not 0.0 < self.threshold < 1.0:
            raise SchemaError("serving_point.threshold must be in (0, 1)")
        if not 0.0 <= self.uncertain_band < 0.5:
            raise SchemaError("serving_point.uncertain_band must be in [0, 0.5)")
        if self.n_val < 0 or self.calibration_version < 0:
            raise SchemaError("serving_point.n_val and calibration_version must be >= 0")

    def metadata(self) -> dict[str, str]:
        """The ``fedscan.*`` ONNX metadata entries (as ``OperatingPoint.metadata`` writes them)."""
        from fl_protocol.calibration import point_metadata

        entries = point_metadata(self.temperature, self.threshold, self.uncertain_band, self.n_val)
        return {**entries, "fedscan.calibration_version": str(self.calibration_version)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ServingPoint | None:
        """Read back from ONNX metadata; None when it carries no operating point."""
        if "fedscan.temperature" not in meta:
            return None
        try:
            return cls(
                temperature=float(meta["fedscan.temperature"]),
                threshold=float(meta["fedscan.threshold"]),
                uncertain_band=float(meta["fedscan.uncertain_band"]),
                n_val=int(meta.get("fedscan.calibration_n_val", "0")),
                calibration_version=int(meta.get("fedscan.calibration_version", "0")),
            )
        except (KeyError, ValueError) as exc:
            raise SchemaError(f"serving_point: unreadable ONNX metadata ({exc})") from None


@dataclass(frozen=True)
class GlobalManifest(JsonMessage):
    """Retained on fl/F/global/current: the current global model and the open round."""

    KIND: ClassVar[str] = "global_manifest"
    VERSIONS: ClassVar[tuple[int, ...]] = (1, ONNX_MANIFEST_VERSION)
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"onnx", "operating_point"})
    federation: str
    version: int  # global model version; never goes back (ReplayGuard)
    arch: str  # export.zoo architecture name
    texture_dim: int  # 0 or edge_node.ingest.texture.TEXTURE_DIM
    payload: PayloadManifest  # the safetensors weights, chunked on fl/F/global/V/chunk/i
    round: RoundConfig | None = None  # the open round, None between rounds
    created_at: float = field(default_factory=time.time)
    signature: str | None = None  # base64 Ed25519 over to_bytes() with signature=None
    key_id: str | None = None  # which coordinator key signed
    # The coordinator's parity-checked ONNX export of the same weights (what predict-only nodes
    # install), chunked on fl/F/global/V/onnx/i; present = schema version 2, absent = 1.
    onnx: PayloadManifest | None = None
    # The operating point inside that ONNX export (schema version 2 too): training nodes put it
    # into their own export of the weights. Absent when the export has none (no reports yet).
    operating_point: ServingPoint | None = None

    def schema_version(self) -> int:
        if self.onnx is not None or self.operating_point is not None:
            return ONNX_MANIFEST_VERSION
        return SCHEMA_VERSION

    def _validate(self) -> None:
        check_id(self.federation, "federation")
        check_name(self.arch, "arch")
        if self.key_id is not None:
            check_id(self.key_id, "key_id")
        _check_signature(self.signature)


@dataclass(frozen=True)
class UpdateManifest(JsonMessage):
    """A node's encoded weight delta for one round, chunked on .../update/N/chunk/i."""

    KIND: ClassVar[str] = "update_manifest"
    federation: str
    round: int
    node: str
    base_version: int  # global version the delta is relative to
    codec: str  # codec the payload was encoded with
    num_samples: int  # training samples (FedAvg weight), >= 1
    payload: PayloadManifest
    train_metrics: dict[str, float] = field(default_factory=dict)  # e.g. loss, accuracy
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex
    created_at: float = field(default_factory=time.time)
    signature: str | None = None  # base64 Ed25519 by the node's key
    key_id: str | None = None

    def _validate(self) -> None:
        check_id(self.federation, "federation")
        check_id(self.node, "node")
        check_name(self.codec, "codec")
        if self.num_samples < 1:
            raise SchemaError("update_manifest.num_samples must be >= 1")
        if not _NONCE_RE.fullmatch(self.nonce):
            raise SchemaError("update_manifest.nonce must be 32 lowercase hex digits")
        if self.key_id is not None:
            check_id(self.key_id, "key_id")
        _check_signature(self.signature)


@dataclass(frozen=True)
class Ack(JsonMessage):
    """The coordinator's answer to a node's update for a round."""

    KIND: ClassVar[str] = "ack"
    round: int
    node: str
    status: str  # complete | missing | stale | rejected | duplicate
    missing: Sequence[int] = ()  # chunk indices to resend (status "missing"), a tuple
    reason: str = ""  # short human-readable cause for stale / rejected

    def _validate(self) -> None:
        check_id(self.node, "node")
        if self.status not in ACK_STATUSES:
            raise SchemaError(f"ack.status must be one of {ACK_STATUSES}")
        if not self.reason.isprintable():
            raise SchemaError("ack.reason must be printable text")


@dataclass(frozen=True)
class NodeStatus(JsonMessage):
    """Retained on fl/F/node/N/status; the last will publishes state "offline"."""

    KIND: ClassVar[str] = "node_status"
    node: str
    state: str  # online | offline
    model_version: int | None = None  # global version served, None if none yet
    capabilities: Sequence[str] = ()  # e.g. "train", "eval" (a tuple)
    ts: float = field(default_factory=time.time)

    def _validate(self) -> None:
        check_id(self.node, "node")
        if self.state not in NODE_STATES:
            raise SchemaError(f"node_status.state must be one of {NODE_STATES}")
        if len(self.capabilities) > 32:
            raise SchemaError("node_status: at most 32 capabilities")
        for cap in self.capabilities:
            check_name(cap, "capability")


@dataclass(frozen=True)
class CalibrationReport(JsonMessage):
    """Aggregate calibration statistics of a node's validation slices on the fixed grids of
    ``fl_protocol.calibration`` (``GRID_ID``): summed NLL per temperature and, per logit
    margin, how many covid / non-covid slices reach it. Counts and sums only."""

    KIND: ClassVar[str] = "calibration"
    grid: str
    n_pos: int
    n_neg: int
    nll_sum: Sequence[float]
    pos_at_or_above: Sequence[int]
    neg_at_or_above: Sequence[int]

    def _validate(self) -> None:
        from fl_protocol.calibration import CalibrationError, CalibrationStats

        try:
            CalibrationStats.from_dict(self.to_dict())
        except CalibrationError as exc:
            raise SchemaError(f"calibration: {exc}") from None


EVAL_CALIBRATION_VERSION = 2  # an eval report with calibration statistics


@dataclass(frozen=True)
class EvalReport(JsonMessage):
    """A node's metrics of global model ``model_version`` on its local validation slices.

    Metrics that are undefined (AUC with one class present) are omitted, never NaN.
    ``confusion`` is [[tn, fp], [fn, tp]] with covid positive, summing to ``n_val``.
    ``calibration`` (schema version 2, optional): the same slices' calibration statistics,
    from which the coordinator fits the temperature and threshold of the federation's model.
    """

    KIND: ClassVar[str] = "eval_report"
    VERSIONS: ClassVar[tuple[int, ...]] = (1, EVAL_CALIBRATION_VERSION)
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"calibration"})
    round: int
    node: str
    model_version: int
    n_val: int
    metrics: dict[str, float]
    confusion: Sequence[Sequence[int]]  # ((tn, fp), (fn, tp))
    calibration: CalibrationReport | None = None

    def schema_version(self) -> int:
        return 1 if self.calibration is None else EVAL_CALIBRATION_VERSION

    def _validate(self) -> None:
        check_id(self.node, "node")
        if len(self.confusion) != 2 or any(len(row) != 2 for row in self.confusion):
            raise SchemaError("eval_report.confusion must be [[tn, fp], [fn, tp]]")
        if sum(self.confusion[0]) + sum(self.confusion[1]) != self.n_val:
            raise SchemaError("eval_report: confusion matrix does not sum to n_val")
        c = self.calibration
        if c is not None and c.n_pos + c.n_neg != self.n_val:
            raise SchemaError("eval_report: calibration counts do not sum to n_val")
