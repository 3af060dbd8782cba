"""`fedscan node label` (record labels) and `fedscan node labels` (list label counts).

    fedscan node label --config node.toml --path FILE --label covid [--frame N] [--who NAME]
    fedscan node label --config node.toml --sop UID --label non_covid [--frame N]
    fedscan node label --config node.toml --csv labels.csv  # label, sop_instance_uid/path, frame
    fedscan node label --config node.toml --folder      # <inbox>/labelled/{covid,non_covid}/
    fedscan node labels --config node.toml [--json]

The author defaults to the OS user. Output carries counts and CSV row numbers, no UIDs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_node.config import load_config
from edge_node.errors import SOME_INPUTS_FAILED, LabelError
from edge_node.labels import LABELS, IngestReport, LabelBook, default_who, slice_identity
from edge_node.train.split import VAL, side_of


def _print(payload: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(text)


def _report_payload(report: IngestReport) -> dict[str, Any]:
    return {
        "labelled": report.labelled,
        "unchanged": report.unchanged,
        "kept": report.kept,
        "problems": [{"item": n, "reason": r} for n, r in report.problems],
    }


def _run_label(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    who = args.who or default_who()
    with LabelBook(config.paths.database) as book:
        if args.csv or args.folder:
            if args.label or args.frame is not None:
                raise LabelError(
                    "--label and --frame go with --sop or --path, not with --csv / --folder"
                )
            if args.csv:
                report = book.import_csv(Path(args.csv), who=who)
                noun = "row"
            else:
                report = book.ingest_folder(config.paths.inbox, who=who)
                noun = "file"
            _print(_report_payload(report), args.json, report.summary())
            if not args.json:
                for n, reason in report.problems:
                    print(f"  {noun} {n}: {reason}", file=sys.stderr)
            return 0 if not report.problems else SOME_INPUTS_FAILED
        if not args.label:
            raise LabelError("--label covid|non_covid is required with --sop or --path")
        if args.path:
            path = Path(args.path).expanduser().resolve()
            if not path.is_file():
                raise LabelError(f"file not found: {args.path}")
            uid, patient_key = slice_identity(path)
            changed = book.set(
                uid,
                args.label,
                who=who,
                source="cli",
                path=path,
                patient_key=patient_key,
                frame=args.frame,
            )
        else:
            uid = args.sop
            changed = book.set(uid, args.label, who=who, source="cli", frame=args.frame)
        record = book.get(uid, args.frame)
    label = record.label if record else args.label
    _print(
        {"changed": changed, "label": label},
        args.json,
        f"{'labelled' if changed else 'unchanged'}: {label}",
    )
    return 0


def _run_labels(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    with LabelBook(config.paths.database) as book:
        records = book.all()
        by_source = book.counts_by_source()
    counts = dict.fromkeys(LABELS, 0)
    split = {"train": dict.fromkeys(LABELS, 0), "val": dict.fromkeys(LABELS, 0)}
    for rec in records:
        counts[rec.label] += 1
        side = side_of(
            rec.patient_key,
            salt=config.federation.federation,
            val_fraction=config.training.val_fraction,
        )
        split["val" if side == VAL else "train"][rec.label] += 1
    patients = len({r.patient_key for r in records if r.patient_key})
    last = max((r.at for r in records), default=None)
    payload = {
        "total": len(records),
        "counts": counts,
        "by_source": by_source,
        "split": split,
        "patients": patients,
        "last_label_at": last,
    }
    text = (
        f"labels: {len(records)} (covid {counts['covid']}, non_covid {counts['non_covid']}) "
        f"from {patients} patient(s); train {sum(split['train'].values())}, "
        f"val {sum(split['val'].values())}; by source "
        + (", ".join(f"{k} {v}" for k, v in sorted(by_source.items())) or "-")
    )
    _print(payload, args.json, text)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("label", help="record radiologist labels (covid / non_covid)")
    p.add_argument("--config", required=True, help="node.toml")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--csv", help="CSV with label and sop_instance_uid or path columns")
    what.add_argument("--sop", help="SOPInstanceUID of a slice the node has seen")
    what.add_argument("--path", help="a DICOM file")
    what.add_argument(
        "--folder", action="store_true", help="ingest <inbox>/labelled/{covid,non_covid}/"
    )
    p.add_argument("--label", help="covid or non_covid (with --sop / --path)")
    p.add_argument(
        "--frame",
        type=int,
        metavar="N",
        help="label frame N (from 0) of a multi-frame file only (default: the whole file)",
    )
    p.add_argument("--who", help="author of the label (default: the OS user)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_label)

    q = sub.add_parser("labels", help="count the node's labels (per class, source, split)")
    q.add_argument("--config", required=True, help="node.toml")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_run_labels)
