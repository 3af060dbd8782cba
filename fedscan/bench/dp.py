"""`fedscan bench dp`: the accuracy cost of differential privacy on node updates.

Three simulated hospitals (patient-disjoint shares of the UCSD COVID-CT training split, as in
``fedscan bench federation``'s accuracy part) run FedAvg in this process for ``--rounds`` rounds:
each trains ``--epochs`` node-style epochs from the global model
(``federation.accuracy.local_update``: the node's AdamW, class weights, augmentation), its delta
goes through ``edge_node.federate.privacy.privatize`` exactly as ``UpdateSender`` applies it (global
L2 clip to C, then N(0, (z C)^2) per element), is fp32-encoded and decoded, and the coordinator's
``fedavg`` strategy folds the three. Every arm starts from the same random global model with the
same seeds, so round 1's local training is shared and the arms differ only by the privatization. C
defaults to the median L2 norm of the round-1 deltas (clipping then bites about half the time).

Reported per arm and round: test accuracy / F1 / AUC of the global model on the (limited)
official test split, the mean pre-clip norm, and epsilon at ``--delta`` after that many rounds
(``edge_node.federate.privacy.epsilon``: node-level replace adjacency, RDP accountant, no
subsampling).
Skips (writes ``{"skipped": ...}``) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.bench.train import DEFAULT_DATASET

HOSPITALS = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", required=True, help="write the figures here")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="UCSD COVID-CT folder")
    p.add_argument("--arch", default="cnn2d", help="model architecture (default cnn2d)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--limit", type=int, default=200, help="at most N slices per split")
    p.add_argument(
        "--noise", type=float, nargs="+", default=[0.01, 1.0], help="noise multipliers z"
    )
    p.add_argument("--clip", type=float, help="L2 clip C (default: median round-1 norm)")
    p.add_argument("--delta", type=float, default=1e-5, help="epsilon at this delta (1e-5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not Path(args.dataset).exists():
        message = f"UCSD COVID-CT data not found at {args.dataset}: benchmark skipped"
        print(f"fedscan bench dp: {message}", file=sys.stderr)
        out.write_text(json.dumps({"skipped": message}, indent=1) + "\n")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    report = dp_cost(args)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for arm in report["arms"]:
        rows = ", ".join(
            f"r{r['round']} acc {r['accuracy']:.3f} eps {r['epsilon']:.3g}" for r in arm["rounds"]
        )
        print(f"{arm['name']:>14}: {rows}")
    return 0


def dp_cost(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch

    from edge_node.federate.privacy import DpParams, epsilon, l2_norm, privatize
    from export.weights import state_to_numpy
    from export.zoo import create_model
    from fedscan.bench.federation.accuracy import (
        _metrics,
        deal,
        fedavg,
        load_sets,
        local_update,
        scores,
    )
    from fl_protocol.codecs import encode

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        sets, source = load_sets(Path(args.dataset), Path(work), args.limit)
    torch.manual_seed(args.seed)
    base = state_to_numpy(create_model(args.arch))
    shares = deal(sets["train"], HOSPITALS, args.seed)
    counts = [len(s) for s in shares]
    test = sets["test"]
    print(f"data: {source}; hospitals {counts}; test {len(test)}", flush=True)

    def train(weights: dict[str, np.ndarray], round_: int) -> list[dict[str, np.ndarray]]:
        return [
            local_update(
                args.arch,
                weights,
                share,
                epochs=args.epochs,
                batch=args.batch,
                seed=args.seed + 100 * round_ + h,
            )[0]
            for h, share in enumerate(shares)
        ]

    first = train(base, 1)  # the same for every arm (same global model, same seeds)
    norms = [l2_norm(d) for d in first]
    clip = float(args.clip) if args.clip else float(np.median(norms))
    arms: list[tuple[str, DpParams | None]] = [("no DP", None)]
    arms += [(f"DP z={z:g}", DpParams(clip, z, args.delta)) for z in args.noise]
    results = []
    for name, params in arms:
        rng = np.random.default_rng(args.seed)
        weights, rounds = base, []
        for r in range(1, args.rounds + 1):
            deltas = first if r == 1 else train(weights, r)
            pre = [l2_norm(d) for d in deltas]
            if params is not None:
                deltas = [privatize(d, params, rng)[0] for d in deltas]
            weights = fedavg(weights, [encode(d, "fp32") for d in deltas], counts)
            row = _metrics(test.labels, scores(args.arch, weights, test))
            row["round"] = r
            row["mean_update_norm_before_clip"] = float(np.mean(pre))
            row["epsilon"] = (
                0.0 if params is None else epsilon(params.noise_multiplier, r, args.delta)
            )
            rounds.append(row)
            print(f"  {name} round {r}: accuracy {row['accuracy']:.4f}, "
                  f"epsilon {row['epsilon']:.4g}", flush=True)  # fmt: skip
        results.append({
            "name": name,
            "clip": None if params is None else params.clip,
            "noise_multiplier": None if params is None else params.noise_multiplier,
            "sigma_per_element": None if params is None else params.sigma,
            "rounds": rounds,
        })  # fmt: skip
    n_params = sum(v.size for v in base.values() if v.dtype.kind == "f")
    return {
        "source": source,
        "arch": args.arch,
        "hospitals": counts,
        "n_test": len(test),
        "rounds": args.rounds,
        "local_epochs": args.epochs,
        "batch_size": args.batch,
        "delta": args.delta,
        "clip": clip,
        "round1_update_norms": norms,
        "float_parameters": int(n_params),
        "guarantee": "node-level (the hospital's whole local dataset replaced), per-update "
        "Gaussian mechanism with L2 sensitivity 2C, composed over the rounds a node took part "
        "in, no subsampling; RDP accountant (dp_accounting)",
        "seconds": time.perf_counter() - t0,
        "arms": results,
    }
