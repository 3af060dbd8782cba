"""`fedscan bench train --json OUT.json`: centralized training on the UCSD COVID-CT official split.

For cnn2d, resnet18 and efficientnet_b0, each without and with texture features (GLCM + LBP),
all from random init (no internet here: no pretrained weights): train on ``train``, early stop
on ``val`` (best validation loss kept), report the paper's metrics on ``test`` and the training
throughput (images/s) at ``--threads`` (default 2) torch threads.

Inputs are exactly what the edge node sees: each PNG/JPG is converted to grayscale the way
``fedscan dataset import`` does (``fedscan.dataset.image_to_gray``), turned into [0, 1] by the
preprocessor's display path (``edge_node.ingest.preprocess.to_display``, what an 8-bit Secondary
Capture gets) and resized by ``edge_node.ingest.preprocess.resize``. ``--dataset`` may also point at
the output of ``fedscan dataset import`` (``index.csv`` + DICOM), read with
``edge_node.ingest.preprocess.prepare``. The training step is the node's own
(``edge_node.train.trainer.train_epoch``: augmentation, class-weighted cross-entropy, AdamW).

Time budget (2 CPU cores, ~40 minutes for the six configurations): epochs are capped per
architecture (``MAX_EPOCHS``: cnn2d 15, resnet18 6, efficientnet_b0 5, before early stopping)
and by ``--budget-minutes``: each configuration may use the remaining budget divided by the
configurations left, and another epoch starts only if the last one's duration still fits. cnn2d
runs first and leaves most of its share to the larger networks. Each configuration records how
many epochs it ran and why it stopped (``max_epochs``, ``early_stopping`` or ``budget``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.errors import BenchError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "data" / "covid-ct-ucsd"
ARCHS = ("cnn2d", "resnet18", "efficientnet_b0")
MAX_EPOCHS = {"cnn2d": 15, "resnet18": 6, "efficientnet_b0": 5}
SPLITS = ("train", "val", "test")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", required=True, help="write the figures here")
    p.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET,
        help="UCSD COVID-CT folder or a `fedscan dataset import` output (index.csv)",
    )
    p.add_argument("--archs", nargs="+", default=list(ARCHS), help="architectures to train")
    p.add_argument(
        "--texture",
        choices=("both", "off", "on"),
        default="both",
        help="configurations without / with texture features",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"max epochs for every architecture (default per arch: {MAX_EPOCHS})",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=40.0,
        help="wall-clock budget of the whole run (default 40)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--patience", type=int, default=3, help="early stopping patience (epochs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--limit", type=int, help="at most N images per split (smoke runs)")
    p.add_argument(
        "--configs",
        help="comma-separated subset of configurations, e.g. cnn2d,resnet18+texture "
        "(to run configurations in parallel processes; merge with --merge)",
    )
    p.add_argument(
        "--prepared",
        type=Path,
        help="npz of the prepared 224x224 slices: written when absent, read when present "
        "(8-bit quantised, max abs error 1/510; lets the run move to another machine "
        "without the source images)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="merge the JSON files of parallel runs into --json and print the table",
    )


# -- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path
    split: str
    label: int  # 0 non_covid, 1 covid
    patient: str


def _from_ucsd(folder: Path) -> tuple[list[Item], str]:
    from fedscan.dataset import discover_ucsd

    items = [
        Item(img.path, img.split, int(img.label == "covid"), img.patient_id)
        for img in discover_ucsd(folder)
    ]
    return items, "images"


def _from_index(folder: Path) -> tuple[list[Item], str]:
    from fedscan.dataset import read_index

    rows = read_index(folder / "index.csv")
    items = [Item(folder / r.path, r.split, int(r.label == "covid"), r.patient_key) for r in rows]
    return items, "dicom"


def discover(folder: Path) -> tuple[list[Item], str]:
    """The dataset's items with their official split; BenchError when absent."""
    if (folder / "index.csv").is_file():
        return _from_index(folder)
    if (folder / "Data-split").is_dir() and (folder / "CT_COVID").is_dir():
        return _from_ucsd(folder)
    raise BenchError(
        f"no UCSD COVID-CT data at {folder} (need CT_COVID/, CT_NonCOVID/, Data-split/, or an "
        "index.csv from `fedscan dataset import`); pass --dataset"
    )


