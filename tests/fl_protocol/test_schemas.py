"""Message schemas: canonical bytes, strict parsing, version refusal, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_protocol.errors import SchemaError
from fl_protocol.schemas import (
    MAX_MESSAGE_BYTES,
    Ack,
    EvalReport,
    GlobalManifest,
    JsonMessage,
    NodeStatus,
    PayloadManifest,
    RoundConfig,
    UpdateManifest,
)

H = "ab" * 32


def payload(n: int = 2) -> PayloadManifest:
    return PayloadManifest(total_size=10 * n, sha256=H, chunk_size=10, chunk_sha256=[H] * n)


def samples() -> list[JsonMessage]:
    return [
        payload(),
        RoundConfig(round=3, deadline_ts=1.5e9, strategy="fedprox", mu=0.01, codec="int8"),
        GlobalManifest(
            federation="demo",
            version=2,
            arch="resnet18",
            texture_dim=0,
            payload=payload(),
            round=RoundConfig(round=3, deadline_ts=1.5e9),
        ),
        GlobalManifest(
            federation="demo", version=0, arch="cnn2d", texture_dim=26, payload=payload()
        ),
        UpdateManifest(
            federation="demo",
            round=3,
            node="node-a",
            base_version=2,
            codec="fp16",
            num_samples=40,
            payload=payload(3),
            train_metrics={"loss": 0.5, "accuracy": 0.75},
        ),
        Ack(round=3, node="node-a", status="missing", missing=[1, 4]),
        NodeStatus(node="node-a", state="online", model_version=2, capabilities=["train"]),
        EvalReport(
            round=3,
            node="node-a",
            model_version=2,
            n_val=10,
            metrics={"accuracy": 0.8, "auc": 0.9},
            confusion=[[4, 1], [1, 4]],
        ),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: m.KIND)
def test_roundtrip_is_exact_and_canonical(msg: JsonMessage) -> None:
    """Each message parses back equal, with sorted keys and its schema id."""
    data = msg.to_bytes()
    assert type(msg).from_bytes(data) == msg
    obj = json.loads(data)
    assert obj["schema"] == f"fedscan.{msg.KIND}/1"
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def test_lists_become_tuples_and_compare_equal_after_parsing() -> None:
    ack = Ack(round=1, node="n", status="missing", missing=[2, 3])
    assert ack.missing == (2, 3)
    assert Ack.from_bytes(ack.to_bytes()).missing == (2, 3)


def test_unknown_schema_version_is_refused_saying_which() -> None:
    data = (
        samples()[2].to_bytes().replace(b"fedscan.global_manifest/1", b"fedscan.global_manifest/7")
    )
    with pytest.raises(SchemaError, match=r"version 7 is not supported.*version 1"):
        GlobalManifest.from_bytes(data)


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(SchemaError, match="got a ack message"):
        GlobalManifest.from_bytes(Ack(round=1, node="n", status="complete").to_bytes())


def _mutate(msg: JsonMessage, **changes: object) -> bytes:
    obj = msg.to_dict()
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"round": -1},
        {"round": True},
        {"round": 1.5},
        {"num_samples": 0},
        {"node": "a/b"},
        {"node": "+"},
        {"codec": "x" * 65},
        {"nonce": "zz" * 16},
        {"nonce": "ab"},
        {"signature": "not-base64!"},
        {"signature": "AAAA"},
        {"train_metrics": {"loss": "1"}},
        {"train_metrics": {"bad key": 1.0}},
        {"extra": 1},
        {"schema": None},
    ],
)
def test_update_manifest_refuses_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(SchemaError):
        UpdateManifest.from_bytes(_mutate(samples()[4], **changes))


def test_missing_required_field_is_refused() -> None:
    obj = samples()[4].to_dict()
    del obj["node"]
    with pytest.raises(SchemaError):
        UpdateManifest.from_bytes(json.dumps(obj).encode())


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(token: bytes) -> None:
    data = samples()[1].to_bytes().replace(b'"mu":0.01', b'"mu":' + token)
    with pytest.raises(SchemaError):
        RoundConfig.from_bytes(data)


def test_duplicate_keys_and_non_json_are_refused() -> None:
    data = Ack(round=1, node="n", status="complete").to_bytes()
    with pytest.raises(SchemaError, match="duplicate"):
        Ack.from_bytes(data[:-1] + b',"round":2}')
    for junk in (b"", b"\xff\xfe", b"[]", b"null", b"{", b"1"):
        with pytest.raises(SchemaError):
            Ack.from_bytes(junk)


def test_payload_manifest_checks_digests_and_chunk_count() -> None:
    with pytest.raises(SchemaError):
        PayloadManifest(total_size=25, sha256=H, chunk_size=10, chunk_sha256=[H, H])
    with pytest.raises(SchemaError):
        PayloadManifest(total_size=10, sha256=H.upper(), chunk_size=10, chunk_sha256=[H])
    with pytest.raises(SchemaError):
        PayloadManifest(total_size=1, sha256=H, chunk_size=2 * 1024 * 1024, chunk_sha256=[H])
    empty = PayloadManifest(total_size=0, sha256=H, chunk_size=10, chunk_sha256=[])
    assert empty.num_chunks == 0


def test_oversized_manifest_is_refused_both_ways() -> None:
    n = 1100  # 1100 digests of 64 hex digits do not fit in 64 KiB
    big = PayloadManifest(total_size=n, sha256=H, chunk_size=1, chunk_sha256=[H] * n)
    with pytest.raises(SchemaError, match="over"):
        big.to_bytes()
    raw = json.dumps(big.to_dict()).encode()
    assert len(raw) > MAX_MESSAGE_BYTES
    with pytest.raises(SchemaError):
        PayloadManifest.from_bytes(raw)


def test_semantic_checks() -> None:
    with pytest.raises(SchemaError):
        Ack(round=1, node="n", status="maybe")
    with pytest.raises(SchemaError):
        Ack(round=1, node="n", status="rejected", reason="line\nbreak")
    with pytest.raises(SchemaError):
        NodeStatus(node="n", state="asleep")
    with pytest.raises(SchemaError):
        RoundConfig(round=1, deadline_ts=0, train_mode="everything")
    with pytest.raises(SchemaError):
        RoundConfig(round=1, deadline_ts=0, lr=0)
    with pytest.raises(SchemaError):
        EvalReport(
            round=1, node="n", model_version=0, n_val=3, metrics={}, confusion=[[1, 1], [1, 1]]
        )
    with pytest.raises(SchemaError):
        EvalReport(
            round=1, node="n", model_version=0, n_val=4, metrics={}, confusion=[[1, 1, 1], [1]]
        )


def test_floats_accept_json_integers() -> None:
    rc = RoundConfig.from_bytes(_mutate(samples()[1], lr=1, deadline_ts=5))
    assert rc.lr == 1.0 and isinstance(rc.lr, float)


def test_replace_revalidates() -> None:
    with pytest.raises(SchemaError):
        update = samples()[4]
        assert isinstance(update, UpdateManifest)
        dataclasses.replace(update, node="../x")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(obj=_json, kind=st.sampled_from([type(m) for m in samples()]))
def test_fuzzed_json_only_ever_raises_schema_error(obj: object, kind: type[JsonMessage]) -> None:
    with contextlib.suppress(SchemaError):
        kind.from_bytes(json.dumps(obj).encode())


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzzed_field_values_only_ever_raise_schema_error(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(samples()))
    obj = msg.to_dict()
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(_json)
    with contextlib.suppress(SchemaError):
        type(msg).from_bytes(json.dumps(obj).encode())


@given(st.binary(max_size=200))
def test_fuzzed_bytes_only_ever_raise_schema_error(raw: bytes) -> None:
    with contextlib.suppress(SchemaError):
        UpdateManifest.from_bytes(raw)


# -- global manifest schema version 2: the ONNX artifact ----------------------------------------


def onnx_manifest() -> GlobalManifest:
    return dataclasses.replace(samples()[2], onnx=payload(3))  # type: ignore[arg-type]


def test_a_manifest_with_an_onnx_export_is_schema_version_2_and_roundtrips() -> None:
    """The ONNX artifact has its own size, sha256 and chunk digests; its presence makes the
    manifest version 2, its absence leaves the version-1 bytes exactly as before."""
    m = onnx_manifest()
    data = m.to_bytes()
    obj = json.loads(data)
    assert obj["schema"] == "fedscan.global_manifest/2"
    assert obj["onnx"]["chunk_sha256"] == [H] * 3
    assert GlobalManifest.from_bytes(data) == m
    v1 = json.loads(samples()[2].to_bytes())
    assert v1["schema"] == "fedscan.global_manifest/1" and "onnx" not in v1


def test_an_old_build_refuses_a_version_2_manifest_saying_so() -> None:
    """A node that reads only version 1 (the build before the ONNX artifact) refuses a
    version-2 manifest with a message naming both versions, not a vague unknown field."""
    from fl_protocol.schemas import check_schema

    obj = json.loads(onnx_manifest().to_bytes())
    with pytest.raises(SchemaError, match=r"version 2 is not supported.*version 1"):
        check_schema(obj["schema"], "global_manifest", (1,))


@pytest.mark.parametrize("schema", ["fedscan.global_manifest/1", "fedscan.global_manifest/2"])
def test_the_schema_version_must_match_the_onnx_field(schema: str) -> None:
    """Version 1 with an ``onnx`` field, or version 2 without one, is refused."""
    obj = json.loads(onnx_manifest().to_bytes())
    if schema.endswith("/2"):
        del obj["onnx"]
    obj["schema"] = schema
    with pytest.raises(SchemaError, match="fields of schema version"):
        GlobalManifest.from_bytes(json.dumps(obj).encode())


def test_the_coordinator_signature_covers_the_onnx_artifact() -> None:
    """Changing the ONNX digest of a signed manifest breaks its signature."""
    from fl_protocol.errors import SignatureError
    from fl_protocol.signing import generate_keypair, sign_manifest, verify_manifest

    private, public = generate_keypair()
    signed = sign_manifest(onnx_manifest(), private, "coordinator")
    verify_manifest(GlobalManifest.from_bytes(signed.to_bytes()), public)
    other = PayloadManifest(total_size=30, sha256="cd" * 32, chunk_size=10, chunk_sha256=[H] * 3)
    forged = dataclasses.replace(signed, onnx=other)
    with pytest.raises(SignatureError):
        verify_manifest(forged, public)


def test_a_manifest_carries_the_onnx_operating_point_for_training_nodes() -> None:
    """The operating point of the coordinator's ONNX export rides in the manifest (schema
    version 2); read back from ONNX metadata it gives the same entries; out-of-range values and
    a version-1 manifest with the field are refused."""
    from fl_protocol.schemas import ServingPoint

    point = ServingPoint(
        temperature=1.7, threshold=0.42, uncertain_band=0.1, n_val=55, calibration_version=3
    )
    m = dataclasses.replace(onnx_manifest(), operating_point=point)
    data = m.to_bytes()
    assert json.loads(data)["operating_point"]["threshold"] == 0.42
    assert GlobalManifest.from_bytes(data) == m
    assert ServingPoint.from_metadata(point.metadata()) == point
    assert ServingPoint.from_metadata({"fedscan.model_version": "3"}) is None
    with pytest.raises(SchemaError, match="threshold"):
        dataclasses.replace(point, threshold=1.5)
    obj = json.loads(data)
    del obj["onnx"]  # the point alone still makes it version 2
    assert GlobalManifest.from_dict(obj).schema_version() == 2
    obj["schema"] = "fedscan.global_manifest/1"
    with pytest.raises(SchemaError, match="fields of schema version"):
        GlobalManifest.from_dict(obj)
