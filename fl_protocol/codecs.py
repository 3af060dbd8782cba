"""Update codecs: how a weight delta becomes bytes on the wire, and back.

The wire format is always safetensors (never pickle) with metadata ``schema`` =
``fedscan.update/1`` and ``codec`` = the codec name. Codecs are registered by name:

    fp32          float32 as is (lossless)
    fp16          float16 (half the bytes; |x| must stay below 65504)
    int8          int8 with one float32 scale per tensor (``<name>::scale``, shape ())
    int8_channel  int8 with one scale per output channel (dim 0, shape (C,)); tensors with
                  fewer than 2 dims use one scale

Quantization is symmetric: q = round(x / s), s = max|x| / 127, so |x - q s| <= s / 2.
Integer and bool tensors (BatchNorm ``num_batches_tracked``) pass through unchanged in every
codec. ``keys`` restricts the update to the trainable tensors (a head-only round sends
kilobytes). ``decode`` returns float32 for every floating tensor and the original dtype for
integer / bool ones, and refuses anything malformed with CodecError.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fl_protocol.errors import CodecError

SCHEMA = "fedscan.update/1"
SCALE_SUFFIX = "::scale"
FP16_MAX = 65504.0
MAX_HEADER_BYTES = 16 * 1024 * 1024
_PASSTHROUGH_KINDS = "iub"  # signed / unsigned integers, bool


class Codec:
    """Encodes one float tensor into stored tensors and back; subclasses register by name."""

    name: ClassVar[str]

    def encode_tensor(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode_tensor(self, name: str, stored: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(name: str) -> Callable[[type[Codec]], type[Codec]]:
    def deco(cls: type[Codec]) -> type[Codec]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_codecs() -> list[str]:
    return sorted(_REGISTRY)


def create_codec(name: str) -> Codec:
    """The codec registered as ``name``; CodecError listing the choices otherwise."""
    try:
        return _REGISTRY[name]()
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; choose one of {list_codecs()}") from None


def _expect(stored: Mapping[str, np.ndarray], key: str, dtype: str) -> np.ndarray:
    arr = stored.get(key)
    if arr is None:
        raise CodecError(f"tensor {key!r} missing from the update")
    if arr.dtype != np.dtype(dtype):
        raise CodecError(f"tensor {key!r} is {arr.dtype}, expected {dtype}")
    return arr


@register_codec("fp32")
class Fp32Codec(Codec):
    def encode_tensor(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        return {name: x.astype(np.float32)}

    def decode_tensor(self, name: str, stored: Mapping[str, np.ndarray]) -> np.ndarray:
        return _expect(stored, name, "float32").astype(np.float32)


@register_codec("fp16")
class Fp16Codec(Codec):
    def encode_tensor(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        if x.size and float(np.max(np.abs(x))) > FP16_MAX:
            raise CodecError(f"tensor {name!r} exceeds the float16 range; use fp32")
        return {name: x.astype(np.float16)}

    def decode_tensor(self, name: str, stored: Mapping[str, np.ndarray]) -> np.ndarray:
        return _expect(stored, name, "float16").astype(np.float32)


def _quantize(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.asarray(np.clip(np.rint(x / safe), -127, 127), dtype=np.int8)


@register_codec("int8")
class Int8Codec(Codec):
    per_channel: ClassVar[bool] = False

    def _scale(self, x: np.ndarray) -> np.ndarray:
        if self.per_channel and x.ndim >= 2:
            amax = np.max(np.abs(x.reshape(x.shape[0], -1)), axis=1) if x.size else np.zeros(0)
            return (amax / 127.0).astype(np.float32)
        amax = float(np.max(np.abs(x))) if x.size else 0.0
        return np.asarray(amax / 127.0, dtype=np.float32)

    def encode_tensor(self, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        x = x.astype(np.float32)
        scale = self._scale(x)
        bcast = scale.reshape((-1,) + (1,) * (x.ndim - 1)) if scale.ndim else scale
        return {name: _quantize(x, bcast), name + SCALE_SUFFIX: scale}

    def decode_tensor(self, name: str, stored: Mapping[str, np.ndarray]) -> np.ndarray:
        q = _expect(stored, name, "int8")
        scale = _expect(stored, name + SCALE_SUFFIX, "float32")
        per_channel_ok = self.per_channel and q.ndim >= 2 and scale.shape == (q.shape[0],)
        if scale.shape != () and not per_channel_ok:
            raise CodecError(f"scale of {name!r} has shape {scale.shape} for a {q.shape} tensor")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise CodecError(f"scale of {name!r} is negative or not finite")
        bcast = scale.reshape((-1,) + (1,) * (q.ndim - 1)) if scale.ndim else scale
        # A hostile scale near float32 max overflows the product: refuse it, never warn.
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(q.astype(np.float32) * bcast, dtype=np.float32)
        if not np.all(np.isfinite(out)):
            raise CodecError(f"scale of {name!r} overflows float32 when decoded")
        return out


@register_codec("int8_channel")
class Int8ChannelCodec(Int8Codec):
    per_channel = True


def encode(delta: Mapping[str, np.ndarray], codec: str, keys: Iterable[str] | None = None) -> bytes:
    """Serialise ``delta`` (restricted to ``keys`` if given) with ``codec`` to safetensors."""
    impl = create_codec(codec)
    names = sorted(delta) if keys is None else sorted(set(keys))
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        if name not in delta:
            raise CodecError(f"key {name!r} is not in the delta")
        if SCALE_SUFFIX in name or not name:
            raise CodecError(f"tensor name {name!r} is reserved or empty")
        x = np.asarray(delta[name])
        if x.dtype.kind in _PASSTHROUGH_KINDS:
            tensors[name] = np.asarray(x, order="C")
            continue
        if x.dtype.kind != "f":
            raise CodecError(f"tensor {name!r} has unsupported dtype {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise CodecError(f"tensor {name!r} contains NaN or inf")
        for key, arr in impl.encode_tensor(name, x).items():
            tensors[key] = np.asarray(arr, order="C")
    metadata = {"schema": SCHEMA, "codec": impl.name, "tensors": str(len(names))}
    return bytes(st_save(tensors, metadata=metadata))


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors ``__metadata__`` of ``data``, parsed without loading any tensor."""
    if len(data) < 8:
        raise CodecError("update is too short to be safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise CodecError("safetensors header length is out of bounds")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CodecError("safetensors header is not valid JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CodecError("update has no fedscan metadata")
    return meta


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Parse an update made by ``encode``; CodecError for anything malformed or unknown."""
    meta = read_metadata(data)
    if meta.get("schema") != SCHEMA:
        raise CodecError(f"update schema {meta.get('schema')!r} is not supported ({SCHEMA})")
    impl = create_codec(meta.get("codec", ""))
    try:
        stored = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CodecError(f"malformed safetensors payload: {type(exc).__name__}") from None
    out: dict[str, np.ndarray] = {}
    for name, arr in stored.items():
        if name.endswith(SCALE_SUFFIX):
            if name.removesuffix(SCALE_SUFFIX) not in stored:
                raise CodecError(f"orphan scale tensor {name!r}")
            continue
        quantized = name + SCALE_SUFFIX in stored
        if arr.dtype.kind in _PASSTHROUGH_KINDS and not quantized:
            out[name] = arr
        else:
            value = impl.decode_tensor(name, stored)
            if not np.all(np.isfinite(value)):
                raise CodecError(f"tensor {name!r} decodes to NaN or inf")
            out[name] = value
    if meta.get("tensors") not in (None, str(len(out))):
        raise CodecError("update holds a different number of tensors than its metadata says")
    return out
