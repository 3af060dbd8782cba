"""Unlabelled slices for pretraining: files -> the node's preprocessing -> one uint8 stack, cached.

Files come from an ``index.csv`` (rows of the chosen splits) or from any folder of DICOM files
(recursive). Each is decoded with :func:`edge_node.ingest.preprocess.prepare`, the inference
path's own function, so the backbone learns on exactly what a node feeds it; every frame is one
sample. A file that does not decode (not DICOM, not CT, broken pixels) or has gone missing is
skipped and counted, never fatal, and never named in the logs.

The stack is kept as ``<work>/frames-<key>.npz`` (uint8, ``round(255 x)``; 224 x 224 slices take
49 KB each), the key hashing the file list (path, size, mtime) and the preprocessing, so a rerun
(or a resumed run) reads one file instead of decoding every DICOM again. Fresh and cached runs
train on the same quantised values, so both give the same weights.

Numpy only (no torch).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_node.errors import InputError
from edge_node.ingest.preprocess import PreprocessParams, prepare
from fedscan.dataset import read_index
from fedscan.pretrain.config import PretrainConfig
from fedscan.pretrain.errors import PretrainError
from fl_protocol.files import write_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


@dataclass(frozen=True)
class PretrainData:
    """``N`` slices ``[N, S, S]`` uint8 (value / 255 is the preprocessed slice in [0, 1])."""

    images: np.ndarray
    files: int  # files that gave at least one frame
    skipped: int  # files missing or not decodable
    cached: bool  # read from the frame cache (nothing decoded now)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def digest(self) -> str:
        """Hash of the pixels, in order: what the checkpoint fingerprint ties to."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()


def source_files(config: PretrainConfig) -> list[Path]:
    """The files to decode, in a stable order (index order, or sorted relative paths)."""
    if config.dataset is not None:
        rows = read_index(config.dataset / "index.csv")  # DatasetError (exit 10) if absent
        return [config.dataset / r.path for r in rows if r.split in config.splits]
    inbox = config.inbox
    if inbox is None or not inbox.is_dir():
        raise PretrainError(f"inbox folder {inbox} does not exist or is not a folder")
    # our own outputs may sit inside the inbox (a work folder beside --out): never inputs
    own = {config.work.resolve(), config.out.resolve(), config.report_path.resolve()}
    found = []
    for path in inbox.rglob("*"):
        resolved = path.resolve()
        if resolved in own or any(parent in own for parent in resolved.parents):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(inbox).as_posix())


def cache_key(files: Sequence[Path], params: PreprocessParams) -> str:
    """Hash of the file list (path, size, mtime) and the preprocessing settings."""
    h = hashlib.sha256(
        f"{CACHE_VERSION}|{params.window_center}|{params.window_width}|{params.size}|"
        f"{params.modalities}|{params.chest}|{params.limits}".encode()
    )
    for path in files:
        try:
            st = path.stat()
            h.update(f"|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{path}|missing".encode())
    return h.hexdigest()[:32]


def _decode(files: Sequence[Path], params: PreprocessParams) -> tuple[list[np.ndarray], int, int]:
    frames: list[np.ndarray] = []
    used = skipped = 0
    for path in files:
        try:
            prepared = prepare(path, params)
        except (InputError, OSError):
            skipped += 1
            continue
        used += 1
        for frame in prepared.frames:
            frames.append(np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8))
    return frames, used, skipped


def load_images(config: PretrainConfig, params: PreprocessParams | None = None) -> PretrainData:
    """Every usable slice of the configured source (from the frame cache when it is current)."""
    params = params or PreprocessParams()
    files = source_files(config)
    key = cache_key(files, params)
    cached = config.work / f"frames-{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    data = PretrainData(z["images"], int(z["files"]), int(z["skipped"]), True)
                    log.info("pretrain data: %d slices from the frame cache", len(data))
                    return data
        except (OSError, ValueError, KeyError):
            log.warning("pretrain frame cache unreadable; decoding the files again")
    frames, used, skipped = _decode(files, params)
    size = params.size
    images = np.stack(frames) if frames else np.zeros((0, size, size), np.uint8)
    data = PretrainData(images, used, skipped, False)
    log.info(
        "pretrain data: %d file(s) gave %d slice(s); %d file(s) skipped (missing or not usable)",
        used,
        len(data),
        skipped,
    )
    if frames:
        buf = io.BytesIO()
        np.savez(
            buf, key=np.array(key), images=images, files=np.array(used), skipped=np.array(skipped)
        )
        for old in config.work.glob("frames-*.npz"):
            old.unlink(missing_ok=True)  # one cache per work folder: the current file list
        write_atomic(cached, buf.getvalue())
    return data