def limit_items(items: list[Item], n: int) -> list[Item]:
    """At most ``n`` per split, half of each class where possible (deterministic)."""
    out: list[Item] = []
    for split in SPLITS:
        c0, c1 = (
            sorted((i for i in items if i.split == split and i.label == c), key=lambda i: i.path)
            for c in (0, 1)
        )
        k0 = min(len(c0), n // 2)
        k1 = min(len(c1), n - k0)
        k0 = min(len(c0), n - k1)
        out.extend(c0[:k0] + c1[:k1])
    return out


def load_image(item: Item, kind: str, size: int = 224) -> np.ndarray:
    """One slice as the node's preprocessor gives it: float32 ``(size, size)`` in [0, 1]."""
    from pydicom.dataset import Dataset

    from edge_node.ingest.preprocess import PreprocessParams, prepare, resize, to_display
    from fedscan.dataset import image_to_gray

    if kind == "dicom":
        return prepare(item.path, PreprocessParams(size=size)).frames[0]
    gray = image_to_gray(item.path)
    sc = Dataset()  # what `fedscan dataset import` writes: 8-bit MONOCHROME2, no rescale
    sc.PhotometricInterpretation = "MONOCHROME2"
    sc.BitsStored = 8
    return resize(to_display(sc, gray[None])[0], size)


def save_prepared(path: Path, items: list[Item], kind: str) -> dict[str, np.ndarray]:
    """Prepared slices (uint8) + labels/splits/patients, so no source image has to travel;
    returns the same quantised slices as `load_prepared` would read back."""
    quantised = np.round(np.stack([load_image(i, kind) for i in items]) * 255.0).astype(np.uint8)
    np.savez_compressed(
        path,
        images=quantised,
        labels=np.array([i.label for i in items], dtype=np.int64),
        splits=np.array([i.split for i in items]),
        patients=np.array([i.patient for i in items]),
        names=np.array([i.path.name for i in items]),
    )
    return _cache_of(items, quantised)


def _cache_of(items: list[Item], quantised: np.ndarray) -> dict[str, np.ndarray]:
    return {it.path.name: quantised[k].astype(np.float32) / 255.0 for k, it in enumerate(items)}


def load_prepared(path: Path) -> tuple[list[Item], dict[str, np.ndarray]]:
    data = np.load(path, allow_pickle=False)
    items = [
        Item(Path(str(n)), str(s), int(lab), str(p))
        for n, s, lab, p in zip(
            data["names"], data["splits"], data["labels"], data["patients"], strict=True
        )
    ]
    return items, _cache_of(items, data["images"])


def build_sets(
    items: list[Item], kind: str, texture: bool, cache: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    from edge_node.train.data import SampleSet

    sets: dict[str, SampleSet] = {}
    for split in SPLITS:
        chosen = [i for i in items if i.split == split]
        if not chosen:
            raise BenchError(f"the dataset has no {split} images")
        images = np.stack(
            [cache[i.path.name] if cache is not None else load_image(i, kind) for i in chosen]
        )[:, None]
        feats = None
        if texture:
            from edge_node.ingest.texture import texture_features

            feats = np.stack([texture_features(img[0]) for img in images]).astype(np.float32)
        sets[split] = SampleSet(
            images=images.astype(np.float32),
            labels=np.array([i.label for i in chosen], dtype=np.int64),
            texture=feats,
            patient_keys=tuple(i.patient for i in chosen),
            ids=tuple(str(i.path.name) for i in chosen),
        )
    return sets


# -- one configuration ---------------------------------------------------------------------------


def _without_texture(s: Any) -> Any:
    from dataclasses import replace

    return replace(s, texture=None)


def run_config(
    arch: str,
    texture: bool,
    sets: dict[str, Any],
    args: argparse.Namespace,
    share_s: float,
) -> dict[str, Any]:
    import torch

    from edge_node.ingest.texture import TEXTURE_DIM
    from edge_node.train.loop import class_weights, clone_state, train_epoch, validate
    from export.zoo import create_model

    t_start = time.perf_counter()
    train, val, test = (sets[s] if texture else _without_texture(sets[s]) for s in SPLITS)
    torch.manual_seed(args.seed)
    model = create_model(arch, texture_dim=TEXTURE_DIM if texture else 0)
    model.set_train_mode("full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    weight = class_weights(train.labels)
    max_epochs = args.epochs or MAX_EPOCHS.get(arch, 8)
    best_loss: float | None = None
    best_state = clone_state(model)
    best_epoch, bad, stopped = 0, 0, "max_epochs"
    history: list[dict[str, Any]] = []
    train_images = 0
    train_seconds = 0.0
    for epoch in range(1, max_epochs + 1):
        t_epoch = time.perf_counter()
        stats = train_epoch(
            model,
            optimizer,
            train,
            batch_size=args.batch_size,
            generator=generator,
            weight=weight,
        )
        val_loss, val_m = validate(model, val, weight)
        train_images += stats.images
        train_seconds += stats.seconds
        history.append(
            {
                "epoch": epoch,
                "loss": stats.loss,
                "train_accuracy": stats.metrics.accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_m.accuracy,
                "images_per_s": stats.images_per_s,
                "seconds": time.perf_counter() - t_epoch,
            }
        )
        print(
            f"  {arch}{'+texture' if texture else ''} epoch {epoch}/{max_epochs}: "
            f"loss {stats.loss:.4f} val_loss {val_loss:.4f} val_acc {val_m.accuracy:.3f} "
            f"{stats.images_per_s:.1f} img/s",
            file=sys.stderr,
            flush=True,
        )
        if best_loss is None or val_loss < best_loss:
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = clone_state(model)
        else:
            bad += 1
            if bad >= args.patience:
                stopped = "early_stopping"
                break
        elapsed = time.perf_counter() - t_start
        last = history[-1]["seconds"]
        if epoch < max_epochs and elapsed + last * 1.5 > share_s:
            stopped = "budget"
            break
    model.load_state_dict(best_state)
    t_eval = time.perf_counter()
    _, test_m = validate(model, test)
    eval_seconds = time.perf_counter() - t_eval
    return {
        "arch": arch,
        "texture": texture,
        "init": "random",
        "accuracy": test_m.accuracy,
        "f1": test_m.f1,
        "sensitivity": test_m.recall,
        "specificity": test_m.specificity,
        "precision": test_m.precision,
        "auc": test_m.auc,
        "confusion": [list(r) for r in test_m.confusion],
        "train_images_per_s": train_images / train_seconds if train_seconds else 0.0,
        "eval_images_per_s": len(test) / eval_seconds if eval_seconds else 0.0,
        "epochs": len(history),
        "max_epochs": max_epochs,
        "best_epoch": best_epoch,
        "stopped": stopped,
        "val_at_best": history[best_epoch - 1] if best_epoch else None,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "seconds": time.perf_counter() - t_start,
        "history": history,
    }


# -- the run -------------------------------------------------------------------------------------


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(results: dict[str, dict[str, Any]]) -> str:
    """The README table (markdown)."""
    lines = [
        "| model | texture | accuracy | F1 | sensitivity | specificity | AUC | train img/s | "
        "epochs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        lines.append(
            f"| {r['arch']} | {'GLCM+LBP' if r['texture'] else 'no'} | {r['accuracy']:.3f} | "
            f"{r['f1']:.3f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | {auc} | "
            f"{r['train_images_per_s']:.1f} | {r['epochs']} ({r['stopped']}) |"
        )
    return "\n".join(lines)


def merge(paths: list[Path], out: Path) -> int:
    """Combine the JSON of configurations run in parallel processes into one report."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = dict(reports[0])
    merged["results"] = {k: v for r in reports for k, v in r["results"].items()}
    merged["parallel_runs"] = len(reports)
    merged["seconds"] = max(r["seconds"] for r in reports)
    merged["load_avg_end"] = reports[-1].get("load_avg_end")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(table(merged["results"]))
    return 0


def run(args: argparse.Namespace) -> int:
    out = Path(args.json)
    if args.merge:
        return merge(list(args.merge), out)
    prepared = Path(args.prepared) if args.prepared else None
    if not Path(args.dataset).exists() and not (prepared and prepared.exists()):
        message = f"UCSD COVID-CT data not found at {args.dataset}: benchmark skipped"
        print(f"fedscan bench train: {message}", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"skipped": message}, indent=1) + "\n")
        return 0
    unknown = [a for a in args.archs if a not in MAX_EPOCHS]
    if unknown:
        raise BenchError(f"unknown architectures {unknown}; choose from {list(ARCHS)}")
    t0 = time.perf_counter()
    load_start = _load()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cache: dict[str, np.ndarray] | None = None
    if prepared is not None and prepared.exists():
        items, cache = load_prepared(prepared)
        kind = "prepared"
    else:
        items, kind = discover(Path(args.dataset))
        if prepared is not None:
            cache = save_prepared(prepared, items, kind)
    if args.limit:
        items = limit_items(items, args.limit)
    textures = {"both": (False, True), "off": (False,), "on": (True,)}[args.texture]
    sets = build_sets(items, kind, texture=True in textures, cache=cache)
    prep_seconds = time.perf_counter() - t0
    print(
        f"data: {', '.join(f'{s} {len(sets[s])}' for s in SPLITS)} ({kind}), "
        f"prepared in {prep_seconds:.0f} s",
        file=sys.stderr,
    )
    configs = [(a, t) for a in args.archs for t in textures]
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",") if c.strip()}
        configs = [(a, t) for a, t in configs if (f"{a}+texture" if t else a) in wanted]
        if not configs:
            raise BenchError(f"--configs {args.configs!r} selects no configuration")
    budget = args.budget_minutes * 60.0
    results: dict[str, dict[str, Any]] = {}
    for k, (arch, texture) in enumerate(configs):
        remaining = budget - (time.perf_counter() - t0)
        share = max(remaining / (len(configs) - k), 0.0)
        name = f"{arch}+texture" if texture else arch
        results[name] = run_config(arch, texture, sets, args, share)
        r = results[name]
        print(
            f"{name}: test accuracy {r['accuracy']:.3f}, F1 {r['f1']:.3f}, "
            f"{r['train_images_per_s']:.1f} img/s, {r['epochs']} epochs ({r['stopped']}), "
            f"{r['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    report = {
        "schema": "fedscan.bench_train/1",
        "dataset": "UCSD COVID-CT, official patient-disjoint split"
        + (f" (limited to {args.limit} per split)" if args.limit else ""),
        "input": kind,
        "init": "random",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "patience": args.patience,
        "seed": args.seed,
        "budget_minutes": args.budget_minutes,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "torch": torch.__version__,
        },
        "load_avg_start": load_start,
        "load_avg_end": _load(),
        "prepare_seconds": prep_seconds,
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    return 0
