"""fedscan experiment: patient-disjoint partitions, and a tiny end-to-end run of all three arms
(real trainer, the coordinator's fedavg strategy) on synthetic DICOM."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from export.weights import read_metadata
from fedscan.cli import main
from fedscan.dataset import IndexRow
from fedscan.experiment.errors import ExperimentError
from fedscan.experiment.partition import class_shares, partition
from fedscan.synthetic import generate


def _pool(n_patients: int = 30, seed: int = 0) -> list[IndexRow]:
    rows = []
    for p in range(n_patients):
        label = "covid" if p % 2 else "non_covid"
        for i in range(2 + (p * 7) % 5):  # 2..6 slices per patient
            rows.append(IndexRow(f"{p}_{i}.dcm", "train", label, f"pk{p}", "", f"1.2.{p}.{i}"))
    return rows


@pytest.mark.parametrize("kind", ["iid", "label_skew", "size_skew"])
def test_partitions_are_patient_disjoint_and_complete(kind: str) -> None:
    """Every slice lands in exactly one hospital, and no patient is split across hospitals."""
    pool = _pool()
    hospitals = partition(pool, 3, kind, seed=5)
    assert sorted(r.path for h in hospitals for r in h.rows) == sorted(r.path for r in pool)
    owners: dict[str, set[str]] = {}
    for h in hospitals:
        for r in h.rows:
            owners.setdefault(r.patient_key, set()).add(h.name)
    assert all(len(o) == 1 for o in owners.values())
    assert partition(pool, 3, kind, seed=5) == hospitals  # deterministic in the seed


def test_skews_shape_the_hospitals() -> None:
    """label_skew: opposite class balances; size_skew: falling sizes, similar class mix."""
    pool = _pool(60)
    lab = [h.class_counts() for h in partition(pool, 3, "label_skew", seed=1)]
    covid_share = [c["covid"] / (c["covid"] + c["non_covid"]) for c in lab]
    assert covid_share[0] > 0.75 and covid_share[2] < 0.25
    size = [len(h.rows) for h in partition(pool, 3, "size_skew", seed=1)]
    assert size[0] > size[1] > size[2]
    assert class_shares("iid", 4)["covid"] == [0.25] * 4


def test_partition_refuses_too_few_patients() -> None:
    with pytest.raises(ExperimentError):
        partition(_pool(2), 3, "iid", seed=0)
    with pytest.raises(ExperimentError):
        class_shares("dirichlet", 3)


def test_tiny_experiment_runs_all_arms_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 seed, 1 round, 1 epoch on 48 synthetic slices (resnet10_gn with texture features): the
    JSON has every arm's mean/std, the per-hospital figures and the configuration, and the
    markdown table is printed."""
    torch.set_num_threads(1)
    data = generate(tmp_path / "syn", 12, seed=3, n_patients=12, size=64).parent
    out = tmp_path / "exp.json"
    rc = main(
        ["experiment", "--dataset", str(data), "--json", str(out), "--seeds", "0",
         "--rounds", "1", "--local-epochs", "1", "--threads", "1", "--jobs", "1",
         "--partition", "size_skew", "--arch", "resnet10_gn", "--texture"]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    for arm in ("local_only", "fedavg", "centralized"):
        for metric in ("accuracy", "f1", "sensitivity", "specificity"):
            assert set(doc["arms"][arm][metric]) >= {"mean", "std"}
            assert 0.0 <= doc["arms"][arm][metric]["mean"] <= 1.0
    assert set(doc["arms"]["local_only"]["per_hospital"]) == {
        "hospital-1", "hospital-2", "hospital-3"
    }  # fmt: skip
    assert doc["config"]["partition"] == "size_skew" and doc["config"]["total_epochs"] == 1
    assert doc["config"]["arch"] == "resnet10_gn" and doc["config"]["texture"] is True
    v0 = next((tmp_path / "exp-work").rglob("global_v0.safetensors"))
    assert read_metadata(v0)["texture_dim"] == "22" and read_metadata(v0)["arch"] == "resnet10_gn"
    assert len(doc["arms"]["fedavg"]["per_round_accuracy"]) == 2  # v0 and v1
    assert doc["arms"]["fedavg"]["simulated"] is True
    assert doc["runs"][0]["fedavg_selected_version"] in (0, 1)
    assert set(doc["arms"]["fedavg"]["last_round"]["accuracy"]) >= {"mean", "std"}
    test_rows = [r for r in (data / "index.csv").read_text().splitlines()[1:] if ",test," in r]
    assert doc["test_set"]["slices"] == len(test_rows) == doc["runs"][0]["fedavg"]["n"]
    sizes = Counter({h["name"]: h["slices"] for h in doc["runs"][0]["hospitals"]})
    assert sum(sizes.values()) == doc["pool"]["slices"]
    printed = capsys.readouterr().out
    assert "| FedAvg global model (version chosen on validation) |" in printed
    assert "simulated in-process" in printed
    t = doc["target"]
    assert t["met"] == (
        t["fedavg_minus_best_local_points"] >= 3 and t["centralized_minus_fedavg_points"] <= 2
    )
    assert t["test_set_binomial_se_points"] > 0

    # the summary can be recomputed from the per-seed runs alone, without training
    doc["arms"] = doc["markdown"] = None
    out.write_text(json.dumps(doc))
    assert main(["experiment", "--json", str(out), "--from-json"]) == 0
    again = json.loads(out.read_text())
    assert again["arms"]["centralized"]["accuracy"]["mean"] == pytest.approx(
        again["runs"][0]["centralized"]["accuracy"]
    )
    assert "| Centralized (pooled data) |" in again["markdown"]


def test_kfold_tests_every_slice_once_with_patient_bootstrap_intervals(tmp_path: Path) -> None:
    """--folds 2 on 40 synthetic slices: every slice of the dataset is a test slice exactly
    once, the intervals cover each arm and the FedAvg paired differences at slice and patient
    level, operating points come from validation, and an interrupted run resumes."""
    torch.set_num_threads(1)
    data = generate(tmp_path / "syn", 20, seed=4, n_patients=20, size=64).parent
    out = tmp_path / "kf.json"
    argv = ["experiment", "--dataset", str(data), "--json", str(out), "--seeds", "0",
            "--rounds", "1", "--local-epochs", "1", "--threads", "1", "--jobs", "1",
            "--folds", "2", "--val-fraction", "0.3", "--n-boot", "40"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    all_rows = (data / "index.csv").read_text().splitlines()[1:]
    tested = [i for p in doc["predictions"] if p["arm"] == "fedavg" for i in p["test_ids"]]
    assert len(tested) == len(set(tested)) == len(all_rows) == 40
    seed0 = doc["intervals"]["per_seed"]["0"]
    assert seed0["folds"] == 2 and seed0["slices"] == 40 and seed0["patients"] == 20
    for arm in ("fedavg", "centralized", "hospital-1", "fedavg@cal"):
        acc = seed0["arms"][arm]["accuracy"]
        assert acc["lo"] <= acc["estimate"] <= acc["hi"]
        assert "patient_accuracy" in seed0["arms"][arm] and "ece" in seed0["arms"][arm]
    assert "fedavg-centralized" in seed0["differences"]
    assert "patient_accuracy" in seed0["differences"]["fedavg-hospital-1"]
    assert len(seed0["operating_points"]["fedavg"]) == 2
    assert "| Paired difference |" in doc["markdown"]
    # a second start with the same settings trains nothing: every task is in the done file
    assert main(argv) == 0
    assert json.loads(out.read_text())["intervals"]["per_seed"]["0"]["slices"] == 40
    # --compare pairs two runs on the same slices: a run against its copy differs by 0
    twin = tmp_path / "twin.json"
    twin.write_text(out.read_text())
    assert main(["experiment", "--json", str(out), "--compare", str(twin), "--n-boot", "20"]) == 0
    cmp = json.loads((tmp_path / "kf-vs-twin.json").read_text())
    diff = cmp["per_seed"]["0"]["differences"]["fedavg"]["accuracy"]
    assert diff == {"estimate": 0.0, "lo": 0.0, "hi": 0.0}
    assert set(cmp["per_seed"]["0"]["arms"]["centralized@cal"]) == {"kf", "twin"}
    assert "| fedavg |" in cmp["markdown"]
