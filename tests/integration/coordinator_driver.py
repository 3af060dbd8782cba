"""A real coordinator process that SIGKILLs itself at a chosen phase of a round.

    python -m tests.integration.coordinator_driver --config coordinator.toml --kill-at PHASE[:N]

Runs what `fedscan coordinator run` runs (``broker_transport`` + ``CoordinatorService.run``,
torch-free model facts from ``tests.coordinator.fakes.tiny_source``) with the service's phase
hook sending SIGKILL to its own process the N-th time PHASE is reached (default 1): a real
kill -9, placed exactly (between writing a spool file and recording its row, between writing a
checkpoint and committing it, ...). Phases: round_opened, round_published, update_spooled,
update_recorded, aggregating, checkpoint_written, aggregate_committed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from coordinator.config import load_config
from coordinator.service import CoordinatorService, broker_transport
from tests.coordinator.fakes import tiny_source

PHASES = (
    "round_opened",
    "round_published",
    "update_spooled",
    "update_recorded",
    "aggregating",
    "checkpoint_written",
    "aggregate_committed",
)


def kill_hook(phase: str, nth: int) -> Any:
    seen = 0

    def hook(p: str) -> None:
        nonlocal seen
        if p != phase:
            return
        seen += 1
        if seen == nth:
            logging.getLogger("coordinator_driver").warning("SIGKILL at %s #%d", phase, nth)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--kill-at", required=True, help="PHASE or PHASE:N")
    args = parser.parse_args(argv)
    phase, _, nth = args.kill_at.partition(":")
    if phase not in PHASES:
        parser.error(f"unknown phase {phase!r}; one of {PHASES}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(Path(args.config))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_a: stop.set())
    with broker_transport(cfg) as transport:
        service = CoordinatorService(
            cfg, transport, model_source=tiny_source, hook=kill_hook(phase, int(nth or 1))
        )
        return service.run(stop)


if __name__ == "__main__":
    sys.exit(main())
