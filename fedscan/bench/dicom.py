"""`fedscan bench dicom --json OUT.json`: DICOM networking figures, side by side in one run.

1. C-STORE receive throughput: one series of ``--slices`` real CT slices (new UIDs, 512x512,
   about 0.5 MB each) sent by DCMTK ``storescu`` over loopback, one association, to
   (a) the node's C-STORE SCP (``edge_node.dicomnet.listener.Listener``: each instance fsynced
   and renamed into the inbox before success is answered), (a') the same with ``fsync =
   false``, and (b) DCMTK ``storescp -od`` (writes without fsync); once with DCMTK as shipped
   (Nagle on) and once with ``TCP_NODELAY=1`` for storescu and storescp (DCMTK at its best).
   Order rotated, ``--repeats`` times; medians; target: ours >= 0.8x storescp.
2. Series to SR at the PACS: a real `fedscan node run` (listener, series tracker with
   ``--quiet-time``, outbox sender) receives the same series from storescu; the time from
   storescu's last acknowledged slice to the Structured Report arriving at a pynetdicom
   C-STORE SCP standing in for the PACS; target: quiet time + < 2 s. The node's model is a
   random-init cnn2d exported to ONNX (the verdict is meaningless; the timing is not); the
   slices say BodyPartExamined CHEST (the real slice used is a head CT).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_node.layout import StateLayout
from fedscan.bench.dicom_peers import DcmtkStoreScp, RecordingScp, dcmtk, dcmtk_available
from fedscan.bench.results import judge, write_result
from fedscan.errors import BenchError
from fedscan.samples import find_samples, missing

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "693_UNCR.dcm"  # the real CT slice every series is made of
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage SOP class
PDU = 131072  # both receivers announce DCMTK's largest PDU

TARGETS = {
    "receive_ratio_vs_storescp": 0.8,
    "receive_ratio_vs_storescp_nodelay": 0.8,
    "sr_after_quiet_s": 2.0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    p.add_argument("--slices", type=int, default=300, help="slices in the series (default 300)")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per receiver")
    p.add_argument("--quiet-time", type=float, default=10.0, help="[series] quiet_time_s")
    p.add_argument(
        "--sample", type=Path, help=f"the real CT slice (default: {SAMPLE} in $FEDSCAN_SAMPLES)"
    )
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the node")
    p.add_argument("--work-dir", type=Path, help="keep series/node here (default: a temp dir)")
    p.add_argument("--skip-node", action="store_true", help="only the receive throughput")


def make_series(src: Path, n: int, folder: Path) -> list[Path]:
    """``n`` slices of one new study/series from one real slice (new UIDs, z steps)."""
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(src)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, -2.5 * i]
        ds.BodyPartExamined = "CHEST"  # the chest-only filter takes the (head) CT sample
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(
    files: list[Path], port: int, called_ae: str, env: dict[str, str] | None = None
) -> float:
    """Send ``files`` over one association with DCMTK storescu; returns the wall seconds."""
    cmd = [dcmtk("storescu"), "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port)]
    t0 = time.perf_counter()
    result = subprocess.run(
        [*cmd, *map(str, files)],
        capture_output=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(f"storescu failed: {result.stderr.decode(errors='replace')[-400:]}")
    return elapsed


def _count_dcm(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


# DCMTK as shipped (Nagle on: each C-STORE-RSP of storescp waits ~40 ms for a delayed ACK) and
# DCMTK at its fastest (TCP_NODELAY=1 for storescu and storescp). Our listener sets TCP_NODELAY
# itself, so only storescu's own setting differs between the two for it.
SCENARIOS: dict[str, dict[str, str]] = {"dcmtk_defaults": {}, "tcp_nodelay": {"TCP_NODELAY": "1"}}
RECEIVERS = ("fedscan", "fedscan_no_fsync", "storescp")


def _receive_once(files: list[Path], dest: Path, receiver: str, env: dict[str, str]) -> float:
    from edge_node.config import DicomListenerConfig
    from edge_node.dicomnet.listener import Listener
    from edge_node.serve.stats import DicomStats

    if receiver == "storescp":
        with DcmtkStoreScp(dest, ae_title="STORESCP", pdu=PDU, env=env) as pacs:
            return storescu(files, pacs.port, "STORESCP", env)
    cfg = DicomListenerConfig(
        enabled=True, port=0, max_pdu=PDU, fsync=receiver != "fedscan_no_fsync"
    )
    scp = Listener(cfg, dest, DicomStats())
    port = scp.start()
    try:
        return storescu(files, port, "FEDSCAN", env)
    finally:
        scp.stop()


def receive_throughput(files: list[Path], work: Path, repeats: int) -> dict[str, Any]:
    """storescu -> our Listener (fsync on / off) vs storescu -> storescp, in both DCMTK
    scenarios, the order rotated each repeat; medians and ratios."""
    n = len(files)
    mb = sum(f.stat().st_size for f in files) / 1e6
    out: dict[str, Any] = {"slices": n, "mb": round(mb, 1), "repeats": repeats}
    for scenario, env in SCENARIOS.items():
        times: dict[str, list[float]] = {name: [] for name in RECEIVERS}
        for r in range(repeats):
            for name in RECEIVERS[r % 3 :] + RECEIVERS[: r % 3]:
                dest = work / f"rx-{name}"
                shutil.rmtree(dest, ignore_errors=True)
                elapsed = _receive_once(files, dest, name, env)
                got = _count_dcm(dest)
                if got != n:
                    raise BenchError(f"{name} stored {got} of {n} slices")
                times[name].append(elapsed)
                print(f"  [{scenario}] {name}: {n} slices in {elapsed:.2f} s = {n / elapsed:.0f}/s")
                shutil.rmtree(dest, ignore_errors=True)
        res: dict[str, Any] = {"env": env}
        for name, ts in times.items():
            med = statistics.median(ts)
            res[name] = {
                "seconds": [round(t, 3) for t in ts],
                "median_s": round(med, 3),
                "slices_per_s": round(n / med, 1),
                "mb_per_s": round(mb / med, 1),
            }
        scp_s = res["storescp"]["median_s"]
        res["ratio_vs_storescp"] = round(scp_s / res["fedscan"]["median_s"], 3)
        res["ratio_no_fsync_vs_storescp"] = round(scp_s / res["fedscan_no_fsync"]["median_s"], 3)
        out[scenario] = res
    return out


def _export_model(path: Path) -> Path:
    try:
        from export.onnx_export import export_onnx
        from export.zoo import create_model
    except ImportError as exc:
        raise BenchError(f"the export package (torch) is needed for the model: {exc}") from exc
    import torch

    torch.set_num_threads(1)
    return Path(export_onnx(create_model("cnn2d").eval(), path, model_version="bench"))


def series_to_sr(
    files: list[Path], work: Path, quiet_s: float, threads: int, sample: Path
) -> dict[str, Any]:
    """A real node receives the series; seconds from the last slice to the SR at the PACS."""
    import sqlite3

    from edge_node.cli.daemon import init_node

    folder = work / "node"
    shutil.rmtree(folder, ignore_errors=True)
    model = _export_model(work / "cnn2d.onnx")
    with RecordingScp(ae_title="PACS") as pacs:
        toml = init_node(folder, force=True)
        text = toml.read_text().replace("intra_op_threads = 2", f"intra_op_threads = {threads}")
        text = set_toml(text, "series", "quiet_time_s", repr(float(quiet_s)))
        text += f"""
