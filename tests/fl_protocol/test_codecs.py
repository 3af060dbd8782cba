"""Update codecs: round-trip error bounds, byte sizes, key subsets, malformed input."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from fl_protocol import codecs
from fl_protocol.errors import CodecError


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    """A small conv-net-like delta: conv weights, biases, BN stats, a head."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.normal(size=(32, 16, 3, 3)) * 0.01).astype(np.float32),
        "conv.bias": (rng.normal(size=32) * 0.01).astype(np.float32),
        "bn.running_mean": rng.normal(size=32).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "head.weight": (rng.normal(size=(2, 512)) * 0.05).astype(np.float32),
        "head.bias": np.zeros(2, dtype=np.float32),
        "flag": np.array([True, False]),
    }


@pytest.mark.parametrize("name", codecs.list_codecs())
def test_roundtrip_error_bounds(name: str) -> None:
    """Each codec's decoded tensors stay within its documented error bound."""
    d = delta()
    out = codecs.decode(codecs.encode(d, name))
    assert set(out) == set(d)
    for key, x in d.items():
        y = out[key]
        assert y.shape == x.shape
        if x.dtype.kind != "f":
            assert y.dtype == x.dtype and np.array_equal(x, y)  # lossless pass-through
            continue
        assert y.dtype == np.float32
        err = np.abs(y - x)
        if name == "fp32":
            assert np.array_equal(x, y)
        elif name == "fp16":
            assert np.all(err <= np.abs(x) * 2**-11 + 1e-7)
        elif name == "int8" or x.ndim < 2:
            assert np.all(err <= np.max(np.abs(x)) / 127 / 2 + 1e-7)
        else:  # int8_channel: half a step of each output channel's own scale
            step = np.max(np.abs(x.reshape(x.shape[0], -1)), axis=1) / 127
            assert np.all(err.reshape(x.shape[0], -1) <= step[:, None] / 2 + 1e-7)


def test_per_channel_beats_per_tensor_on_unequal_channels() -> None:
    rng = np.random.default_rng(1)
    w = (
        rng.normal(size=(8, 64)).astype(np.float32)
        * np.logspace(-4, 0, 8, dtype=np.float32)[:, None]
    )
    e_t = np.abs(codecs.decode(codecs.encode({"w": w}, "int8"))["w"] - w).mean()
    e_c = np.abs(codecs.decode(codecs.encode({"w": w}, "int8_channel"))["w"] - w).mean()
    assert e_c < e_t / 2


def test_byte_sizes_shrink_as_documented() -> None:
    """fp16 is about half of fp32, int8 about a quarter (>= 3.5x fewer bytes)."""
    rng = np.random.default_rng(2)
    d = {f"l{i}.weight": rng.normal(size=(64, 64, 3, 3)).astype(np.float32) for i in range(4)}
    size = {n: len(codecs.encode(d, n)) for n in codecs.list_codecs()}
    assert size["fp16"] < 0.51 * size["fp32"]
    assert size["fp32"] / size["int8"] >= 3.5
    assert size["fp32"] / size["int8_channel"] >= 3.5


def test_keys_sends_only_trainable_tensors() -> None:
    """A head-only round sends kilobytes, not the whole model."""
    d = delta()
    full = codecs.encode(d, "fp32")
    head = codecs.encode(d, "fp32", keys=["head.weight", "head.bias"])
    assert set(codecs.decode(head)) == {"head.weight", "head.bias"}
    assert len(head) < 5000 < len(full)
    with pytest.raises(CodecError, match="not in the delta"):
        codecs.encode(d, "fp32", keys=["nope"])


def test_unknown_codec_lists_the_choices() -> None:
    with pytest.raises(CodecError, match=r"unknown codec 'zip'.*fp16.*int8_channel"):
        codecs.encode(delta(), "zip")


def test_encode_refuses_bad_tensors() -> None:
    with pytest.raises(CodecError, match="NaN"):
        codecs.encode({"w": np.array([1.0, np.nan], np.float32)}, "int8")
    with pytest.raises(CodecError, match="float16"):
        codecs.encode({"w": np.array([1e6], np.float32)}, "fp16")
    with pytest.raises(CodecError, match="reserved"):
        codecs.encode({"w::scale": np.zeros(1, np.float32)}, "fp32")
    with pytest.raises(CodecError, match="dtype"):
        codecs.encode({"w": np.array(["a"])}, "fp32")


def test_zero_and_scalar_and_empty_tensors() -> None:
    d: dict[str, np.ndarray] = {
        "z": np.zeros((4, 3), np.float32),
        "s": np.asarray(np.float32(2.5)),
        "e": np.zeros((0, 3), np.float32),
        "d": np.ones(3, np.float64),
    }
    for name in codecs.list_codecs():
        out = codecs.decode(codecs.encode(d, name))
        assert np.array_equal(out["z"], d["z"]) and out["s"].shape == ()
        assert abs(float(out["s"]) - 2.5) < 0.02 and out["e"].shape == (0, 3)
        assert out["d"].dtype == np.float32


def _raw(arrays: dict[str, np.ndarray], **meta: str) -> bytes:
    metadata = {"schema": codecs.SCHEMA, "codec": "int8", **meta}
    return bytes(st_save(arrays, metadata=metadata))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"1234567",
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 2) + b"{}",  # no metadata
        struct.pack("<Q", 4) + b"\xff\xff\xff\xff",
        bytes(st_save({"w": np.zeros(2, np.float32)})),  # plain safetensors, no fedscan metadata
        _raw({"w": np.zeros(2, np.int8)}, schema="fedscan.update/9"),
        _raw({"w": np.zeros(2, np.int8)}, codec="zip"),
        _raw({"w::scale": np.ones((), np.float32)}),  # orphan scale
        _raw({"w": np.zeros(2, np.float32), "w::scale": np.ones((), np.float32)}),  # wrong dtype
        _raw({"w": np.zeros((2, 2), np.int8), "w::scale": np.ones(3, np.float32)}),
        _raw({"w": np.zeros(2, np.int8), "w::scale": np.array(-1.0, np.float32)}),
        _raw({"w": np.zeros(2, np.int8), "w::scale": np.array(np.inf, np.float32)}),
        # finite scale, but 127 * 3e38 overflows float32 (found by the fuzzer below)
        _raw({"w": np.full(2, 127, np.int8), "w::scale": np.array(3e38, np.float32)}),
        _raw({"w": np.zeros(2, np.int8)}, tensors="5"),
    ],
)
def test_decode_refuses_malformed_input(data: bytes) -> None:
    with pytest.raises(CodecError):
        codecs.decode(data)


def test_decode_refuses_truncated_and_pickle() -> None:
    good = codecs.encode(delta(), "int8")
    with pytest.raises(CodecError):
        codecs.decode(good[: len(good) // 2])
    import pickle

    with pytest.raises(CodecError):
        codecs.decode(pickle.dumps(delta()))


def test_metadata_is_readable_without_loading() -> None:
    meta = codecs.read_metadata(codecs.encode(delta(), "int8_channel"))
    assert meta["codec"] == "int8_channel" and meta["schema"] == "fedscan.update/1"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_fuzzed_bytes_only_ever_raise_codec_error(junk: bytes, cut: int) -> None:
    good = codecs.encode({"w": np.ones((2, 2), np.float32)}, "int8")
    for data in (junk, good[:cut] + junk, good[:8] + json.dumps({"__metadata__": 1}).encode()):
        with contextlib.suppress(CodecError):
            codecs.decode(data)
