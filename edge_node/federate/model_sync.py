"""Receive a global model: verify, fetch, export to ONNX (or take the coordinator's), gate, swap.

The coordinator publishes a retained ``GlobalManifest`` on ``fl/F/global/current`` and the
weights (fp32 safetensors) as retained chunks on ``fl/F/global/V/chunk/i``. For a manifest of a
newer version than the one installed, ``ModelSync``:

1. checks the manifest: our federation, the coordinator's Ed25519 signature when
   ``federation.coordinator_public_key`` is configured (required in production; without a key
   unsigned models are accepted with one warning), and never an older version than one already
   accepted (``ReplayGuard``: a rollback is refused, also across restarts);
2. reassembles the chunks with a disk spool (a restarted node resumes), verifying each chunk
   and the whole payload against the manifest's SHA-256;
3. parses the safetensors (never pickle), writes ``<model_dir>/global.safetensors`` atomically
   (what local training starts from) and exports it to ONNX (``model_version = V``);
4. optional safety gate (``federation.safety_margin``): both the new model and the one served
   now are evaluated on the node's local validation split; if the new accuracy is below the
   current one minus the margin, the old model keeps serving (the refusal is recorded and
   reported), while training still starts from the new weights;
5. swaps: ``current.onnx`` is copied to ``previous.onnx`` (rollback), the new file replaces
   ``current.onnx`` by rename, and ``on_new_model(path, V)`` is called (the daemon's
   ``ModelHolder.swap``).

A node without the ``train`` extra (no torch: the predict-only install) cannot export, so it
fetches the coordinator's ONNX export of the same version instead (``manifest.onnx``, chunked on
``fl/F/global/V/onnx/i``, same per-chunk and whole SHA-256 checks, covered by the same
signature), checks that onnxruntime loads it and that its metadata names this version and
architecture, and swaps it in as above. It keeps no weights (``global.safetensors`` is removed:
it would be an older version's) and applies no safety gate (evaluation needs torch; logged once
when one is configured). A manifest without ``onnx`` (an older coordinator, or its export
failed) is logged once per version and the current model keeps serving.

A model that fails any step is logged and never served; the prediction model is unchanged.
Torch is used only through ``edge_node.train.compute_service`` (a subprocess in the daemon).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge_node.config import NodeConfig
from edge_node.errors import ModelError, NodeError
from edge_node.train.compute_service import Compute, ExportRequest
from edge_node.train.job import GLOBAL_WEIGHTS, TrainJob
from fl_protocol.chunking import Reassembler
from fl_protocol.codecs import read_metadata
from fl_protocol.errors import ProtocolError, ReplayError, SchemaError
from fl_protocol.files import copy_atomic, write_atomic
from fl_protocol.schemas import GlobalManifest
from fl_protocol.signing import ReplayGuard, load_public_key, verify_manifest

log = logging.getLogger(__name__)

CURRENT_ONNX = "current.onnx"
PREVIOUS_ONNX = "previous.onnx"
SERVED_WEIGHTS = "served.safetensors"  # weights of the global model current.onnx came from
SYNC_STATE = "sync.json"

NewModelCallback = Callable[[Path, int], None]


def federation_dir(config: NodeConfig) -> Path:
    """``<state_dir>/federation``: sync state, spool, outbox, training runs."""
    return config.paths.state.federation


@dataclass
class SyncState:
    """What this node has installed and serves; persisted in ``federation/sync.json``."""

    installed_version: int | None = None  # global.safetensors (what training starts from)
    served_version: int | None = None  # global version exported to current.onnx
    refused_version: int | None = None  # last version the safety gate refused to serve
    refused_accuracy: float | None = None  # its local validation accuracy
    served_accuracy: float | None = None  # the served model's accuracy at that refusal

    @classmethod
    def load(cls, path: Path) -> SyncState:
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: raw.get(k) for k in asdict(cls())})
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, TypeError) as exc:
            log.warning("federation sync state unreadable (%s); starting afresh", exc)
            return cls()

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(asdict(self), sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class Installed:
    """Outcome of one installed global model."""

    version: int
    served: bool  # False: the safety gate kept the previous model serving
    onnx_path: Path | None  # the new current.onnx when served
    new_accuracy: float | None = None  # gate evaluation on the local validation split
    served_accuracy: float | None = None


def weights_file_bytes(manifest: GlobalManifest, payload: bytes) -> bytes:
    """The received safetensors as a fedscan weights file whose metadata names this version.

    Refuses (SchemaError) anything that is not safetensors of finite float / int tensors.
    """
    try:
        tensors = st_load(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise SchemaError(
            f"global model payload is not safetensors ({type(exc).__name__})"
        ) from None
    if not tensors:
        raise SchemaError("global model payload holds no tensors")
    for name, arr in tensors.items():
        if arr.dtype.kind not in "fiub":
            raise SchemaError(f"global tensor {name[:60]!r} has dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise SchemaError(f"global tensor {name[:60]!r} contains NaN or inf")
    try:
        meta = dict(read_metadata(payload))
    except ProtocolError:
        meta = {}
    if meta.get("arch", manifest.arch) != manifest.arch:
        raise SchemaError(f"payload arch {meta['arch']!r} differs from manifest {manifest.arch!r}")
    meta.update(
        arch=manifest.arch,
        texture_dim=str(manifest.texture_dim),
        version=str(manifest.version),
        init=meta.get("init", f"global-{manifest.version}"),
    )
    return bytes(st_save(tensors, metadata=meta))


class ModelSync:
    """Global-model receiver of one node (see the module docstring). Not thread-safe: the
    federation client calls it from its single worker thread."""

    def __init__(
        self,
        config: NodeConfig,
        compute: Compute,
        on_new_model: NewModelCallback,
        *,
        can_export: bool = True,
    ) -> None:
        self.config = config
        self.compute = compute
        self.on_new_model = on_new_model
        self.can_export = can_export
        self.dir = federation_dir(config)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = config.paths.model_dir
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / SYNC_STATE
        self.state = SyncState.load(self.state_path)
        self.guard = ReplayGuard(self.dir / "replay.sqlite")
        self.public_key: Ed25519PublicKey | None = None
        key_path = config.federation.coordinator_public_key
        if key_path is not None:
            self.public_key = load_public_key(key_path)
        self._warned_unsigned = False
        self._fetching: GlobalManifest | None = None
        self._fetching_onnx = False  # the ONNX artifact (predict-only) rather than the weights
        self._reassembler: Reassembler | None = None
        self._failed: set[int] = set()  # versions that cannot be installed (logged once)
        self._no_onnx_logged: set[int] = set()
        self._warned_gate = False

    # -- queries ---------------------------------------------------------------------------

    @property
    def current_onnx(self) -> Path:
        return self.model_dir / CURRENT_ONNX

    @property
    def global_weights(self) -> Path:
        return self.model_dir / GLOBAL_WEIGHTS

    @property
    def fetching(self) -> GlobalManifest | None:
        """The manifest whose chunks are being collected, if any."""
        return self._fetching

    @property
    def fetching_onnx(self) -> bool:
        """True when the chunks being collected are the coordinator's ONNX export."""
        return self._fetching is not None and self._fetching_onnx

    def missing_chunks(self) -> list[int]:
        return self._reassembler.missing() if self._reassembler is not None else []

    def close(self) -> None:
        self.guard.close()

    # -- manifest --------------------------------------------------------------------------

    def check_manifest(self, manifest: GlobalManifest) -> None:
        """Raise ProtocolError unless the manifest may be used (federation, signature, age)."""
        if manifest.federation != self.config.federation.federation:
            raise SchemaError(f"manifest of federation {manifest.federation!r}, not ours")
        if self.public_key is not None:
            verify_manifest(manifest, self.public_key)
        elif not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning(
                "no federation.coordinator_public_key configured: global models are accepted "
                "without checking their signature (demo only; configure the key in production)"
            )
        self.guard.check_global(manifest.version)  # ReplayError for a rolled-back version
        if self.state.installed_version is not None and (
            manifest.version < self.state.installed_version
        ):
            raise ReplayError(
                f"global version {manifest.version} is older than installed "
                f"{self.state.installed_version}"
            )

    def offer(self, manifest: GlobalManifest) -> bool:
        """A verified manifest arrived; True if its chunks must now be fetched.

        False when that version is installed already (or failed before), or when this node
        cannot export models (no ``train`` extra) and the manifest carries no ONNX export.
        """
        version = manifest.version
        installed = self.state.installed_version == version and (
            not self.can_export or self.global_weights.is_file()  # weights if it can train
        )
        if installed or version in self._failed:
            return False
        if not self.can_export and manifest.onnx is None:
            if version not in self._no_onnx_logged:
                self._no_onnx_logged.add(version)
                log.error(
                    "global model %d comes without an ONNX export (coordinator too old, or its "
                    "export failed) and this predict-only node cannot export the weights "
                    "(no 'train' extra): still serving %s", version, self.state.served_version,
                )  # fmt: skip
            return False
        if self._fetching is not None and self._fetching.version == version:
            return False  # already collecting (a QoS 1 redelivery of the manifest)
        if self._fetching is not None:
            log.info("global model %d superseded by %d before it completed",
                     self._fetching.version, version)  # fmt: skip
        self._fetching = manifest
        self._fetching_onnx = not self.can_export
        if self._fetching_onnx and manifest.onnx is not None:
            artifact, spool, what = manifest.onnx, "global-onnx-spool", "ONNX export"
        else:
            artifact, spool, what = manifest.payload, "global-spool", "weights"
        self._reassembler = Reassembler(artifact, self.dir / spool)
        log.info("fetching global model %d %s (%d chunk(s), %d bytes; %d already spooled)",
                 version, what, artifact.num_chunks, artifact.total_size,
                 self._reassembler.received)  # fmt: skip
        return True

    # -- chunks ----------------------------------------------------------------------------

    def add_chunk(self, version: int, index: int, data: bytes, *, onnx: bool = False) -> bool:
        """Store one chunk (of the weights, or of the ONNX export when ``onnx``) of the version
        being fetched; True once every chunk is there."""
        if self._fetching is None or self._reassembler is None:
            return False
        if version != self._fetching.version or onnx != self._fetching_onnx:
            return False
        try:
            self._reassembler.add(index, data)
        except ProtocolError as exc:
            log.error("global model %d: refused chunk %d: %s", version, index, exc)
            return False
        return self._reassembler.complete

    def complete(self) -> Installed | None:
        """Install the fully received model; None (logged) if it cannot be used."""
        manifest, reasm = self._fetching, self._reassembler
        if manifest is None or reasm is None or not reasm.complete:
            return None
        onnx, self._fetching_onnx = self._fetching_onnx, False
        self._fetching, self._reassembler = None, None
        try:
            payload = reasm.result()
            if onnx:
                return self.install_onnx(manifest, payload)
            return self.install(manifest, payload)
        except (ProtocolError, NodeError) as exc:
            self._failed.add(manifest.version)
            log.error("global model %d not installed: %s", manifest.version, exc)
            return None
        except OSError as exc:  # model dir read-only or full: a later offer tries again
            log.error("global model %d not installed: cannot write %s: %s; still serving %s",
                      manifest.version, exc.filename, exc.strerror or exc,
                      self.state.served_version)  # fmt: skip
            return None
        finally:
            reasm.discard()

    # -- install ---------------------------------------------------------------------------

    def install(self, manifest: GlobalManifest, payload: bytes) -> Installed:
        """Verify ``payload`` against ``manifest``, export, gate and swap (see module doc)."""
        version = manifest.version
        self.check_manifest(manifest)  # again: the key or the guard may have changed since
        from fl_protocol.chunking import sha256_hex

        if len(payload) != manifest.payload.total_size or (
            sha256_hex(payload) != manifest.payload.sha256
        ):
            raise SchemaError("global model payload does not match its manifest sha256")
        incoming = self.dir / "incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        weights = incoming / f"global-{version}.safetensors"
        write_atomic(weights, weights_file_bytes(manifest, payload))
        onnx_tmp = self.compute.export(
            ExportRequest(
                weights=weights,
                out=incoming / f"global-{version}.onnx",
                model_version=str(version),
                window_center=self.config.preprocess.window_center,
                window_width=self.config.preprocess.window_width,
                calibration=(
                    None
                    if manifest.operating_point is None
                    else manifest.operating_point.metadata()
                ),
            )
        )
        new_acc, served_acc = self._gate(weights)
        margin = self.config.federation.safety_margin
        refuse = (
            margin is not None
            and new_acc is not None
            and served_acc is not None
            and new_acc < served_acc - margin
        )
        # From here on this version is ours: training starts from it even if not served.
        copy_atomic(weights, self.global_weights)  # state_dir may be another filesystem
        self.guard.accept_global(version)
        self.state.installed_version = version
        if refuse:
            self.state.refused_version = version
            self.state.refused_accuracy = new_acc
            self.state.served_accuracy = served_acc
            self.state.save(self.state_path)
            log.warning(
                "safety gate: global model %d refused (local val accuracy %.3f < served %.3f "
                "- margin %.3f); still serving %s, training from %d",
                version, new_acc, served_acc, margin, self.state.served_version, version,
            )  # fmt: skip
            shutil.rmtree(incoming, ignore_errors=True)
            return Installed(version, False, None, new_acc, served_acc)
        current = self._swap(onnx_tmp)
        copy_atomic(self.global_weights, self.model_dir / SERVED_WEIGHTS)
        self.state.served_version = version
        self.state.save(self.state_path)
        shutil.rmtree(incoming, ignore_errors=True)
        log.info("global model %d installed and served", version)
        try:
            self.on_new_model(current, version)
        except Exception:
            # The file is in place: the daemon's model monitor picks it up on its next poll.
            log.exception("swapping in global model %d failed in the daemon", version)
        return Installed(version, True, current, new_acc, served_acc)

    def install_onnx(self, manifest: GlobalManifest, payload: bytes) -> Installed:
        """Verify the coordinator's ONNX export of ``manifest`` and serve it (predict-only)."""
        from edge_node.serve.inference import OnnxModel

        version = manifest.version
        self.check_manifest(manifest)
        from fl_protocol.chunking import sha256_hex

        artifact = manifest.onnx
        if artifact is None:
            raise SchemaError(f"global model {version}: the manifest describes no ONNX export")
        if len(payload) != artifact.total_size or sha256_hex(payload) != artifact.sha256:
            raise SchemaError("global model ONNX export does not match its manifest sha256")
        incoming = self.dir / "incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        onnx_tmp = incoming / f"global-{version}.onnx"
        write_atomic(onnx_tmp, payload)
        try:
            info = OnnxModel(onnx_tmp, intra_op_threads=1).info
        except NodeError as exc:
            raise ModelError(f"the ONNX export does not load: {exc}") from exc
        if info.model_version != str(version) or info.arch != manifest.arch:
            raise ModelError(
                f"the ONNX export names model {info.model_version!r} ({info.arch}), the "
                f"manifest global model {version} ({manifest.arch})"
            )
        if info.texture_dim != manifest.texture_dim:
            raise ModelError(
                f"the ONNX export has texture_dim {info.texture_dim}, "
                f"the manifest {manifest.texture_dim}"
            )
        if self.config.federation.safety_margin is not None and not self._warned_gate:
            self._warned_gate = True
            log.warning("safety gate: needs local evaluation (the 'train' extra); not applied "
                        "on this predict-only node")  # fmt: skip
        self.guard.accept_global(version)
        current = self._swap(onnx_tmp)
        # weights of an older version (the node had torch once) must not pass for these
        self.global_weights.unlink(missing_ok=True)
        (self.model_dir / SERVED_WEIGHTS).unlink(missing_ok=True)
        self.state.installed_version = version
        self.state.served_version = version
        self.state.save(self.state_path)
        shutil.rmtree(incoming, ignore_errors=True)
        log.info("global model %d installed and served (the coordinator's ONNX export)", version)
        try:
            self.on_new_model(current, version)
        except Exception:
            log.exception("swapping in global model %d failed in the daemon", version)
        return Installed(version, True, current)

    def _gate(self, incoming: Path) -> tuple[float | None, float | None]:
        """(new accuracy, served accuracy) on the local validation split, when gated."""
        if self.config.federation.safety_margin is None:
            return None, None
        served = self.model_dir / SERVED_WEIGHTS
        if not served.is_file() or not self.current_onnx.is_file():
            log.info("safety gate: nothing served yet, the new model is accepted")
            return None, None
        out = self.dir / "eval"
        new_m, n_val = self.compute.evaluate(self._eval_job(incoming, out / "incoming"))
        if new_m is None or n_val == 0:
            log.info("safety gate: no local validation slices, the new model is accepted")
            return None, None
        old_m, _ = self.compute.evaluate(self._eval_job(served, out / "served"))
        if old_m is None:
            return new_m.accuracy, None
        log.info("safety gate: new %.3f vs served %.3f accuracy on %d local validation slice(s)",
                 new_m.accuracy, old_m.accuracy, n_val)  # fmt: skip
        return new_m.accuracy, old_m.accuracy

    def _eval_job(self, weights: Path, out_dir: Path) -> TrainJob:
        return TrainJob.from_config(self.config, out_dir=out_dir, init_weights=weights)

    def _swap(self, onnx_tmp: Path) -> Path:
        """Keep the served file as previous.onnx, then rename the new one over current.onnx."""
        current = self.current_onnx
        if current.is_file():
            copy_atomic(current, self.model_dir / PREVIOUS_ONNX)
        copy_atomic(onnx_tmp, current)  # a rename across filesystems fails (EXDEV)
        fd = os.open(self.model_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return current


def rollback(config: NodeConfig) -> Path:
    """Serve ``previous.onnx`` again (the daemon's model monitor swaps it in)."""
    model_dir = config.paths.model_dir
    previous = model_dir / PREVIOUS_ONNX
    if not previous.is_file():
        raise NodeError(f"no previous model to roll back to in {model_dir}")
    current = model_dir / CURRENT_ONNX
    tmp = model_dir / f".rollback-{int(time.time())}.onnx"
    shutil.copyfile(previous, tmp)
    if current.is_file():
        os.replace(current, previous)
    os.replace(tmp, current)
    (model_dir / SERVED_WEIGHTS).unlink(missing_ok=True)  # no longer what is served
    state_path = federation_dir(config) / SYNC_STATE
    state = SyncState.load(state_path)
    state.served_version = None  # unknown: previous.onnx carries its own metadata
    state.save(state_path)
    return current