[dicom.listener]
enabled = true
port = 0
max_pdu = {PDU}
allowed_calling_aes = ["BENCH"]

[dicom.send_to]
enabled = true
ae_title = "PACS"
port = {pacs.port}
"""
        toml.write_text(text)
        cmd = [sys.executable, "-m", "fedscan.cli", "node", "run", "--config", str(toml)]
        cmd += ["--model", str(model), "--api-port", "0"]
        log = open(folder / "node.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            port_file = StateLayout(folder / "state").dicom_port
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"node did not start; see {folder / 'node.log'}")
                time.sleep(0.05)
            time.sleep(1.0)  # the rest of the start-up (API) settles
            t_first = time.time()
            send_s = storescu(files, int(port_file.read_text()), "FEDSCAN")
            t_last = time.time()  # storescu has the last slice's success: it is in the inbox
            print(f"  node listener: {len(files)} slices in {send_s:.2f} s")
            deadline = time.monotonic() + quiet_s + 300
            sr_at = sc_at = None
            while time.monotonic() < deadline and sr_at is None:
                for (_, _, at), cls in zip(pacs.received, pacs.sop_classes, strict=False):
                    if cls.startswith(SR_PREFIX):
                        sr_at = at
                    elif cls == "1.2.840.10008.5.1.4.1.1.7":
                        sc_at = at
                if proc.poll() is not None:
                    break
                time.sleep(0.02)
            time.sleep(0.5)
            for (_, _, at), cls in zip(pacs.received, pacs.sop_classes, strict=False):
                if cls == "1.2.840.10008.5.1.4.1.1.7":
                    sc_at = at
            con = sqlite3.connect(f"file:{folder / 'state' / 'node.sqlite'}?mode=ro", uri=True)
            try:
                row = con.execute("SELECT COUNT(*), MAX(created_at) FROM predictions").fetchone()
                try:
                    series_row = con.execute(
                        "SELECT MAX(last_seen), MAX(completed_at) FROM series"
                    ).fetchone()
                except sqlite3.OperationalError:  # a build without series tracking
                    series_row = (None, None)
            finally:
                con.close()
            queued = [p.stat().st_mtime for p in (folder / "state" / "outbox").rglob("*.dcm")]
        finally:
            proc.terminate()
            rc = proc.wait(timeout=120)
            log.close()
    out: dict[str, Any] = {
        "slices": len(files),
        "quiet_time_s": quiet_s,
        "node_receive_s": round(send_s, 3),
        "node_receive_slices_per_s": round(len(files) / send_s, 1),
        "predictions": int(row[0]),
        "last_prediction_after_last_slice_s": _after(row[1], t_last),
        "objects_at_pacs": len(pacs.received),
        # where the time goes: series complete (tracker), results queued (outbox file written)
        "series_last_seen_after_last_slice_s": _after(series_row[0], t_last),
        "series_complete_after_last_slice_s": _after(series_row[1], t_last),
        "results_queued_after_last_slice_s": _after(max(queued) if queued else None, t_last),
        "sop_classes_at_pacs": sorted(set(pacs.sop_classes)),
        "node_exit_code": rc,
        "send_started_at": t_first,
    }
    if sr_at is None:
        out["sr_received"] = False
        print(f"  no SR reached the PACS (see {folder / 'node.log'})")
        return out
    out["sr_received"] = True
    out["last_slice_to_sr_s"] = round(sr_at - t_last, 3)
    out["sr_after_quiet_s"] = round(sr_at - t_last - quiet_s, 3)
    if sc_at is not None:
        out["last_slice_to_sc_s"] = round(sc_at - t_last, 3)
    print(
        f"  last slice -> SR at the PACS: {out['last_slice_to_sr_s']:.2f} s "
        f"(quiet time {quiet_s:g} s + {out['sr_after_quiet_s']:.2f} s)"
    )
    return out


def set_toml(text: str, section: str, key: str, value: str) -> str:
    """``key = value`` in ``[section]`` of a node.toml text: replaced, added to the section,
    or in a new section at the end (the file `fedscan node init` writes may have either)."""
    lines = text.splitlines()
    try:
        start = lines.index(f"[{section}]")
    except ValueError:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for i in range(start + 1, end):
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            lines[i] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines) + "\n"


def _after(at: float | None, t0: float) -> float | None:
    return None if at is None else round(float(at) - t0, 3)


def _versions() -> dict[str, str]:
    import pydicom
    import pynetdicom

    v = {"pydicom": pydicom.__version__, "pynetdicom": pynetdicom.__version__}
    head = subprocess.run([dcmtk("storescp"), "--version"], capture_output=True, text=True)
    v["dcmtk"] = head.stdout.strip().splitlines()[0] if head.stdout else "?"
    return v


def run(args: argparse.Namespace) -> int:
    if not dcmtk_available():
        raise BenchError("DCMTK (storescu, storescp, echoscu) is needed: apt-get install dcmtk")
    if args.sample is None:
        found = find_samples((SAMPLE,))
        if not found:
            raise BenchError(missing("--sample", (SAMPLE,)))
        args.sample = found[0]
    if not args.sample.is_file():
        raise BenchError(f"sample slice not found: {args.sample}")
    with tempfile.TemporaryDirectory(prefix="fedscan-bench-dicom-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                **_versions(),
            },
            "loadavg_start": os.getloadavg(),
        }
        files = make_series(args.sample, args.slices, work / "series")
        print(f"C-STORE receive, {len(files)} slices over loopback (DCMTK storescu sends)")
        rx = receive_throughput(files, work, args.repeats)
        result["receive"] = rx
        result["receive_ratio_vs_storescp"] = rx["dcmtk_defaults"]["ratio_vs_storescp"]
        result["receive_ratio_vs_storescp_nodelay"] = rx["tcp_nodelay"]["ratio_vs_storescp"]
        for scenario in SCENARIOS:
            r = rx[scenario]
            print(
                f"  [{scenario}] fedscan/storescp: {r['ratio_vs_storescp']:.2f} "
                f"(fsync off: {r['ratio_no_fsync_vs_storescp']:.2f})"
            )
        if not args.skip_node:
            print(
                f"series -> SR at the PACS through `fedscan node run` (quiet {args.quiet_time:g} s)"
            )
            sr = series_to_sr(files, work, args.quiet_time, args.threads, args.sample)
            result["series_to_sr"] = sr
            result["sr_after_quiet_s"] = sr.get("sr_after_quiet_s")
        result["loadavg_end"] = os.getloadavg()
        result["targets"] = judge(
            result, TARGETS, is_ceiling=lambda k: k.endswith("_s"), strict=True
        )
    return write_result(result, args.json)
