"""The DICOM results of one series, built from a real multi-slice CT series: a TID 1500 SR
and a Secondary Capture, valid by dciodvfy (dicom3tools), read back by pydicom and DCMTK."""

from __future__ import annotations

import logging
import shutil
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest

from edge_node.results.common import SeriesFinding, SliceScore, quiet_highdicom
from edge_node.results.publish import ResultPublisher
from tests.helpers.dicom_factory import sample_path, write_series


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    paths = write_series(sample_path("693_UNCR.dcm"), tmp_path / "series", 5)
    for i, p in enumerate(paths):  # a source attribute that must not reach the results
        ds = pydicom.dcmread(p)
        ds.InstitutionName = "Source Hospital"
        ds.OperatorsName = "Op^Erator"
        ds.AccessionNumber = "ACC-7"
        ds.save_as(p)
        assert i == ds.InstanceNumber - 1
    return paths


def _finding(paths: list[Path], *, untrained: bool = False) -> SeriesFinding:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    probs = [0.91, 0.72, 0.35, 0.66, 0.2]
    return SeriesFinding(
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        verdict="covid",
        score=0.6,
        threshold=0.5,
        uncertain_band=0.1,
        rule="majority",
        n_slices_used=5,
        model_version="7",
        calibrated=False,
        untrained=untrained,
        slices=[
            SliceScore(str(h.SOPInstanceUID), 0, p, "covid" if p >= 0.5 else "non_covid")
            for h, p in zip(headers, probs, strict=True)
        ],
    )


def _dciodvfy(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def test_sr_and_sc_go_to_the_outbox_valid_and_minimal(series: list[Path], tmp_path: Path) -> None:
    """Five slices, verdict covid: the publisher queues an SR and an SC in outbox/pending;
    both pass dciodvfy without an Error line, join the source study as new series, carry the
    source's patient and study attributes and nothing else of it (no institution, operator,
    series description), and results name their UIDs and outbox state."""
    finding = _finding(series)
    src = pydicom.dcmread(series[0], stop_before_pixels=True)
    results = ResultPublisher(tmp_path / "outbox")(finding, {"paths": [str(p) for p in series]})
    pending = sorted((tmp_path / "outbox" / "pending").glob("*.dcm"))
    assert len(pending) == 2 and set(results) == {"sr", "sc"}
    by_sop = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in pending}
    for kind in ("sr", "sc"):
        entry = results[kind]
        assert entry["outbox"] == "pending" and entry["sop_instance_uid"] in by_sop
        path = by_sop[entry["sop_instance_uid"]]
        report = _dciodvfy(path)
        errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
        assert errors == [], report
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID not in (src.SeriesInstanceUID, entry["sop_instance_uid"])
        assert ds.SeriesInstanceUID == entry["series_instance_uid"]
        assert (ds.PatientName, ds.PatientID, ds.AccessionNumber) == (
            src.PatientName, src.PatientID, "ACC-7",
        )  # fmt: skip
        assert "InstitutionName" not in ds and "OperatorsName" not in ds
        assert "5/5mm" not in str(ds.get("SeriesDescription"))
    sr = pydicom.dcmread(by_sop[results["sr"]["sop_instance_uid"]])
    assert sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == src.SeriesInstanceUID
    assert len(evidence.ReferencedSOPSequence) == 5
    sc = pydicom.dcmread(by_sop[results["sc"]["sop_instance_uid"]])
    assert sc.Modality == "OT" and sc.pixel_array.ndim == 2 and sc.BurnedInAnnotation == "YES"
    assert sc.pixel_array.max() == 255  # text and slices were drawn


def test_sr_content_reads_in_dcmtk(series: list[Path], tmp_path: Path) -> None:
    """DCMTK's dsrdump shows the TID 1500 tree: the verdict, the score, the threshold, the
    rule and model version, the calibration state in words and the image library."""
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) not installed")
    from edge_node.results.sr import build_sr

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in series]
    sr = build_sr(_finding(series, untrained=True), headers)
    out = tmp_path / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    text = subprocess.run(["dsrdump", str(out)], capture_output=True, text=True, timeout=60).stdout
    for needle in (
        "Imaging Measurement Report",
        "COVID-19 pattern suspected",
        "COVID-19 series score",
        '"0.6"',
        "rule=majority",
        "Untrained model (random init)",
        "Image Library",
    ):
        assert needle in text, text


def test_uids_follow_the_content(series: list[Path], tmp_path: Path) -> None:
    """The same finding queued twice replaces itself (same SOP Instance UID, one file per
    object); a changed finding (a late slice) gets new instance UIDs in the same result
    series."""
    import dataclasses

    finding = _finding(series)
    rows = {"paths": [str(p) for p in series]}
    publish = ResultPublisher(tmp_path / "outbox", sc=False)
    first, again = publish(finding, rows), publish(finding, rows)
    assert first["sr"]["sop_instance_uid"] == again["sr"]["sop_instance_uid"]
    assert len(list((tmp_path / "outbox" / "pending").glob("*.dcm"))) == 1
    changed = publish(dataclasses.replace(finding, score=0.8, n_slices_used=6), rows)
    assert changed["sr"]["sop_instance_uid"] != first["sr"]["sop_instance_uid"]
    assert changed["sr"]["series_instance_uid"] == first["sr"]["series_instance_uid"]


def test_building_results_logs_no_patient_name_or_uid(
    series: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source whose PatientName has one component (highdicom warns quoting it) and whose
    study UID highdicom names at INFO: nothing of either reaches the logs or warnings."""
    for p in series:
        ds = pydicom.dcmread(p)
        ds.PatientName = "CQ500-CT-310"
        ds.save_as(p)
    study_uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        quiet_highdicom()  # catch_warnings reset the filters; the daemon has them from import
        ResultPublisher(tmp_path / "outbox")(_finding(series), {"paths": [str(p) for p in series]})
    text = caplog.text + "\n".join(str(w.message) for w in caught)
    assert "CQ500-CT-310" not in text and study_uid not in text
