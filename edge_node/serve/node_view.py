"""What the HTTP API reads from the running node: a narrow, read-only view of its parts.

``edge_node.daemon.Daemon`` satisfies ``NodeView``; the API takes any object that does, so
``serve.api`` never imports the daemon (the daemon imports the API, not the other way round).
"""

from __future__ import annotations

from typing import Protocol

from edge_node.config import NodeConfig
from edge_node.federate.model_refusal import RefusedModels
from edge_node.ingest.watcher import Watcher
from edge_node.serve.inference import ModelHolder
from edge_node.serve.pipeline import Pipeline
from edge_node.serve.stats import DicomStats, PipelineStats
from edge_node.store import Store


class MonitorView(Protocol):
    """The model-file monitor: which replacement models it refused."""

    @property
    def refusals(self) -> RefusedModels: ...


class OutboxView(Protocol):
    """The DICOM services, when ``[dicom]`` is on: results still waiting to be sent."""

    def outbox_pending(self) -> int: ...


class NodeView(Protocol):
    """The parts of a running node the API routes and the studies page use."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def store(self) -> Store: ...

    @property
    def holder(self) -> ModelHolder: ...

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def watcher(self) -> Watcher: ...

    @property
    def monitor(self) -> MonitorView: ...

    @property
    def stats(self) -> PipelineStats: ...

    @property
    def dicom_stats(self) -> DicomStats: ...

    @property
    def dicom(self) -> OutboxView | None: ...

    @property
    def started_at(self) -> float: ...
