"""Labelled slices -> arrays for training, with a preprocessing cache in the state folder.

Each labelled file is decoded once with :func:`edge_node.ingest.preprocess.prepare` (the inference
path's own function, so train and predict see identical inputs) and cached as
``<cache_dir>/<key>.npz`` (float32 frames, and texture features once asked for). The key hashes
the file's path, size, mtime and the preprocessing parameters, so a changed file or window is
decoded again; repeated trainings only read the cache. A multi-frame file gives one sample per
frame, all with the file's label and patient; a label of one frame (``LabelRecord.frame``)
gives that frame only.

Numpy only (no torch): the trainer converts to tensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_node.errors import InputError
from edge_node.ingest.preprocess import PreprocessParams, prepare
from edge_node.labels import LABELS, LabelRecord

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


@dataclass(frozen=True)
class SampleSet:
    """``N`` training samples: images ``[N, 1, S, S]`` float32 in [0, 1], class ids ``[N]``."""

    images: np.ndarray
    labels: np.ndarray  # int64, 0 = non_covid, 1 = covid
    texture: np.ndarray | None  # float32 [N, D] when texture features are used
    patient_keys: tuple[str | None, ...]
    ids: tuple[str, ...]  # "<sop_instance_uid>#<frame>", local only, never logged

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.shape[0] != n or len(self.patient_keys) != n or len(self.ids) != n:
            raise ValueError("SampleSet fields differ in length")
        if self.texture is not None and self.texture.shape[0] != n:
            raise ValueError("SampleSet texture differs in length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int]) -> SampleSet:
        idx = np.asarray(index, dtype=np.int64)
        return SampleSet(
            images=self.images[idx],
            labels=self.labels[idx],
            texture=None if self.texture is None else self.texture[idx],
            patient_keys=tuple(self.patient_keys[i] for i in idx),
            ids=tuple(self.ids[i] for i in idx),
        )

    def class_counts(self) -> tuple[int, int]:
        return int(np.sum(self.labels == 0)), int(np.sum(self.labels == 1))

    def fingerprint(self) -> str:
        """Hash of which samples (and labels) this set holds, in order."""
        h = hashlib.sha256()
        for sid, label in zip(self.ids, self.labels.tolist(), strict=True):
            h.update(f"{sid}={label};".encode())
        return h.hexdigest()

    @classmethod
    def empty(cls, size: int, texture_dim: int | None = None) -> SampleSet:
        return cls(
            images=np.zeros((0, 1, size, size), np.float32),
            labels=np.zeros((0,), np.int64),
            texture=None if texture_dim is None else np.zeros((0, texture_dim), np.float32),
            patient_keys=(),
            ids=(),
        )


@dataclass(frozen=True)
class LoadReport:
    files: int = 0  # labelled files used
    frames: int = 0  # samples produced
    decoded: int = 0  # files decoded now (the rest came from the cache)
    missing: int = 0  # labels whose file is gone or unknown
    unusable: int = 0  # labels whose file no longer preprocesses


def _cache_key(path: Path, params: PreprocessParams) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    basis = (
        f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
        f"{params.window_center}|{params.window_width}|{params.size}|{params.modalities}"
    )
    return hashlib.sha256(basis.encode()).hexdigest()[:40]


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _texture_of(frames: np.ndarray) -> np.ndarray:
    from edge_node.ingest.texture import texture_features

    return np.stack([texture_features(f) for f in frames]).astype(np.float32)


def load_file(
    path: Path, uid: str, params: PreprocessParams, cache_dir: Path, *, texture: bool
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(frames ``[F, S, S]``, texture ``[F, D]`` or None, decoded_now) for one labelled file.

    Raises InputError when the file does not preprocess, and when it now holds another slice
    than the label was given for (``reason`` = ``uid_mismatch``).
    """
    key = _cache_key(path, params)
    if key is None:
        raise FileNotFoundError(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{key}.npz"
    frames: np.ndarray | None = None
    feats: np.ndarray | None = None
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                if str(z["uid"]) == uid:
                    frames = z["frames"]
                    feats = z["texture"] if "texture" in z.files else None
        except (OSError, ValueError, KeyError):
            log.warning("training cache entry unreadable; decoding the file again")
    decoded = frames is None
    if frames is None:
        prepared = prepare(path, params)
        if prepared.meta.sop_instance_uid != uid:
            err = InputError("the file now holds another slice than the one labelled")
            err.reason = "uid_mismatch"
            raise err
        frames = np.stack(prepared.frames).astype(np.float32)
    if texture and feats is None:
        feats = _texture_of(frames)
        decoded = True
    if decoded:
        arrays = {"uid": np.array(uid), "frames": frames}
        if feats is not None:
            arrays["texture"] = feats
        _atomic_savez(cached, **arrays)
    return frames, (feats if texture else None), decoded


def load_labelled(
    records: Sequence[LabelRecord],
    params: PreprocessParams,
    cache_dir: Path,
    *,
    texture: bool = False,
) -> tuple[SampleSet, LoadReport]:
    """All usable labelled slices as one :class:`SampleSet` (order: records, then frames)."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    feats: list[np.ndarray] = []
    keys: list[str | None] = []
    ids: list[str] = []
    files = decoded = missing = unusable = 0
    for rec in records:
        if rec.path is None:
            missing += 1
            continue
        try:
            frames, tex, now = load_file(
                Path(rec.path), rec.sop_instance_uid, params, cache_dir, texture=texture
            )
        except (FileNotFoundError, PermissionError):
            missing += 1
            continue
        except InputError:
            unusable += 1
            continue
        files += 1
        decoded += int(now)
        for i, frame in enumerate(frames):
            if rec.frame is not None and i != rec.frame:
                continue  # a frame label: that frame only (the others have their own rows)
            images.append(frame[None])
            labels.append(LABELS.index(rec.label))
            keys.append(rec.patient_key)
            ids.append(f"{rec.sop_instance_uid}#{i}")
            if tex is not None:
                feats.append(tex[i])
    report = LoadReport(files, len(labels), decoded, missing, unusable)
    if missing or unusable:
        log.warning(
            "training data: %d labelled file(s) missing, %d unusable; they are left out",
            missing,
            unusable,
        )
    if not labels:
        return SampleSet.empty(params.size, None), report
    samples = SampleSet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        texture=np.stack(feats).astype(np.float32) if texture else None,
        patient_keys=tuple(keys),
        ids=tuple(ids),
    )
    return samples, report
