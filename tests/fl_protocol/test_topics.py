"""Topic builders and parse_topic: every topic round-trips, hostile ones are refused."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl_protocol import topics
from fl_protocol.errors import SchemaError


def test_builders_match_the_architecture_table() -> None:
    """The topic names are exactly those of ARCHITECTURE.md's protocol table."""
    assert topics.global_current("demo") == "fl/demo/global/current"
    assert topics.global_chunk("demo", 3, 7) == "fl/demo/global/3/chunk/7"
    assert topics.global_chunks_filter("demo", 3) == "fl/demo/global/3/chunk/+"
    assert topics.update_manifest("demo", 2, "n-1") == "fl/demo/round/2/update/n-1/manifest"
    assert topics.update_chunk("demo", 2, "n-1", 0) == "fl/demo/round/2/update/n-1/chunk/0"
    assert topics.updates_filter("demo") == "fl/demo/round/+/update/#"
    assert topics.ack("demo", 2, "n_1") == "fl/demo/round/2/ack/n_1"
    assert topics.eval_report("demo", 2, "a") == "fl/demo/round/2/metrics/a"
    assert topics.node_status("demo", "a") == "fl/demo/node/a/status"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("fl/f/global/current", topics.TopicInfo("global_current", "f")),
        ("fl/f/global/4/chunk/2", topics.TopicInfo("global_chunk", "f", version=4, index=2)),
        (
            "fl/f/round/1/update/n/manifest",
            topics.TopicInfo("update_manifest", "f", round=1, node="n"),
        ),
        (
            "fl/f/round/1/update/n/chunk/9",
            topics.TopicInfo("update_chunk", "f", round=1, node="n", index=9),
        ),
        ("fl/f/round/0/ack/n", topics.TopicInfo("ack", "f", round=0, node="n")),
        ("fl/f/round/5/metrics/n", topics.TopicInfo("eval_report", "f", round=5, node="n")),
        ("fl/f/node/n/status", topics.TopicInfo("node_status", "f", node="n")),
    ],
)
def test_parse_topic_classifies_each_kind(topic: str, expected: topics.TopicInfo) -> None:
    assert topics.parse_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "fl/f/global/current/x",
        "fl/f/global/01/chunk/1",  # non-canonical number: a second spelling of version 1
        "fl/f/global/-1/chunk/1",
        "fl/f/round/1/update/+/manifest",
        "fl/f/round/1/update/#",
        "fl/f/round/1/update/a/b/manifest",
        "fl/f/round/x/ack/n",
        "fl/f/round/1/ack/n/extra",
        "fl/+/global/current",
        "fl/f/node/n/status/",
        "fl//global/current",
        "other/f/global/current",
        "fl/f/round/1/update/n/chunk/99999999999999999999",
        "fl/" + "a" * 65 + "/global/current",
        "",
    ],
)
def test_parse_topic_refuses_unknown_or_hostile_topics(topic: str) -> None:
    with pytest.raises(SchemaError):
        topics.parse_topic(topic)


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "a b", "é", "x" * 65, "..", "a\x00"])
def test_builders_refuse_ids_that_could_inject_segments_or_wildcards(bad: str) -> None:
    with pytest.raises(SchemaError):
        topics.node_status("demo", bad)
    with pytest.raises(SchemaError):
        topics.global_current(bad)


@pytest.mark.parametrize("bad", [-1, True, 2**53, 1.0])
def test_builders_refuse_bad_numbers(bad: object) -> None:
    with pytest.raises(SchemaError):
        topics.update_chunk("demo", bad, "n", 0)  # type: ignore[arg-type]


_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
_nums = st.integers(min_value=0, max_value=2**53 - 1)


@given(fed=_ids, node=_ids, rnd=_nums, idx=_nums)
def test_every_built_topic_parses_back(fed: str, node: str, rnd: int, idx: int) -> None:
    info = topics.parse_topic(topics.update_chunk(fed, rnd, node, idx))
    assert (info.kind, info.federation, info.round, info.node, info.index) == (
        "update_chunk",
        fed,
        rnd,
        node,
        idx,
    )
    assert topics.parse_topic(topics.global_chunk(fed, rnd, idx)).version == rnd


@given(st.text(max_size=120))
def test_parse_topic_never_crashes(text: str) -> None:
    with contextlib.suppress(SchemaError):
        topics.parse_topic(text)


def test_onnx_chunks_of_a_global_version_have_their_own_topic() -> None:
    """The coordinator's ONNX export of version V goes on fl/F/global/V/onnx/i, beside the
    weights' chunks, under the same global/# ACL."""
    assert topics.global_onnx_chunk("demo", 3, 7) == "fl/demo/global/3/onnx/7"
    assert topics.global_onnx_filter("demo", 3) == "fl/demo/global/3/onnx/+"
    info = topics.parse_topic("fl/demo/global/3/onnx/7")
    assert info == topics.TopicInfo("global_onnx_chunk", "demo", version=3, index=7)
    with pytest.raises(SchemaError):
        topics.parse_topic("fl/demo/global/3/onnx/07")
