"""The DICOM services of one node, built from ``[dicom]``: listener, outbox and sender.

The daemon starts them after its pipeline and watcher (a received instance is picked up at
once) and stops the listener first at shutdown (no new files while the pipeline drains).
"""

from __future__ import annotations

import logging

from edge_node.config import NodeConfig
from edge_node.dicomnet.listener import Listener
from edge_node.dicomnet.outbox import Outbox
from edge_node.dicomnet.sender import Sender
from edge_node.errors import ConfigError
from edge_node.serve.stats import DicomStats

log = logging.getLogger(__name__)


def outbox_for(config: NodeConfig) -> Outbox:
    """The node's outbox (``<state_dir>/outbox``) with the configured retry backoff."""
    send = config.dicom.send_to
    return Outbox(
        config.paths.state.outbox,
        backoff_base_s=send.retry_base_s,
        backoff_cap_s=send.retry_cap_s,
    )


class DicomServices:
    """What ``[dicom]`` turns on; ``enabled`` is False when there is nothing to run."""

    def __init__(self, config: NodeConfig, stats: DicomStats) -> None:
        dicom = config.dicom
        self.stats = stats
        self.outbox = outbox_for(config)
        self.listener: Listener | None = None
        self.sender: Sender | None = None
        if dicom.listener.enabled:
            self.listener = Listener(
                dicom.listener,
                config.paths.inbox,
                stats,
                port_file=config.paths.state.dicom_port,
            )
        if dicom.send_to.enabled or dicom.results_dir is not None:
            self.sender = Sender(
                self.outbox,
                stats,
                pacs=dicom.send_to if dicom.send_to.enabled else None,
                results_dir=dicom.results_dir,
                keep_sent_s=dicom.keep_sent_days * 86400.0,
            )

    @property
    def enabled(self) -> bool:
        return self.listener is not None or self.sender is not None

    def start(self) -> None:
        if self.sender is not None:
            self.sender.start()
        if self.listener is not None:
            cfg = self.listener.config
            try:
                self.listener.start()
            except OSError as exc:
                where = f"{cfg.host}:{cfg.port}"
                raise ConfigError(f"dicom.listener: cannot listen on {where}: {exc}") from exc

    def stop_intake(self) -> None:
        """Stop receiving (first thing at shutdown)."""
        if self.listener is not None:
            self.listener.stop()

    def stop(self) -> None:
        self.stop_intake()
        if self.sender is not None:
            self.sender.stop()

    def outbox_pending(self) -> int:
        return len(self.outbox.pending())
