"""MQTT topic names of the federation, built and parsed in one place.

F = federation id, N = node id, V = global model version, R = round, i = chunk index.

    fl/F/global/current                      retained manifest of the current global model
    fl/F/global/V/chunk/i                    retained chunk i of global model V (safetensors)
    fl/F/global/V/onnx/i                     retained chunk i of V's ONNX export (predict-only)
    fl/F/round/R/update/N/manifest           node N's update manifest for round R
    fl/F/round/R/update/N/chunk/i            chunk i of that update
    fl/F/round/R/ack/N                       coordinator's answer to node N for round R
    fl/F/round/R/metrics/N                   node N's evaluation of the global model of round R
    fl/F/node/N/status                       retained online/offline status (last will)

Ids are letters, digits, ``-`` and ``_`` (at most 64 characters), numbers are canonical
non-negative decimals, so a hostile id or topic can never carry an MQTT wildcard, an extra
path segment or a second spelling of the same round.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fl_protocol.errors import SchemaError

ID_MAX_LEN = 64
MAX_NUMBER = 2**53  # versions, rounds and chunk indices stay exact in JSON and topics
_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{ID_MAX_LEN}}}")
_NUM_RE = re.compile(r"0|[1-9][0-9]{0,15}")

TopicKind = Literal[
    "global_current",
    "global_chunk",
    "global_onnx_chunk",
    "update_manifest",
    "update_chunk",
    "ack",
    "eval_report",
    "node_status",
]


@dataclass(frozen=True)
class TopicInfo:
    """What a topic names; fields that the kind does not use are None."""

    kind: TopicKind
    federation: str
    round: int | None = None
    node: str | None = None
    version: int | None = None
    index: int | None = None


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe federation / node / key id, else raise SchemaError."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise SchemaError(
            f"invalid {what} {value!r}: use 1-{ID_MAX_LEN} letters, digits, '-' or '_'"
        )
    return value


def check_number(value: int, what: str = "number") -> int:
    """Return ``value`` if it is a non-negative int below 2**53, else raise SchemaError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_NUMBER:
        raise SchemaError(f"invalid {what} {value!r}: expected an integer in [0, 2**53)")
    return value


def _prefix(federation: str) -> str:
    return f"fl/{check_id(federation, 'federation')}"


def global_current(federation: str) -> str:
    return f"{_prefix(federation)}/global/current"


def global_chunk(federation: str, version: int, index: int) -> str:
    v, i = check_number(version, "version"), check_number(index, "chunk index")
    return f"{_prefix(federation)}/global/{v}/chunk/{i}"


def global_chunks_filter(federation: str, version: int) -> str:
    return f"{_prefix(federation)}/global/{check_number(version, 'version')}/chunk/+"


def global_onnx_chunk(federation: str, version: int, index: int) -> str:
    """Chunk ``index`` of the coordinator's ONNX export of global model ``version``."""
    v, i = check_number(version, "version"), check_number(index, "chunk index")
    return f"{_prefix(federation)}/global/{v}/onnx/{i}"


def global_onnx_filter(federation: str, version: int) -> str:
    return f"{_prefix(federation)}/global/{check_number(version, 'version')}/onnx/+"


def global_filter(federation: str) -> str:
    """Everything about the global model (manifest and chunks of every version)."""
    return f"{_prefix(federation)}/global/#"


def _round(federation: str, round_: int) -> str:
    return f"{_prefix(federation)}/round/{check_number(round_, 'round')}"


def update_manifest(federation: str, round_: int, node: str) -> str:
    return f"{_round(federation, round_)}/update/{check_id(node, 'node')}/manifest"


def update_chunk(federation: str, round_: int, node: str, index: int) -> str:
    i = check_number(index, "chunk index")
    return f"{_round(federation, round_)}/update/{check_id(node, 'node')}/chunk/{i}"


def updates_filter(federation: str) -> str:
    """Every node's update manifests and chunks, every round (the coordinator subscribes)."""
    return f"{_prefix(federation)}/round/+/update/#"


def ack(federation: str, round_: int, node: str) -> str:
    return f"{_round(federation, round_)}/ack/{check_id(node, 'node')}"


def acks_filter(federation: str, node: str) -> str:
    """Node N's acks for every round (what a node subscribes to)."""
    return f"{_prefix(federation)}/round/+/ack/{check_id(node, 'node')}"


def eval_report(federation: str, round_: int, node: str) -> str:
    return f"{_round(federation, round_)}/metrics/{check_id(node, 'node')}"


def eval_reports_filter(federation: str) -> str:
    return f"{_prefix(federation)}/round/+/metrics/+"


def node_status(federation: str, node: str) -> str:
    return f"{_prefix(federation)}/node/{check_id(node, 'node')}/status"


def node_status_filter(federation: str) -> str:
    return f"{_prefix(federation)}/node/+/status"


def _num(text: str, what: str) -> int:
    if not _NUM_RE.fullmatch(text):
        raise SchemaError(f"invalid {what} {text!r} in topic")
    return check_number(int(text), what)


def _parse_round_topic(federation: str, parts: list[str]) -> TopicInfo:
    # parts = [R, kind, N, ...]
    rnd = _num(parts[0], "round")
    node = check_id(parts[2], "node")
    rest = parts[3:]
    if parts[1] == "update" and rest == ["manifest"]:
        return TopicInfo("update_manifest", federation, round=rnd, node=node)
    if parts[1] == "update" and len(rest) == 2 and rest[0] == "chunk":
        index = _num(rest[1], "chunk index")
        return TopicInfo("update_chunk", federation, round=rnd, node=node, index=index)
    if parts[1] == "ack" and not rest:
        return TopicInfo("ack", federation, round=rnd, node=node)
    if parts[1] == "metrics" and not rest:
        return TopicInfo("eval_report", federation, round=rnd, node=node)
    raise SchemaError("unknown round topic")


def parse_topic(topic: str) -> TopicInfo:
    """Classify a received topic; SchemaError for anything that is not one of ours."""
    if not isinstance(topic, str) or len(topic) > 512:
        raise SchemaError("topic is not a string of at most 512 characters")
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "fl":
        raise SchemaError(f"not a fedscan topic: {topic[:80]!r}")
    federation = check_id(parts[1], "federation")
    section, rest = parts[2], parts[3:]
    try:
        if section == "global":
            if rest == ["current"]:
                return TopicInfo("global_current", federation)
            if len(rest) == 3 and rest[1] in ("chunk", "onnx"):
                version = _num(rest[0], "version")
                index = _num(rest[2], "chunk index")
                kind: TopicKind = "global_chunk" if rest[1] == "chunk" else "global_onnx_chunk"
                return TopicInfo(kind, federation, version=version, index=index)
        elif section == "round" and len(rest) >= 3:
            return _parse_round_topic(federation, rest)
        elif section == "node" and len(rest) == 2 and rest[1] == "status":
            return TopicInfo("node_status", federation, node=check_id(rest[0], "node"))
    except SchemaError as exc:
        raise SchemaError(f"unknown topic {topic[:80]!r}: {exc}") from None
    raise SchemaError(f"unknown topic {topic[:80]!r}")
