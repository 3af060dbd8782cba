"""`fedscan coordinator init | run | status`.

    fedscan coordinator init DIR [--federation F] [--force]
    fedscan coordinator run --config coordinator.toml [--rounds N]
    fedscan coordinator status --config coordinator.toml [--json]

``--rounds N`` overrides ``rounds.num_rounds`` (the last round id, counted across restarts).
``status`` reads the SQLite state read-only, so it works while the coordinator runs.
Imports stay light here; torch is imported by ``run`` only, at start-up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from coordinator.config import default_toml, load_config
from coordinator.errors import ConfigError


def _init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    path = directory / "coordinator.toml"
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists (use --force to overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(default_toml(args.federation))
    load_config(path)  # what we write must load
    print(f"wrote {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from coordinator.service import run_from_config

    cfg = load_config(Path(args.config))
    if args.rounds is not None:
        if args.rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        cfg = cfg.with_rounds(args.rounds)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return run_from_config(cfg, stop)


def _status(args: argparse.Namespace) -> int:
    from coordinator.reports import format_table, round_summaries
    from coordinator.state import State

    cfg = load_config(Path(args.config))
    state = State(cfg.state_dir, readonly=True)
    try:
        summaries = round_summaries(state)
        latest = state.latest_version()
    finally:
        state.close()
    if args.json:
        doc = {
            "federation": cfg.federation,
            "global_version": latest.version if latest else None,
            "rounds": summaries,
        }
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    version = latest.version if latest else "-"
    print(f"federation {cfg.federation}: global model v{version}, {len(summaries)} round(s)")
    if summaries:
        print(format_table(summaries))
    return 0


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "coordinator", help="federation coordinator: rounds, aggregation, status"
    )
    csub = parser.add_subparsers(dest="coordinator_command", metavar="COORDINATOR_COMMAND")

    p = csub.add_parser("init", help="write a coordinator.toml with working defaults")
    p.add_argument("dir", help="directory for coordinator.toml (state goes in DIR/state)")
    p.add_argument("--federation", default="demo", help="federation id (topic prefix)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_init)

    p = csub.add_parser("run", help="run the rounds (resumes after a restart)")
    p.add_argument("--config", required=True, help="coordinator.toml")
    p.add_argument("--rounds", type=int, default=None, help="override rounds.num_rounds")
    p.set_defaults(func=_run)

    p = csub.add_parser("status", help="print the rounds so far (works while running)")
    p.add_argument("--config", required=True, help="coordinator.toml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    def _help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)
