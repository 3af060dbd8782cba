"""`fedscan node label`, `fedscan node labels` and `fedscan node train` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_node.config import default_toml
from edge_node.labels import LabelBook
from edge_node.store import FileRecord, Store
from fedscan.cli import main
from tests.helpers.dicom_factory import CT_SAMPLE, sample_path
from tests.helpers.training import make_labelled_node, pick_salt, write_slice


def write_config(root: Path, federation: str = "demo") -> Path:
    text = default_toml("cli1")
    text = text.replace('federation = "demo"', f'federation = "{federation}"')
    text = text.replace(
        'arch = "cnn2d"\nmode = "full"\nepochs = 3',
        'arch = "cnn2d"\nmode = "full"\nepochs = 1\nval_fraction = 0.35\nbatch_size = 4\n'
        "torch_threads = 1",
    )
    path = root / "node.toml"
    path.write_text(text)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_label_commands_all_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A radiologist labels by file, by UID, by CSV and by folder, then lists the counts."""
    config = write_config(tmp_path)
    src = sample_path(CT_SAMPLE)
    inbox = tmp_path / "inbox"
    a = inbox / "a.dcm"
    write_slice(src, a, patient_id="P1", covid=True, seed=1)
    b = inbox / "b.dcm"
    uid_b = write_slice(src, b, patient_id="P2", covid=False, seed=2)
    store = Store(tmp_path / "state" / "node.sqlite")  # the daemon has seen b
    store.record_file(FileRecord(str(b), 1, 1.0, uid_b, "predicted", None, 1))
    store.close()
    c = tmp_path / "elsewhere" / "c.dcm"
    write_slice(src, c, patient_id="P3", covid=True, seed=3)
    write_slice(
        src, inbox / "labelled" / "non_covid" / "d.dcm", patient_id="P4", covid=False, seed=4
    )

    base = ("node", "label", "--config", str(config))
    rc, out, _ = run_cli(capsys, *base, "--path", str(a), "--label", "covid", "--who", "dr_a")
    assert rc == 0 and out.strip() == "labelled: covid"
    rc, out, _ = run_cli(capsys, *base, "--sop", uid_b, "--label", "non_covid", "--json")
    assert rc == 0 and json.loads(out) == {"changed": True, "label": "non_covid"}

    csv_path = tmp_path / "elsewhere" / "labels.csv"
    csv_path.write_text("path,label\nc.dcm,covid\nnope.dcm,covid\n")
    rc, out, err = run_cli(capsys, *base, "--csv", str(csv_path))
    assert rc == 9  # one row could not be imported (some inputs failed)
    assert "labelled=1" in out and "row 3: file not found" in err
    rc, out, _ = run_cli(capsys, *base, "--folder")
    assert rc == 0 and "labelled=1" in out

    rc, out, _ = run_cli(capsys, "node", "labels", "--config", str(config), "--json")
    summary = json.loads(out)
    assert summary["total"] == 4 and summary["patients"] == 4
    assert summary["counts"] == {"non_covid": 2, "covid": 2}
    assert summary["by_source"] == {"cli": 2, "csv": 1, "folder": 1}
    split = summary["split"]
    assert sum(split["train"].values()) + sum(split["val"].values()) == 4

    with LabelBook(tmp_path / "state" / "node.sqlite") as book:
        assert {r.who for r in book.all() if r.source == "cli"} >= {"dr_a"}

    rc, _, err = run_cli(capsys, *base, "--sop", "1.2.3", "--label", "covid")
    assert rc == 5 and "unknown slice" in err  # LabelError exit code, one line, no traceback
    rc, _, err = run_cli(capsys, *base, "--path", str(a), "--label", "maybe")
    assert rc == 5 and "unknown label" in err


def test_node_train_runs_the_worker_and_writes_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedscan node train` trains in the low-priority subprocess and reports the result."""
    node = make_labelled_node(tmp_path, n_patients=8, slices_per_patient=1)
    config = write_config(tmp_path, federation=pick_salt(node, 0.35))
    out_dir = tmp_path / "run1"
    rc, out, _ = run_cli(
        capsys,
        "node",
        "train",
        "--config",
        str(config),
        "--out",
        str(out_dir),
        "--onnx",
        "--json",
    )
    assert rc == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epochs_run"] == 1 and result["init"] == "random"
    assert result["num_samples"] + result["n_val"] == 8 and result["n_val"] > 0
    for name in ("weights.safetensors", "model.onnx", "metrics.json", "result.json"):
        assert (out_dir / name).is_file()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["job"]["torch_threads"] == 1 and metrics["job"]["nice"] == 10


def test_train_without_labels_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    rc, _, err = run_cli(capsys, "node", "train", "--config", str(config))
    assert rc == 6 and "no labelled slices" in err
    assert "Traceback" not in err


def test_cli_modules_do_not_import_torch() -> None:
    """Labelling and starting a training must not load torch into the daemon's process."""
    code = (
        "import sys, edge_node.cli.labels, edge_node.cli.train, edge_node.train.job_subprocess; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
