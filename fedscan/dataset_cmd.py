"""`fedscan dataset ...`: turn image datasets into DICOM, or make a synthetic one.

fedscan dataset import --src DIR --out DIR [--layout auto|ucsd|folders]
                       [--class-map FOLDER=covid --class-map FOLDER=non_covid]
                       [--val-fraction 0.1] [--test-fraction 0.2] [--namespace NS]
fedscan dataset synthetic --out DIR [--n-per-class 60] [--patients N] [--seed 0] [--size 256]

Both write ``DIR/<split>/<label>/*.dcm`` and ``DIR/index.csv`` (see fedscan.dataset).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedscan.errors import DatasetError


def _class_map(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        folder, sep, label = item.partition("=")
        if not sep or not folder or not label:
            raise DatasetError(f"--class-map expects FOLDER=LABEL, got {item!r}")
        out[folder] = label
    return out


def _import(args: argparse.Namespace) -> int:
    from fedscan.dataset import import_dataset, summarize

    t0 = time.perf_counter()
    rows = import_dataset(
        args.src,
        args.out,
        layout=args.layout,
        class_map=_class_map(args.class_map),
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        namespace=args.namespace,
    )
    print(summarize(rows))
    print(f"{len(rows)} images -> {args.out / 'index.csv'} in {time.perf_counter() - t0:.1f} s")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from fedscan.dataset import read_index, summarize
    from fedscan.synthetic import generate

    t0 = time.perf_counter()
    index = generate(
        args.out, args.n_per_class, seed=args.seed, n_patients=args.patients, size=args.size
    )
    print(summarize(read_index(index)))
    print(f"synthetic set -> {index} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("dataset", help="import PNG/JPG datasets as DICOM, or synthesize one")
    dsub = parser.add_subparsers(dest="dataset_command", metavar="ACTION")

    imp = dsub.add_parser("import", help="PNG/JPG slices -> DICOM Secondary Capture + index.csv")
    imp.add_argument("--src", type=Path, required=True, help="dataset folder")
    imp.add_argument("--out", type=Path, required=True, help="output folder")
    imp.add_argument(
        "--layout",
        choices=("auto", "ucsd", "folders"),
        default="auto",
        help="source layout: UCSD COVID-CT, class folders, or detect (default auto)",
    )
    imp.add_argument(
        "--class-map",
        action="append",
        metavar="FOLDER=LABEL",
        help="map a class folder to covid or non_covid (repeat for each folder)",
    )
    imp.add_argument("--val-fraction", type=float, default=0.1, help="folders without splits")
    imp.add_argument("--test-fraction", type=float, default=0.2, help="folders without splits")
    imp.add_argument("--namespace", default="", help="salt for the generated UIDs")
    imp.set_defaults(func=_import)

    syn = dsub.add_parser("synthetic", help="CT-like synthetic slices (two classes) as DICOM")
    syn.add_argument("--out", type=Path, required=True, help="output folder")
    syn.add_argument("--n-per-class", type=int, default=60, help="slices per class (default 60)")
    syn.add_argument(
        "--patients", type=int, default=None, help="default: n-per-class (2 slices per patient)"
    )
    syn.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    syn.add_argument(
        "--size", type=int, default=256, choices=(256, 512), help="slice side (default 256)"
    )
    syn.set_defaults(func=_synthetic)

    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
