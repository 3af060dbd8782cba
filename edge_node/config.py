"""Typed configuration of the edge node, loaded from one TOML file (``node.toml``).

Every section is a frozen dataclass validated in ``__post_init__``; unknown keys are an error
(a typo in a hospital's config must not be silently ignored). Relative paths are resolved
against the directory of the TOML file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_node.errors import ConfigError
from edge_node.layout import StateLayout
from fl_protocol.config_types import build_section, dump_toml, read_toml
from fl_protocol.schedule import SCHEDULES
from fl_protocol.schemas import TRAIN_MODES

T = TypeVar("T")


@dataclass(frozen=True)
class PathsConfig:
    inbox: Path  # watched folder; never modified by the node
    state_dir: Path  # SQLite database, caches, checkpoints, pending uploads
    quarantine_dir: Path  # copies of unusable files, each with a .reason.json beside it
    model_dir: Path  # current.onnx (+ previous.onnx for rollback), global weights

    @property
    def state(self) -> StateLayout:
        """What lives where under ``state_dir`` (edge_node/layout.py)."""
        return StateLayout(self.state_dir)

    @property
    def database(self) -> Path:
        return self.state.database


@dataclass(frozen=True)
class WatcherConfig:
    use_events: bool = True  # inotify/watchdog events (FileClosedEvent = complete at once)
    poll_interval_s: float = 2.0  # polling fallback period (network shares have no events)
    quiet_period_s: float = 1.0  # size must be stable this long when no close event was seen
    batch_size: int = 32  # ready files the pipeline takes per batch in a burst (slices per
    # onnxruntime call: [inference] batch_size)
    batch_wait_ms: float = 5.0  # how long to gather a batch once the first file is ready
    extensions: tuple[str, ...] = (".dcm", ".dicom", ".ima", "")  # "" = files without suffix
    # Logs name files by a tag (sha256 of the path) unless this is on: then by their path
    # relative to the inbox. Off by default: PACS exports often put patient names in paths.
    log_paths: bool = False

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or self.quiet_period_s < 0:
            raise ConfigError("watcher: poll_interval_s must be > 0 and quiet_period_s >= 0")
        if self.batch_size < 1:
            raise ConfigError("watcher: batch_size must be >= 1")


@dataclass(frozen=True)
class PreprocessConfig:
    window_center: float = -600.0  # lung window level (HU); overridden by the model metadata
    window_width: float = 1500.0  # lung window width (HU)
    size: int = 224  # model input side
    modalities: tuple[str, ...] = ("CT",)  # allow-list; anything else is skipped with a reason
    # -- bounds on one input file (DICOM bombs); over a bound = quarantined, reason limit:* --
    max_frames: int = 1024  # frames per file (NumberOfFrames); one prediction row per frame
    max_pixels: int = 1 << 27  # stored pixels per file (frames x rows x cols x samples)
    max_dataset_mb: int = 288  # largest file read, and largest a deflated dataset inflates to

    def __post_init__(self) -> None:
        if self.window_width <= 0:
            raise ConfigError("preprocess: window_width must be > 0")
        if self.size < 16:
            raise ConfigError("preprocess: size must be >= 16")
        if self.max_frames < 1 or self.max_pixels < 1 or self.max_dataset_mb < 1:
            raise ConfigError("preprocess: max_frames, max_pixels, max_dataset_mb must be >= 1")


@dataclass(frozen=True)
class InferenceConfig:
    model: Path | None = None  # ONNX file; default <model_dir>/current.onnx
    intra_op_threads: int = 2  # onnxruntime intra-op threads (explicit: never "all cores")
    batch_size: int = 16  # max slices per session.run

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1 or self.batch_size < 1:
            raise ConfigError("inference: intra_op_threads and batch_size must be >= 1")


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # localhost only unless a token is set
    port: int = 8765  # 0 = pick a free port (written to state_dir/api.port)
    token: str | None = None  # required when host is not a loopback address
    # Host header values accepted besides host, 127.0.0.1, localhost, [::1] (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()
    max_upload_mb: int = 288  # POST /api/predict body bound (streamed to disk, 413 beyond)

    def __post_init__(self) -> None:
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        if not loopback and not self.token:
            raise ConfigError(f"api: binding to {self.host} requires api.token")
        if self.max_upload_mb < 1:
            raise ConfigError("api: max_upload_mb must be >= 1")
        if not isinstance(self.allowed_hosts, tuple):
            raise ConfigError("api: allowed_hosts must be a list of host names")
        for name in self.allowed_hosts:
            if not isinstance(name, str) or not name or any(c in name for c in "/@ \t"):
                raise ConfigError(f"api: allowed_hosts entry {name!r} is not a host name")


@dataclass(frozen=True)
class RetentionConfig:
    """[retention]: how long copies of patient data the node made itself are kept (the inbox,
    the database and labels are not swept). 0 = keep forever."""

    uploads_days: float = 7.0  # state_dir/uploads: DICOM files posted to /api/predict
    thumbnails_days: float = 7.0  # state_dir/thumbnails: cached PNGs (rebuilt on demand)
    quarantine_days: float = 30.0  # quarantine_dir: refused files and their .reason.json
    sweep_interval_s: float = 3600.0  # how often the daemon sweeps (and once at start)

    def __post_init__(self) -> None:
        days = (self.uploads_days, self.thumbnails_days, self.quarantine_days)
        if not all(isinstance(d, int | float) and math.isfinite(d) and d >= 0 for d in days):
            raise ConfigError("retention: *_days must be numbers >= 0 (0 = keep forever)")
        if not self.sweep_interval_s > 0:
            raise ConfigError("retention: sweep_interval_s must be > 0")


@dataclass(frozen=True)
class TrainingConfig:
    arch: str = "cnn2d"  # registry name in export.zoo
    mode: str = "full"  # full | last_stage | head
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    # constant | cosine over the epochs of `fedscan node train`; federated rounds train at the
    # rate the coordinator sends (its [rounds] lr_schedule runs across rounds)
    lr_schedule: str = "constant"
    head_lr_mult: float = 1.0  # the classifier head trains at lr x this (texture weights need it)
    weight_decay: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.2  # share of patients (by hash) held out for local validation
    early_stopping_patience: int = 2
    augment: bool = True  # rotation, flips, zoom, shift (the paper's augmentation)
    class_weighting: bool = True
    texture_features: bool = False  # GLCM + LBP features concatenated to the CNN embedding
    torch_threads: int = 1  # cap so the radiologist's viewer never stalls
    nice: int = 10  # os.nice increment of the training subprocess
    min_new_labels: int = 8  # labels needed before the node trains in a round
    pretrained: str | None = None  # None, "hub", or a local weights file

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            modes = f"{', '.join(TRAIN_MODES[:-1])} or {TRAIN_MODES[-1]}"
            raise ConfigError(f"training: mode must be {modes}, not {self.mode!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("training: val_fraction must be in (0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("training: epochs, batch_size and lr must be positive")
        if not 0 < self.head_lr_mult <= 100:
            raise ConfigError("training: head_lr_mult must be in (0, 100]")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"training: lr_schedule must be one of {', '.join(SCHEDULES)}, "
                f"not {self.lr_schedule!r}"
            )


@dataclass(frozen=True)
class FederationConfig:
    enabled: bool = False
    federation: str = "demo"  # federation id (topic prefix fl/<federation>/...)
    broker: str = "mqtt://127.0.0.1:1883"  # mqtt://host:port or mqtts://host:port
    ca_file: Path | None = None  # TLS: CA certificate
    cert_file: Path | None = None  # TLS: this node's client certificate
    key_file: Path | None = None  # TLS: this node's client key
    signing_key: Path | None = None  # Ed25519 private key for update manifests
    coordinator_public_key: Path | None = None  # Ed25519 key that must sign global manifests
    codec: str = "fp16"  # default update codec when the round config does not say
    safety_margin: float | None = None  # refuse a global model this much less accurate locally
    # -- differential privacy on updates (federate/privacy.py); off while dp_clip is unset --
    dp_clip: float | None = None  # L2 bound of the whole update delta
    dp_noise_multiplier: float = 0.0  # Gaussian noise sigma = dp_noise_multiplier * dp_clip
    dp_delta: float = 1e-5  # epsilon is reported at this delta

    def __post_init__(self) -> None:
        clip, z = self.dp_clip, self.dp_noise_multiplier
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ConfigError("federation: dp_clip must be a positive number (or unset: DP off)")
        if not (math.isfinite(z) and z >= 0):
            raise ConfigError("federation: dp_noise_multiplier must be >= 0")
        if clip is None and z > 0:
            raise ConfigError("federation: dp_noise_multiplier needs dp_clip (sigma = z * clip)")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError("federation: dp_delta must be in (0, 1)")
        key = self.coordinator_public_key
        if self.enabled and key is None:
            # fail closed: without the key any client of the broker could publish the model
            raise ConfigError(
                "federation: enabled needs coordinator_public_key (the coordinator's Ed25519"
                " public key; global models that do not verify with it are refused)"
            )
        if self.enabled and key is not None and not Path(key).is_file():
            raise ConfigError(
                f"federation: coordinator_public_key {key} not found"
                " (copy keys/coordinator.pub from this node's provisioning kit)"
            )


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_ae_title(section: str, name: str, value: str) -> None:
    """AE titles: 1-16 characters of printable ASCII, not only spaces, no backslash."""
    ok = 0 < len(value) <= 16 and bool(value.strip()) and all(32 <= ord(c) < 127 for c in value)
    if not ok or "\\" in value:
        raise ConfigError(f"{section}: {name} must be 1-16 printable ASCII characters")


@dataclass(frozen=True)
class DicomListenerConfig:
    """[dicom.listener]: the C-STORE SCP that drops received instances into the inbox."""

    enabled: bool = False
    ae_title: str = "FEDSCAN"  # our AE title; a peer calling another one is refused
    host: str = "127.0.0.1"  # a non-loopback host requires allowed_calling_aes
    port: int = 11112  # 0 = pick a free port (written to state_dir/dicom.port)
    # Calling AE titles allowed to send; empty = any, accepted only on a loopback host
    allowed_calling_aes: tuple[str, ...] = ()
    dest_subdir: str = "dicom-in"  # folder inside the inbox receiving <study>/<instance>.dcm
    max_pdu: int = 131072  # largest PDU we accept (bytes; DCMTK's default ceiling)
    # fsync each instance and its folder before answering success (a power cut cannot lose an
    # acknowledged image); false = write like storescp does, about twice the throughput
    fsync: bool = True
    max_associations: int = 8  # concurrent associations; more are refused (busy)
    timeout_s: float = 30.0  # ACSE/DIMSE/network idle timeout of an association
    tls_cert: Path | None = None  # TLS: our certificate (PEM); TLS is on when set
    tls_key: Path | None = None  # TLS: its private key
    tls_ca: Path | None = None  # TLS: CA that client certificates must chain to (mutual TLS)

    def __post_init__(self) -> None:
        _check_ae_title("dicom.listener", "ae_title", self.ae_title)
        for ae in self.allowed_calling_aes:
            _check_ae_title("dicom.listener", "allowed_calling_aes", ae)
        if not 0 <= self.port <= 65535:
            raise ConfigError("dicom.listener: port must be 0-65535")
        if self.enabled and self.host not in _LOOPBACK and not self.allowed_calling_aes:
            raise ConfigError(
                f"dicom.listener: listening on {self.host} requires allowed_calling_aes"
            )
        sub = Path(self.dest_subdir)
        if sub.is_absolute() or ".." in sub.parts or not self.dest_subdir.strip():
            raise ConfigError("dicom.listener: dest_subdir must be a relative folder name")
        if any(part.startswith(".") for part in sub.parts):
            raise ConfigError("dicom.listener: dest_subdir must not be hidden (watcher skips it)")
        if self.max_pdu < 0 or self.max_associations < 1 or self.timeout_s <= 0:
            raise ConfigError("dicom.listener: max_pdu >= 0, max_associations >= 1, timeout_s > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("dicom.listener: tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("dicom.listener: tls_ca (client certificates) needs tls_cert/tls_key")


@dataclass(frozen=True)
class DicomSendConfig:
    """[dicom.send_to]: the PACS (C-STORE SCP) that receives the result objects."""

    enabled: bool = False
    ae_title: str = "PACS"  # called AE title of the PACS
    host: str = "127.0.0.1"
    port: int = 104
    calling_ae: str = "FEDSCAN"  # our AE title as the PACS knows it
    retry_base_s: float = 2.0  # first retry after a failure; doubles per failure ...
    retry_cap_s: float = 300.0  # ... up to this
    timeout_s: float = 30.0  # ACSE/DIMSE/network timeout of one association
    tls_ca: Path | None = None  # TLS: CA the PACS certificate must chain to; TLS is on when set
    tls_cert: Path | None = None  # TLS: our client certificate (when the PACS wants one)
    tls_key: Path | None = None  # TLS: its private key

    def __post_init__(self) -> None:
        _check_ae_title("dicom.send_to", "ae_title", self.ae_title)
        _check_ae_title("dicom.send_to", "calling_ae", self.calling_ae)
        if not 0 < self.port <= 65535:
            raise ConfigError("dicom.send_to: port must be 1-65535")
        if not 0 < self.retry_base_s <= self.retry_cap_s or self.timeout_s <= 0:
            raise ConfigError("dicom.send_to: need 0 < retry_base_s <= retry_cap_s, timeout_s > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("dicom.send_to: tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("dicom.send_to: a client certificate needs tls_ca (TLS)")


@dataclass(frozen=True)
class DicomConfig:
    """[dicom]: DICOM networking (edge_node/dicomnet); everything off by default."""

    listener: DicomListenerConfig = field(default_factory=DicomListenerConfig)
    send_to: DicomSendConfig = field(default_factory=DicomSendConfig)
    results_dir: Path | None = None  # also copy each result object here (sites without a PACS)
    keep_sent_days: float = 7.0  # delivered objects stay in <state_dir>/outbox/sent this long

    def __post_init__(self) -> None:
        if not isinstance(self.listener, DicomListenerConfig) or not isinstance(
            self.send_to, DicomSendConfig
        ):
            raise ConfigError("dicom: listener and send_to are tables ([dicom.listener])")
        if not self.keep_sent_days >= 0:
            raise ConfigError("dicom: keep_sent_days must be >= 0")


@dataclass(frozen=True)
class SeriesConfig:
    """[series]: slices grouped into series, chest-only filter, completion, series verdict."""

    enabled: bool = True  # track series and make a verdict when one completes
    quiet_time_s: float = 30.0  # a series is complete this long after its last instance
    check_interval_s: float = 0.25  # how often the tracker looks for completed series
    rule: str = "vote"  # series verdict rule (edge_node.series.verdict.RULES; README)
    top_k: int = 5  # slices the top_k_mean rule averages
    chest_only: bool = True  # skip non-chest images (head, abdomen, scouts) before inference
    min_lung_air: float = 0.05  # content probe: less lung-like air than this = not chest

    def __post_init__(self) -> None:
        if not self.quiet_time_s >= 0 or not self.check_interval_s > 0:
            raise ConfigError("series: quiet_time_s must be >= 0 and check_interval_s > 0")
        if self.top_k < 1:
            raise ConfigError("series: top_k must be >= 1")
        if not 0.0 <= self.min_lung_air < 1.0:
            raise ConfigError("series: min_lung_air must be in [0, 1)")
        from edge_node.series.verdict import RULES  # late: the registry imports nothing heavy

        if self.rule not in RULES:
            raise ConfigError(f"series: unknown rule {self.rule!r}; choices: {sorted(RULES)}")


@dataclass(frozen=True)
class ResultsConfig:
    """[results]: DICOM objects made per complete series, handed to the outbox."""

    structured_report: bool = True  # a TID 1500 SR (Comprehensive 3D SR): verdict, references
    secondary_capture: bool = True  # a summary image (key slices and their scores)
    key_slices: int = 4  # slices shown on the summary image (highest P(covid) first)

    def __post_init__(self) -> None:
        if not 1 <= self.key_slices <= 9:
            raise ConfigError("results: key_slices must be in 1..9")


# nested tables of a section ([dicom.listener]) -> their dataclass, by field type name
_SUBSECTIONS: dict[str, type] = {
    "DicomListenerConfig": DicomListenerConfig,
    "DicomSendConfig": DicomSendConfig,
}


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    paths: PathsConfig
    watcher: WatcherConfig = field(default_factory=WatcherConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)  # patient-data copies
    dicom: DicomConfig = field(default_factory=DicomConfig)  # DICOM networking
    series: SeriesConfig = field(default_factory=SeriesConfig)  # series and their verdicts
    results: ResultsConfig = field(default_factory=ResultsConfig)  # DICOM SR / SC results
    source: Path | None = None  # the TOML file this came from

    def __post_init__(self) -> None:
        if not self.node_id or not all(c.isalnum() or c in "-_" for c in self.node_id):
            raise ConfigError("node_id must be non-empty and use only letters, digits, - and _")

    @property
    def model_path(self) -> Path:
        return self.inference.model or self.paths.model_dir / "current.onnx"

    def describe(self) -> dict[str, Any]:
        """A loggable summary (no secrets)."""
        d = dataclasses.asdict(self)
        d["api"]["token"] = "***" if self.api.token else None
        return {k: v for k, v in d.items() if k != "source"}


_SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "watcher": WatcherConfig,
    "preprocess": PreprocessConfig,
    "inference": InferenceConfig,
    "api": ApiConfig,
    "training": TrainingConfig,
    "federation": FederationConfig,
    "retention": RetentionConfig,
    "dicom": DicomConfig,
    "series": SeriesConfig,
    "results": ResultsConfig,
}


def _coerce(cls: type[T], raw: dict[str, Any], base: Path, section: str) -> T:
    def convert(name: str, ftype: str, value: Any) -> Any:
        if "Path" in ftype and value is not None:
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else (base / p)
        if ftype in _SUBSECTIONS and isinstance(value, dict):
            return _coerce(_SUBSECTIONS[ftype], value, base, f"{section}.{name}")
        if "tuple" in ftype and isinstance(value, list):
            return tuple(value)
        return value

    return build_section(cls, raw, section, convert, ConfigError)


def config_from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> NodeConfig:
    raw = dict(raw)
    node_id = raw.pop("node_id", None)
    if not isinstance(node_id, str):
        raise ConfigError("node_id (string) is required at the top of node.toml")
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    if "paths" not in raw:
        raise ConfigError("[paths] with inbox, state_dir, quarantine_dir, model_dir is required")
    sections: dict[str, Any] = {
        name: _coerce(cls, dict(raw.get(name, {})), base, name)
        for name, cls in _SECTIONS.items()
        if name in raw
    }
    return NodeConfig(node_id=node_id, source=source, **sections)


def load_config(path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> NodeConfig:
    """Read ``node.toml``; ``overrides`` (from CLI flags) win over the file, per section/key."""
    raw = read_toml(path, overrides, ConfigError)
    return config_from_dict(raw, Path(path).resolve().parent, source=Path(path))


def minimal_toml(node_id: str, **sections: Mapping[str, Any]) -> str:
    """A node.toml with the four folders beside it (inbox, state, quarantine, models) and the
    given sections merged in (``api={"port": 0}``): what tests, benchmarks and the demo start
    from. ``default_toml`` is the commented file `fedscan node init` writes."""
    doc: dict[str, Any] = {
        "node_id": node_id,
        "paths": {
            "inbox": "inbox",
            "state_dir": "state",
            "quarantine_dir": "quarantine",
            "model_dir": "models",
        },
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return dump_toml(doc)


def default_toml(node_id: str = "node1") -> str:
    """The file `fedscan node init DIR` writes: working defaults, paths relative to DIR."""
    return f'''# fedscan edge node configuration. Paths are relative to this file.
node_id = "{node_id}"

[paths]
inbox = "inbox"            # watched DICOM folder (never modified)
state_dir = "state"        # SQLite (WAL), caches, checkpoints
quarantine_dir = "quarantine"
model_dir = "models"       # current.onnx is served; previous.onnx kept for rollback

[watcher]
use_events = true          # inotify close-write events; polling always runs as a fallback
poll_interval_s = 2.0
quiet_period_s = 1.0

[preprocess]
window_center = -600.0     # lung window (HU); the model's own metadata wins when present
window_width = 1500.0
modalities = ["CT"]

[inference]
intra_op_threads = 2
batch_size = 16

[api]
host = "127.0.0.1"         # other hosts require token = "..."
port = 8765

[training]
arch = "cnn2d"
mode = "full"
epochs = 3

[federation]
enabled = false
federation = "demo"
broker = "mqtt://127.0.0.1:1883"
# required once enabled: only global models signed with this key are used
coordinator_public_key = "keys/coordinator.pub"

# Defaults of the sections below, shown commented; uncomment a section to change it.
# [series]
# quiet_time_s = 30.0      # a series is complete this long after its last image
# rule = "vote"            # series verdict rule (README "Series verdicts and DICOM results")
# chest_only = true        # head, abdomen, scouts are skipped with a reason, never scored
#
# [retention]              # days; 0 keeps forever
# uploads_days = 7.0
# thumbnails_days = 7.0
# quarantine_days = 30.0
#
# DICOM networking (README "DICOM networking"): receive images by C-STORE and send each
# series' SR + summary image back to the PACS.
# [dicom.listener]
# enabled = true
# ae_title = "FEDSCAN"
# host = "127.0.0.1"       # another host requires allowed_calling_aes
# port = 11112
# allowed_calling_aes = ["PACS"]
#
# [dicom.send_to]
# enabled = true
# ae_title = "PACS"
# host = "pacs.example.org"
# port = 104
# calling_ae = "FEDSCAN"
'''
