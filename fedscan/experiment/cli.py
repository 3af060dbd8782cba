"""`fedscan experiment`: local-only vs FedAvg vs centralized, mean and std over seeds.

    fedscan experiment --dataset DIR --nodes 3 --partition iid|label_skew|size_skew
        --json OUT.json [--seeds 0,1,2] [--arch cnn2d] [--rounds R] [--local-epochs E]
        [--folds K] [--n-boot B] [--lr LR] [--batch-size B] [--jobs J] [--threads T]
        [--cache-dir DIR] [--work-dir DIR]

``DIR``: the UCSD COVID-CT folder or class folders (imported once as DICOM into the cache), or a
folder with an ``index.csv`` (e.g. from ``fedscan dataset synthetic``). Prints a markdown table;
``--json OUT.json --from-json`` re-summarises a finished run without training.

``--folds K``: patient-disjoint K-fold cross-validation over every slice of the dataset (train,
val and test of the official split): each fold is tested once by models trained on the other
folds' patients (partitioned across the hospitals as usual). Every run (official split or
folds) also reports each arm's per-slice and per-patient metrics with 95% intervals from a
bootstrap over patients, the paired differences FedAvg minus each comparator (the best
hospital chosen on validation, each hospital, centralized), ECE, and the same after the
temperature and threshold fitted on validation (``@cal``). Finished tasks are kept in the work
folder: an interrupted run started again with the same settings resumes.

Budget: every arm trains ``rounds x local epochs`` epochs (local-only: each hospital on its own
share; FedAvg: that many per hospital, in rounds; centralized: on the pooled data). With the
defaults (5 rounds x 2 local epochs, 3 seeds, ``--jobs 2``) the UCSD run took 23 minutes on a
shared 2-core machine (9 trainings of about 3-7 minutes each, two at a time).
"""
# Imports stay light here: torch is imported when the experiment runs.

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedscan.experiment.errors import ExperimentError
from fedscan.experiment.partition import PARTITIONS


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ExperimentError(
            f"--seeds expects integers separated by commas, not {text!r}"
        ) from None


def _strategy_args(items: list[str] | None) -> tuple[tuple[str, float], ...]:
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out.append((key.strip(), float(value)))
        except ValueError:
            raise ExperimentError(f"--strategy-arg expects NAME=NUMBER, not {item!r}") from None
    return tuple(out)


def add_rate_arguments(p: argparse.ArgumentParser, *, schedule: str, head_lr_mult: float) -> None:
    """``--lr-schedule`` and ``--head-lr-mult`` with these defaults (experiment and demo)."""
    from fl_protocol.schedule import SCHEDULES

    p.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default=schedule,
        help=f"per epoch; FedAvg: across rounds (default {schedule})",
    )
    p.add_argument(
        "--head-lr-mult",
        type=float,
        default=head_lr_mult,
        help=f"classifier head at lr x this (default {head_lr_mult:g})",
    )


def _run(args: argparse.Namespace) -> int:
    from fedscan.experiment.config import ExperimentConfig
    from fedscan.experiment.runner import resummarize, run_experiment

    if args.compare:
        from fedscan.experiment.runner import compare_files

        cmp = compare_files(Path(args.json), Path(args.compare), args.n_boot)
        print(cmp["markdown"])
        return 0
    if args.from_json:
        doc = resummarize(Path(args.json), args.n_boot)
        print(doc["markdown"])
        return 0
    if not args.dataset:
        raise ExperimentError("--dataset is required (unless --from-json)")

    config = ExperimentConfig(
        dataset=Path(args.dataset),
        json_out=Path(args.json),
        nodes=args.nodes,
        partition=args.partition,
        seeds=_seeds(args.seeds),
        arch=args.arch,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        head_lr_mult=args.head_lr_mult,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        augment=not args.no_augment,
        texture=args.texture,
        pretrained=Path(args.pretrained) if args.pretrained else None,
        threads=args.threads,
        jobs=args.jobs,
        strategy=args.strategy,
        strategy_args=_strategy_args(args.strategy_arg),
        tta=args.tta,
        folds=args.folds,
        n_boot=args.n_boot,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )
    if not args.verbose:
        # per-epoch trainer logs would drown the per-arm progress lines
        logging.getLogger("edge_node").setLevel(logging.WARNING)
    print(
        f"experiment: {config.partition} partition over {config.nodes} hospitals, {config.arch}, "
        f"{config.rounds} rounds x {config.local_epochs} local epochs, seeds {config.seeds}",
        flush=True,
    )
    doc = run_experiment(config)
    print()
    print(doc["markdown"])
    print(f"\nresults: {config.json_out} ({doc['seconds'] / 60:.1f} min)")
    return 0


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "experiment",
        help="local-only vs FedAvg vs centralized on patient-disjoint partitions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", help="dataset folder (UCSD, class folders, index)")
    p.add_argument("--json", required=True, help="results JSON to write")
    p.add_argument("--nodes", type=int, default=3, help="hospitals (default 3)")
    p.add_argument(
        "--partition", choices=PARTITIONS, default="iid", help="how hospitals split (default iid)"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--arch", default="cnn2d", help="model architecture (export.zoo)")
    p.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    p.add_argument("--local-epochs", type=int, default=2, help="epochs per round (default 2)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    add_rate_arguments(p, schedule="constant", head_lr_mult=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="local validation patients")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument(
        "--texture", action="store_true", help="GLCM + LBP texture features beside the CNN"
    )
    p.add_argument(
        "--pretrained", metavar="FILE", help="initial backbone weights (`fedscan pretrain`)"
    )
    p.add_argument(
        "--folds", type=int, default=0,
        help="K-fold patient-disjoint cross-validation over every slice (default 0: official "
        "test split)",
    )  # fmt: skip
    p.add_argument(
        "--strategy", default="fedavg",
        help="aggregation strategy of the FedAvg arm (fedavg, fedavgm, fedadam, ...)",
    )  # fmt: skip
    p.add_argument(
        "--strategy-arg", action="append", metavar="NAME=VALUE",
        help="keyword argument of the strategy, e.g. beta=0.9 (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--tta", action="store_true",
        help="interval tables score each slice as the mean over it and its mirror image",
    )  # fmt: skip
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--compare",
        metavar="OTHER_JSON",
        help="no training: --json minus this run (same folds, seeds) per arm, with intervals",
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--cache-dir", help="where the dataset is imported (default ~/.cache/fedscan)")
    p.add_argument("--work-dir", help="label books, weights, caches (default beside --json)")
    p.add_argument(
        "--from-json", action="store_true",
        help="re-summarise the --json file of an earlier run (no training)",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="keep the trainer's per-epoch logs")
    p.set_defaults(func=_run)
