"""Chunked transfer: split, reassembly in any order with duplicates, spool resume, outbox."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_protocol.chunking import Outbox, Reassembler, split
from fl_protocol.errors import IntegrityError, SchemaError
from fl_protocol.schemas import PayloadManifest, UpdateManifest


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_split_makes_1mib_chunks_with_digests() -> None:
    data = blob(2 * 1024 * 1024 + 5)
    manifest, chunks = split(data)
    assert [len(c) for c in chunks] == [1024 * 1024, 1024 * 1024, 5]
    assert manifest.total_size == len(data) and manifest.num_chunks == 3
    assert b"".join(chunks) == data


def test_split_refuses_chunks_over_1mib() -> None:
    with pytest.raises(SchemaError):
        split(b"x", chunk_size=1024 * 1024 + 1)
    with pytest.raises(SchemaError):
        split(b"x", chunk_size=0)


@pytest.mark.parametrize("spool", [False, True])
def test_any_order_with_duplicates_reassembles(tmp_path: Path, spool: bool) -> None:
    """Chunks shuffled and each delivered twice (QoS 1) give back the payload exactly."""
    data = blob(10_000, seed=1)
    manifest, chunks = split(data, chunk_size=999)
    r = Reassembler(manifest, tmp_path / "spool" if spool else None)
    order = list(range(len(chunks))) * 2
    random.Random(2).shuffle(order)
    firsts = [r.add(i, chunks[i]) for i in order]
    assert firsts.count(True) == len(chunks) and firsts.count(False) == len(chunks)
    assert r.complete and r.missing() == []
    assert r.result() == data


def test_tampered_chunk_is_refused_and_not_stored(tmp_path: Path) -> None:
    manifest, chunks = split(blob(3000), chunk_size=1000)
    r = Reassembler(manifest, tmp_path)
    bad = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
    with pytest.raises(IntegrityError):
        r.add(1, bad)
    with pytest.raises(IntegrityError):
        r.add(1, chunks[1][:-1])
    with pytest.raises(IntegrityError):
        r.add(3, chunks[0])
    assert r.missing() == [0, 1, 2]
    assert not (tmp_path / "1.chunk").exists()
    assert r.add(1, chunks[1]) is True


def test_missing_lists_what_to_request_and_result_refuses_incomplete() -> None:
    manifest, chunks = split(blob(5000), chunk_size=1000)
    r = Reassembler(manifest)
    r.add(0, chunks[0])
    r.add(3, chunks[3])
    assert r.missing() == [1, 2, 4]
    assert not r.complete
    with pytest.raises(IntegrityError, match="3 chunk"):
        r.result()


def test_restarted_receiver_resumes_from_spool(tmp_path: Path) -> None:
    """A receiver killed half-way re-opens its spool and only needs the rest."""
    data = blob(6000, seed=3)
    manifest, chunks = split(data, chunk_size=1000)
    first = Reassembler(manifest, tmp_path)
    for i in (0, 2, 4):
        first.add(i, chunks[i])
    del first
    (tmp_path / "2.chunk").write_bytes(b"corrupted on disk")
    second = Reassembler(manifest, tmp_path)
    assert second.missing() == [1, 2, 3, 5]
    for i in second.missing():
        second.add(i, chunks[i])
    assert second.result() == data
    second.discard()
    assert not tmp_path.exists()


def test_spool_of_another_payload_is_discarded(tmp_path: Path) -> None:
    m1, c1 = split(blob(2000, seed=4), chunk_size=1000)
    m2, _ = split(blob(2000, seed=5), chunk_size=1000)
    Reassembler(m1, tmp_path).add(0, c1[0])
    assert Reassembler(m2, tmp_path).missing() == [0, 1]


def test_manifest_that_lies_about_the_whole_is_caught() -> None:
    data = blob(2000)
    manifest, chunks = split(data, chunk_size=1000)
    lying = PayloadManifest(
        total_size=manifest.total_size,
        sha256="0" * 64,
        chunk_size=manifest.chunk_size,
        chunk_sha256=manifest.chunk_sha256,
    )
    r = Reassembler(lying)
    for i, c in enumerate(chunks):
        r.add(i, c)
    with pytest.raises(IntegrityError, match="sha256"):
        r.result()


def update_for(round_: int, data: bytes) -> tuple[UpdateManifest, list[bytes]]:
    payload, chunks = split(data, chunk_size=1000)
    manifest = UpdateManifest(
        federation="demo",
        round=round_,
        node="a",
        base_version=round_ - 1,
        codec="fp16",
        num_samples=5,
        payload=payload,
    )
    return manifest, chunks


def test_outbox_keeps_updates_until_acked_across_restarts(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    m3, c3 = update_for(3, blob(2500, 3))
    m2, c2 = update_for(2, blob(1500, 2))
    box.put(m3, c3)
    box.put(m2, c2)
    reopened = Outbox(tmp_path)  # the node restarted
    pending = reopened.pending()
    assert [p.round for p in pending] == [2, 3]
    assert pending[1].manifest == m3
    assert [c for _, c in pending[1].chunks()] == c3
    assert reopened.ack(2) is True and reopened.ack(2) is False
    assert [p.round for p in Outbox(tmp_path).pending()] == [3]


def test_outbox_refuses_chunks_that_do_not_match(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    m, c = update_for(1, blob(2000))
    with pytest.raises(IntegrityError):
        box.put(m, [c[0], c[0]])
    with pytest.raises(IntegrityError):
        box.put(m, c[:1])
    assert box.pending() == []


def test_outbox_ignores_half_written_and_broken_entries(tmp_path: Path) -> None:
    """A crash mid-write leaves a .tmp dir (removed on open); a broken entry is dropped."""
    box = Outbox(tmp_path)
    m, c = update_for(4, blob(1200))
    box.put(m, c)
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / ".tmp-crashed" / "0.chunk").write_bytes(b"half")
    broken = tmp_path / "round-9"
    broken.mkdir()
    (broken / "manifest.json").write_bytes(b"{not json")
    box2 = Outbox(tmp_path)
    assert [p.round for p in box2.pending()] == [4]
    assert sorted(os.listdir(tmp_path)) == ["round-4"]


def test_outbox_replaces_an_update_for_the_same_round(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    m1, c1 = update_for(1, blob(1000, 1))
    m2, c2 = update_for(1, blob(1000, 2))
    box.put(m1, c1)
    box.put(m2, c2)
    (only,) = box.pending()
    assert only.manifest == m2 and only.chunk(0) == c2[0]


@settings(max_examples=200, deadline=None)
@given(
    index=st.integers(min_value=-5, max_value=10),
    data=st.binary(max_size=1200),
    real=st.booleans(),
)
def test_fuzzed_chunks_only_ever_raise_integrity_error(index: int, data: bytes, real: bool) -> None:
    manifest, chunks = split(blob(3000, 9), chunk_size=1000)
    r = Reassembler(manifest)
    if real and 0 <= index < len(chunks):
        data = chunks[index]
    try:
        assert r.add(index, data) is True
    except IntegrityError:
        assert r.missing() == [0, 1, 2]
