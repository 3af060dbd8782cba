"""`fedscan demo`: a whole federation on this machine, from data to the paper's table.

    fedscan demo [--out DIR] [--dataset DIR] [--nodes 3] [--rounds 5] [--arch cnn2d]
                 [--local-epochs 2] [--labelled-per-node 120] [--feed-seconds 45] ...

Starts an MQTT broker (``python -m fl_protocol.broker``), a coordinator and one edge node per
hospital as separate processes, drips CT slices into the hospitals' inboxes, runs the rounds,
and ends with the table (each hospital's local-only model and the global model on a held-out
test set) and a report folder (``DIR/report/index.html``). No internet, no certificates.
"""

# Imports stay light here: the orchestrator is imported when the demo runs.
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from fedscan.demo.config import DemoConfig
    from fedscan.demo.orchestrator import run_demo

    per_node = args.labelled_per_node
    config = DemoConfig(
        out=Path(args.out),
        dataset=Path(args.dataset) if args.dataset else None,
        nodes=args.nodes,
        rounds=args.rounds,
        arch=args.arch,
        texture=args.texture,
        local_epochs=args.local_epochs,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        head_lr_mult=args.head_lr_mult,
        batch_size=args.batch_size,
        labelled_per_node=None if per_node == 0 else per_node,
        test_per_node=args.test_per_node,
        min_labels=args.min_labels,
        feed_seconds=args.feed_seconds,
        synthetic_size=args.synthetic_size,
        seed=args.seed,
        timeout_s=args.timeout,
        round_timeout_s=args.round_timeout,
        local_baseline=not args.no_local_baseline,
        live=True if args.live else (False if args.no_live else None),
    )
    return run_demo(config)


def add_parser(sub: Any) -> None:
    from fedscan.experiment.cli import add_rate_arguments

    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run a whole federation locally (broker, coordinator, nodes) and report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--dataset", help="real data: UCSD COVID-CT folder, class folders, or index")
    p.add_argument("--nodes", type=int, default=3, help="hospitals (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--arch", default="cnn2d", help="model architecture (default cnn2d)")
    p.add_argument(
        "--texture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GLCM + LBP texture features beside the CNN embedding (default on)",
    )
    p.add_argument("--local-epochs", type=int, default=2, help="epochs per round (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    add_rate_arguments(p, schedule="cosine", head_lr_mult=10.0)
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument(
        "--labelled-per-node", type=int, default=120,
        help="labelled slices per hospital (default 120; 0 = all of --dataset)",
    )  # fmt: skip
    p.add_argument("--test-per-node", type=int, default=30, help="synthetic test slices per node")
    p.add_argument(
        "--min-labels", type=int, help="labels a node needs to train (default: the smallest share)"
    )
    p.add_argument("--feed-seconds", type=float, default=45.0, help="drip duration (default 45)")
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=256,
        choices=(256, 512),
        help="side of the synthetic slices (default 256)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="federation time limit (s)")
    p.add_argument("--round-timeout", type=float, default=300.0, help="deadline per round (s)")
    p.add_argument("--no-local-baseline", action="store_true", help="skip local-only training")
    live = p.add_mutually_exclusive_group()
    live.add_argument("--live", action="store_true", help="redraw the table in place")
    live.add_argument("--no-live", action="store_true", help="print the table now and then")
    p.set_defaults(func=_run)
