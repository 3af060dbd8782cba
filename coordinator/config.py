"""Typed configuration of the coordinator, loaded from one TOML file (``coordinator.toml``).

Every section is a frozen dataclass validated in ``__post_init__``; unknown keys are an error.
Relative paths are resolved against the directory of the TOML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from coordinator.errors import ConfigError
from fl_protocol.config_types import build_section, kind_of, read_toml, type_problem
from fl_protocol.schedule import SCHEDULES
from fl_protocol.schemas import TRAIN_MODES

T = TypeVar("T")

MIN_NODES_TRIMMED_MEAN = 3  # quorum a trimmed mean needs: one update cut at each end, one left
INIT_CHOICES = ("random", "hub", "file")


@dataclass(frozen=True)
class BrokerConfig:
    url: str | None = None  # mqtt://host:port or mqtts://host:port; None = embedded broker
    ca_file: Path | None = None  # TLS: CA certificate (mqtts)
    cert_file: Path | None = None  # TLS: the coordinator's client certificate
    key_file: Path | None = None  # TLS: the coordinator's client key
    client_id: str = "fedscan-coordinator"
    keepalive_s: int = 30
    embedded_host: str = "127.0.0.1"  # embedded broker: loopback only
    embedded_port: int = 1883  # embedded broker port; 0 = free port (written to state_dir)
    # embedded broker: what one client session may queue (offline or slow); beyond either
    # limit the oldest queued messages are dropped, with a warning (fl_protocol.broker)
    embedded_max_queued_messages: int = 10_000
    embedded_max_queued_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.url is not None:
            parsed = urlparse(self.url)
            if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
                raise ConfigError(
                    f"broker.url must be mqtt://host:port or mqtts://host:port, not {self.url!r}"
                )
            if parsed.scheme == "mqtts" and self.ca_file is None:
                raise ConfigError("broker: mqtts:// needs ca_file (the CA of the broker)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("broker: cert_file and key_file go together")
        if not 0 <= self.embedded_port < 65536:
            raise ConfigError("broker.embedded_port must be in [0, 65535]")
        if self.embedded_max_queued_messages < 1 or self.embedded_max_queued_bytes < 1:
            raise ConfigError("broker: embedded_max_queued_messages / _bytes must be >= 1")

    @property
    def embedded(self) -> bool:
        return self.url is None

    @property
    def tls(self) -> bool:
        return self.url is not None and urlparse(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return (urlparse(self.url).hostname or "") if self.url else self.embedded_host

    @property
    def port(self) -> int:
        if self.url is None:
            return self.embedded_port
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn2d"  # registry name in export.zoo
    texture_dim: int = 0  # 0 = no texture input
    init: str = "random"  # initial global weights: random | hub | file
    weights_file: Path | None = None  # init = "file": local pretrained weights
    seed: int = 0  # torch seed of the random init (version 0 is reproducible)
    # export each global version to ONNX once (parity-checked) and publish it beside the
    # weights: what predict-only nodes (no torch) install; training nodes use the weights
    publish_onnx: bool = True
    window_center: float = -600.0  # lung window (HU) written into the published ONNX metadata,
    window_width: float = 1500.0  # which predict-only nodes preprocess with

    def __post_init__(self) -> None:
        if not isinstance(self.publish_onnx, bool):
            raise ConfigError("model.publish_onnx must be true or false")
        if self.window_width <= 0:
            raise ConfigError("model.window_width must be > 0")
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"model.init must be one of {INIT_CHOICES}, not {self.init!r}")
        if self.init == "file" and self.weights_file is None:
            raise ConfigError("model.init = 'file' needs model.weights_file")
        if self.texture_dim < 0:
            raise ConfigError("model.texture_dim must be >= 0")

    @property
    def pretrained(self) -> str | None:
        """The ``pretrained`` argument of ``export.zoo.create_model``."""
        if self.init == "hub":
            return "hub"
        if self.init == "file":
            return str(self.weights_file)
        return None


@dataclass(frozen=True)
class RoundsConfig:
    num_rounds: int = 10  # rounds to run (counted from the first, across restarts)
    min_nodes: int = 2  # quorum: accepted updates needed to aggregate
    expected_nodes: tuple[str, ...] = ()  # if set: only these nodes; all reported = close early
    round_timeout_s: float = 600.0  # deadline after opening; extended once without quorum
    chunk_timeout_s: float = 30.0  # missing chunks are asked for after this quiet time
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | trimmed_mean
    strategy_args: dict[str, Any] = field(default_factory=dict)  # keyword args of the strategy
    codec: str = "fp16"  # update codec nodes must use (fp32 | fp16 | int8 | int8_channel)
    trainable_only: bool = False  # nodes send only the tensors train_mode trains
    train_mode: str = "full"  # full | last_stage | head
    local_epochs: int = 1
    lr: float = 1e-3
    # constant | cosine: round r of num_rounds trains at scheduled_lr(lr, ., r - 1, num_rounds)
    lr_schedule: str = "constant"
    batch_size: int = 16
    mu: float = 0.0  # FedProx proximal weight sent to nodes (strategy fedprox)
    min_labels: int = 8  # a node trains in a round only with this many new labels
    seed: int = 0  # base seed sent to nodes (round id is added)
    eval_wait_s: float = 0.0  # after the last round: keep receiving eval reports this long

    def __post_init__(self) -> None:
        if self.num_rounds < 1 or self.min_nodes < 1:
            raise ConfigError("rounds: num_rounds and min_nodes must be >= 1")
        if self.expected_nodes and self.min_nodes > len(self.expected_nodes):
            raise ConfigError("rounds: min_nodes is larger than the expected_nodes list")
        if len(set(self.expected_nodes)) != len(self.expected_nodes):
            raise ConfigError("rounds: expected_nodes has duplicates")
        if self.round_timeout_s <= 0 or self.chunk_timeout_s <= 0:
            raise ConfigError("rounds: round_timeout_s and chunk_timeout_s must be > 0")
        if self.train_mode not in TRAIN_MODES:
            raise ConfigError(f"rounds.train_mode must be one of {TRAIN_MODES}")
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.min_labels < 0:
            raise ConfigError("rounds: local_epochs, batch_size, lr must be positive")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"rounds: lr_schedule must be one of {', '.join(SCHEDULES)}, "
                f"not {self.lr_schedule!r}"
            )
        if self.mu < 0 or self.eval_wait_s < 0:
            raise ConfigError("rounds: mu and eval_wait_s must be >= 0")
        if self.strategy == "trimmed_mean" and self.min_nodes < MIN_NODES_TRIMMED_MEAN:
            # with 2 updates nothing can be cut from both ends: the "robust" mean would be plain
            raise ConfigError(
                f"rounds: strategy trimmed_mean needs min_nodes >= {MIN_NODES_TRIMMED_MEAN}"
                f" (one update cut at each end), not {self.min_nodes}"
            )


@dataclass(frozen=True)
class ValidationConfig:
    max_norm_ratio: float = 10.0  # refuse a delta norm > k x the median of the round's norms
    max_abs_norm_ratio: float = 1.0  # with < 3 updates: refuse norm > k x the global weights' norm
    min_abs_norm: float = 1.0  # floor of that global norm (a near-zero model must not block all)
    max_num_samples: int = 1_000_000  # self-reported sample counts above this are refused
    # no node weighs more than this share of a sample-weighted round: larger claims are cut to
    # a common ceiling (0.5: one node never outweighs all the others together; 1 = no cap)
    max_weight_share: float = 0.5
    # largest BatchNorm counter delta (num_batches_tracked: batches run) one update may carry;
    # counter deltas must be whole numbers in [0, this] (below 2**24: exact in float32)
    max_counter_step: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_norm_ratio <= 1 or self.max_abs_norm_ratio <= 0 or self.min_abs_norm <= 0:
            raise ConfigError("validation: max_norm_ratio > 1, max_abs_norm_ratio > 0 needed")
        if self.max_num_samples < 1:
            raise ConfigError("validation.max_num_samples must be >= 1")
        if not 0.0 < self.max_weight_share <= 1.0:
            raise ConfigError("validation.max_weight_share must be in (0, 1]")
        if not 0 <= self.max_counter_step < 2**24:
            raise ConfigError("validation.max_counter_step must be in [0, 2**24)")


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path  # SQLite state, spool, checkpoints
    federation: str = "demo"  # federation id (topic prefix fl/<federation>/...)
    signing_key: Path | None = None  # Ed25519 private key signing global manifests
    node_keys_dir: Path | None = None  # <node>.pub trusted keys: if set, updates must be signed
    revoked_file: Path | None = None  # revoked.json from provisioning: refused nodes / keys
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    source: Path | None = None  # the TOML file this came from

    def __post_init__(self) -> None:
        if not self.federation or not all(c.isalnum() or c in "-_" for c in self.federation):
            raise ConfigError("federation must be non-empty and use only letters, digits, - and _")
        if self.revoked_file is not None and self.node_keys_dir is None:
            raise ConfigError("revoked_file needs node_keys_dir (signed updates)")

    @property
    def database(self) -> Path:
        return self.state_dir / "coordinator.sqlite"

    def describe(self) -> dict[str, Any]:
        """A loggable summary (no secrets: key files are paths, never contents)."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def with_rounds(self, num_rounds: int) -> CoordinatorConfig:
        return dataclasses.replace(
            self, rounds=dataclasses.replace(self.rounds, num_rounds=num_rounds)
        )


_SECTIONS: dict[str, type] = {
    "broker": BrokerConfig,
    "model": ModelConfig,
    "rounds": RoundsConfig,
    "validation": ValidationConfig,
}
_TOP_LEVEL = ("federation", "state_dir", "signing_key", "node_keys_dir", "revoked_file")


def _resolve(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _coerce(cls: type[T], raw: dict[str, Any], base: Path, section: str) -> T:
    def convert(name: str, ftype: str, value: Any) -> Any:
        if "Path" in ftype and value not in (None, ""):
            return _resolve(value, base)
        if "Path" in ftype or (name == "url" and value == ""):
            return None
        if "tuple" in ftype and isinstance(value, list):
            return tuple(value)
        return value

    return build_section(cls, raw, section, convert, ConfigError)


def config_from_dict(
    raw: dict[str, Any], base: Path, source: Path | None = None
) -> CoordinatorConfig:
    raw = dict(raw)
    unknown = set(raw) - set(_SECTIONS) - set(_TOP_LEVEL)
    if unknown:
        known = sorted(_TOP_LEVEL + tuple(_SECTIONS))
        raise ConfigError(f"unknown keys/sections {sorted(unknown)}; known: {known}")
    for name in _SECTIONS:
        if name in raw and not isinstance(raw[name], dict):
            raise ConfigError(f"[{name}] must be a table")
    top_types = {f.name: str(f.type) for f in dataclasses.fields(CoordinatorConfig)}
    for key in _TOP_LEVEL:
        problem = type_problem(top_types.get(key, "Any"), raw.get(key))
        if key in raw and problem is not None:
            raise ConfigError(f"{key} {problem} (got {kind_of(raw[key])})")
    if "state_dir" not in raw:
        raise ConfigError("state_dir is required at the top of coordinator.toml")
    top: dict[str, Any] = {"state_dir": _resolve(raw["state_dir"], base)}
    if "federation" in raw:
        top["federation"] = raw["federation"]
    for key in ("signing_key", "node_keys_dir", "revoked_file"):
        if raw.get(key):
            top[key] = _resolve(raw[key], base)
    sections: dict[str, Any] = {
        name: _coerce(cls, dict(raw[name]), base, name)
        for name, cls in _SECTIONS.items()
        if name in raw
    }
    try:
        return CoordinatorConfig(source=source, **top, **sections)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def load_config(
    path: Path, overrides: dict[str, dict[str, Any]] | None = None
) -> CoordinatorConfig:
    """Read ``coordinator.toml``; ``overrides`` (from CLI flags) win over the file."""
    raw = read_toml(path, overrides, ConfigError)
    return config_from_dict(raw, Path(path).resolve().parent, source=Path(path))


def default_toml(federation: str = "demo") -> str:
    """The file `fedscan coordinator init DIR` writes: working defaults, paths relative to DIR."""
    return f'''# fedscan coordinator configuration. Paths are relative to this file.
federation = "{federation}"   # topic prefix fl/<federation>/...
state_dir = "state"          # SQLite state, update spool, global checkpoints
# signing_key = "keys/signing.key"        # Ed25519 key signing global manifests
# node_keys_dir = "keys/nodes"             # trusted <node>.pub: updates must be signed
# revoked_file = "keys/revoked.json"       # nodes / keys whose updates are refused

[broker]
# No url: start the embedded MQTT broker on loopback (single machine, no system packages).
# url = "mqtts://broker.example.org:8883"
# ca_file = "certs/ca.pem"
# cert_file = "certs/coordinator.pem"
# key_file = "certs/coordinator.key"
embedded_port = 1883
embedded_max_queued_messages = 10000   # per client session; the oldest are dropped beyond
embedded_max_queued_bytes = 134217728  # 128 MiB per client session, same rule

[model]
arch = "cnn2d"             # export.zoo registry name (resnet18, efficientnet_b0, cnn2d)
texture_dim = 0
init = "random"            # random | hub | file (then weights_file = "...")
publish_onnx = true        # publish each version's ONNX export too (for predict-only nodes)
window_center = -600.0     # lung window in that ONNX file's metadata
window_width = 1500.0

[rounds]
num_rounds = 10
min_nodes = 2              # quorum
# expected_nodes = ["node1", "node2", "node3"]   # round closes early when all reported
round_timeout_s = 600.0    # deadline; extended once without quorum, then closed unchanged
strategy = "fedavg"        # fedavg | fedprox | fedadam | trimmed_mean
codec = "fp16"             # fp32 | fp16 | int8 | int8_channel
trainable_only = false
train_mode = "full"        # full | last_stage | head
local_epochs = 1
lr = 0.001
lr_schedule = "constant"   # constant | cosine (across rounds: round r of num_rounds)
batch_size = 16
mu = 0.0                   # FedProx proximal term (strategy = "fedprox")
min_labels = 8
eval_wait_s = 0.0          # after the last round, wait this long for the final evaluations

[rounds.strategy_args]
# fedadam: eta = 0.01, beta1 = 0.9, beta2 = 0.99, tau = 0.001
# trimmed_mean: trim_ratio = 0.2

[validation]
max_norm_ratio = 10.0      # refuse an update > 10 x the median norm of the round, and at
                           # aggregation one whose weighted contribution (share x norm) is
                           # > 10 x the median contribution of the other nodes
max_abs_norm_ratio = 1.0   # with < 3 updates: refuse an update larger than the model itself
max_num_samples = 1000000
max_weight_share = 0.5     # no node weighs more than half of a round, whatever it claims
max_counter_step = 1000000 # BatchNorm counter deltas: whole numbers in [0, this]
'''
