"""Queries and routes behind the studies page: studies -> series -> slices, filters, windows,
series labels and the larger slice render, on a real SQLite file and a real uvicorn server."""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image

from edge_node.cli.daemon import init_node
from edge_node.config import load_config
from edge_node.daemon import Daemon
from edge_node.errors import QueryError
from edge_node.labels import LabelBook
from edge_node.serve import browse
from edge_node.serve.browse_api import model_status
from edge_node.serve.inference import OnnxModel
from edge_node.store import FileRecord, PredictionRow, Store
from tests.helpers.onnx_models import make_classifier
from tests.helpers.study_factory import new_study, write_chest_series

NOW = 1_780_000_000.0


def _study(con: sqlite3.Connection, uid: str, **kw: Any) -> None:
    row = {
        "study_instance_uid": uid,
        "patient_name": "Doe^Jane",
        "patient_id": "P1",
        "patient_key": "k1",
        "accession_number": "A1",
        "study_date": "20240101",
        "study_time": "120000",
        "study_description": "CT THORAX",
        "referring_physician": "Ref^Doc",
        "first_seen": NOW,
        "last_seen": NOW,
        **kw,
    }
    cols = ", ".join(row)
    con.execute(
        f"INSERT INTO studies({cols}) VALUES ({', '.join('?' * len(row))})", (*row.values(),)
    )


def _series(con: sqlite3.Connection, uid: str, study: str, **kw: Any) -> None:
    row = {
        "series_instance_uid": uid,
        "study_instance_uid": study,
        "modality": "CT",
        "series_number": 1,
        "series_description": "Lung 1mm",
        "body_part": "CHEST",
        "n_instances": 3,
        "expected_instances": None,
        "first_seen": NOW,
        "last_seen": NOW,
        "status": "complete",
        "verdict": "covid",
        "score": 0.8,
        "threshold": 0.5,
        "uncertain_band": 0.1,
        "rule": "top_k_mean",
        "n_slices_used": 3,
        "model_version": "5",
        "calibrated": 0,
        "completed_at": NOW + 30,
        "results_json": '{"k": 1}',
        **kw,
    }
    cols = ", ".join(row)
    con.execute(
        f"INSERT INTO series({cols}) VALUES ({', '.join('?' * len(row))})", (*row.values(),)
    )


def _slices(store: Store, series: str, study: str, probs: list[float]) -> list[str]:
    uids = []
    for i, p in enumerate(probs):
        sop = f"{series}.{i + 1}"
        pred = PredictionRow(
            sop, 0, series, study, "k1", f"/inbox/{sop}.dcm", "covid" if p >= 0.5 else "non_covid",
            max(p, 1 - p), p, "5", None, None, None, None,
        )  # fmt: skip
        store.record_file(FileRecord(f"/inbox/{sop}.dcm", 1, 1.0, sop, "predicted"), [pred])
        uids.append(sop)
    return uids


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    """Three studies: 1.1 (newest: a covid and a skipped head series), 1.2 (an uncertain series
    and one still open), 1.3 (oldest, non_covid, another patient)."""
    path = tmp_path / "node.sqlite"
    store = Store(path)
    con = sqlite3.connect(path, isolation_level=None)
    _study(con, "1.1", last_seen=NOW + 300, accession_number="ACC-77")
    _series(con, "1.1.1", "1.1", series_description="Lung 1mm", series_number=2)
    _series(
        con, "1.1.2", "1.1", series_description="Head routine", series_number=1,
        status="skipped", skip_reason="body_part:HEAD", verdict=None, score=None,
    )  # fmt: skip
    _study(con, "1.2", last_seen=NOW + 200, study_date="20240315")
    _series(con, "1.2.1", "1.2", verdict="uncertain", score=0.55)
    _series(con, "1.2.2", "1.2", status="open", verdict=None, score=None, completed_at=None)
    _study(
        con, "1.3", last_seen=NOW + 100, patient_name="Roe^Richard", patient_id="P2",
        study_date="20231120", study_description="CT ABDOMEN",
    )  # fmt: skip
    _series(con, "1.3.1", "1.3", verdict="non_covid", score=0.1)
    _slices(store, "1.1.1", "1.1", [0.3, 0.9, 0.7])
    _slices(store, "1.2.1", "1.2", [0.55, 0.52])
    _slices(store, "1.2.2", "1.2", [0.2])
    con.execute("UPDATE predictions SET verdict = 'covid' WHERE prob_covid >= 0.6")
    con.close()
    store.close()
    yield path


def _page(db: Path, **kw: Any) -> dict[str, Any]:
    return browse.list_studies(db, browse.StudyQuery(**kw))


def test_studies_newest_first_grouped_with_series_state_and_key_slices(db: Path) -> None:
    """Studies come newest first, each with its series in series-number order; a series shows
    skipped, pending or its verdict, and its key slices highest P(covid) first."""
    page = _page(db)
    assert page["available"] and page["total"] == 3
    assert [s["study_instance_uid"] for s in page["studies"]] == ["1.1", "1.2", "1.3"]
    first = page["studies"][0]
    assert first["patient_name"] == "Doe^Jane" and first["accession_number"] == "ACC-77"
    head, lung = first["series"]
    assert (head["state"], head["skip_reason"], head["n_slices"]) == (
        "skipped",
        "body_part:HEAD",
        0,
    )
    assert lung["state"] == "covid" and lung["n_slices"] == 3 and "results_json" not in lung
    assert [k["prob_covid"] for k in lung["key_slices"]] == pytest.approx([0.9, 0.7, 0.3])
    assert lung["key_slices"][0]["thumbnail"].startswith("/api/thumbnails/")
    assert [s["state"] for s in page["studies"][1]["series"]] == ["uncertain", "pending"]
    # Slice verdicts: stored where the column is set, else from the series' threshold and band.
    assert [k["verdict"] for k in lung["key_slices"]] == ["covid", "covid", "non_covid"]
    assert [k["verdict"] for k in page["studies"][1]["series"][0]["key_slices"]] == [
        "uncertain",
        "uncertain",
    ]


def test_filters_by_verdict_status_text_and_date(db: Path) -> None:
    """Verdict and status filters keep studies with such a series and show only those series;
    the text search matches patient name (either order, no ^), ID, accession or descriptions."""
    covid = _page(db, verdict="covid")
    assert [s["study_instance_uid"] for s in covid["studies"]] == ["1.1"]
    assert [s["series_instance_uid"] for s in covid["studies"][0]["series"]] == ["1.1.1"]
    assert covid["studies"][0]["n_series"] == 2  # the page says one is hidden by the filter
    assert [s["study_instance_uid"] for s in _page(db, status="open")["studies"]] == ["1.2"]
    assert [s["study_instance_uid"] for s in _page(db, status="skipped")["studies"]] == ["1.1"]
    assert _page(db, verdict="non_covid", status="open")["total"] == 0

    def found(q: str) -> list[str]:
        return [s["study_instance_uid"] for s in _page(db, q=q)["studies"]]

    assert found("richard roe") == ["1.3"] and found("Roe^Richard") == ["1.3"]
    assert found("JANE") == ["1.1", "1.2"]
    assert found("acc-77") == ["1.1"]
    assert found("p2") == ["1.3"]
    assert found("abdomen") == ["1.3"]
    assert found("head routine") == ["1.1"]  # a series description
    assert found("100%") == [] and found("_") == []  # LIKE wildcards are literal
    assert [s["study_instance_uid"] for s in _page(db, date_from="20240101")["studies"]] == [
        "1.1",
        "1.2",
    ]
    assert [s["study_instance_uid"] for s in _page(db, date_to="20231231")["studies"]] == ["1.3"]


def test_pagination_is_server_side(db: Path) -> None:
    """limit/offset page through the studies; total counts every match."""
    one = _page(db, limit=2, offset=0)
    two = _page(db, limit=2, offset=2)
    assert one["total"] == two["total"] == 3
    assert [s["study_instance_uid"] for s in one["studies"] + two["studies"]] == [
        "1.1",
        "1.2",
        "1.3",
    ]
    assert _page(db, limit=2, offset=4)["studies"] == []


def test_series_detail_lists_slices_in_arrival_order_with_labels(db: Path) -> None:
    """The detail of a series has its study, every slice in arrival order and each slice's
    human label with who and when; an unknown series is a QueryError."""
    with LabelBook(db) as book:
        book.set("1.1.1.2", "covid", who="dr_a", source="api")
    detail = browse.series_detail(db, "1.1.1")
    assert detail["study"]["patient_id"] == "P1" and detail["results_json"] == '{"k": 1}'
    assert [s["sop_instance_uid"] for s in detail["slices"]] == ["1.1.1.1", "1.1.1.2", "1.1.1.3"]
    labelled = detail["slices"][1]
    assert (labelled["human_label"], labelled["labelled_by"]) == ("covid", "dr_a")
    assert abs(labelled["labelled_at"] - time.time()) < 60
    assert detail["labels"]["covid"] == 1 and detail["labels"]["last_who"] == "dr_a"
    window = browse.series_detail(db, "1.1.1", browse.SliceQuery(limit=1, offset=2))
    assert [s["sop_instance_uid"] for s in window["slices"]] == ["1.1.1.3"]
    with pytest.raises(QueryError, match="no such series"):
        browse.series_detail(db, "9.9.9")


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "201"},
        {"limit": "x"},
        {"offset": "-1"},
        {"offset": "1e3"},
        {"q": "a" * 65},
        {"q": "a\x00b"},
        {"verdict": "flu"},
        {"status": "done"},
        {"date_from": "2024-02-30"},
        {"date_to": "yesterday"},
        {"sort": "name"},
    ],
)
def test_bad_study_queries_are_refused(params: dict[str, str]) -> None:
    """Every study-list parameter is bounded; out of bounds is a QueryError (HTTP 400)."""
    with pytest.raises(QueryError):
        browse.StudyQuery.from_params(params)


def test_query_from_url_parameters() -> None:
    """URL strings become a query: HTML date inputs, empty filters ignored, token allowed."""
    q = browse.StudyQuery.from_params(
        {"limit": "50", "offset": "100", "verdict": "", "q": " doe ", "date_from": "2024-01-31",
         "token": "t"}
    )  # fmt: skip
    assert (q.limit, q.offset, q.verdict, q.q, q.date_from) == (50, 100, None, "doe", "20240131")
    for bad in ("1/2", "", "x" * 129, "1.2.3'--"):
        with pytest.raises(QueryError):
            browse.check_uid(bad)
    with pytest.raises(QueryError):
        browse.SliceQuery.from_params({"limit": "2001"})


def test_database_without_series_tables_is_an_empty_page(tmp_path: Path) -> None:
    """A database that never tracked series gives available=False, not an error."""
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY)")
    con.close()
    page = _page(path)
    assert page == {"available": False, "total": 0, "limit": 20, "offset": 0, "studies": []}


def test_model_status_says_untrained_and_uncalibrated(tmp_path: Path) -> None:
    """The page's banner: a random-init version-0 model is untrained; one without a fitted
    threshold is uncalibrated; a calibrated trained model gives no warning."""
    raw = OnnxModel(make_classifier(tmp_path / "a.onnx", version="0"), 1)
    status = model_status(raw)
    assert status["untrained"] and not status["calibrated"]
    assert any("untrained" in w for w in status["warnings"])
    assert any("not calibrated" in w for w in status["warnings"])
    fitted = OnnxModel(
        make_classifier(
            tmp_path / "b.onnx",
            version="4",
            metadata={"fedscan.threshold": "0.4", "fedscan.uncertain_band": "0.05"},
        ),
        1,
    )
    good = model_status(fitted)
    assert good["calibrated"] and good["threshold"] == pytest.approx(0.4)
    assert good["warnings"] == []
    assert model_status(None)["warnings"] and not model_status(None)["loaded"]


# -- routes, on a real daemon + uvicorn ---------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    toml = init_node(tmp_path / "node")
    make_classifier(tmp_path / "node" / "models" / "current.onnx", version="5")
    cfg = load_config(toml, {"api": {"port": 0}, "inference": {"intra_op_threads": 1}})
    d = Daemon(cfg)
    d.start()
    yield d
    d.shutdown(10)


@pytest.fixture
def client(node: Daemon) -> Iterator[httpx.Client]:
    port = int((node.config.paths.state_dir / "api.port").read_text())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        yield c


def _upload_series(client: httpx.Client, tmp: Path, n: int) -> tuple[str, list[dict[str, Any]]]:
    study = new_study("Test^Upload", "TP-9", "ACC-9", "CT THORAX", "20240102")
    paths = write_chest_series(tmp / "series", study, hu_offsets=[0.0] * n)
    preds = []
    for path in paths:
        r = client.post(
            "/api/predict",
            content=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        assert r.status_code == 200, r.text
        preds += r.json()["predictions"]
    return str(pydicom.dcmread(paths[0]).SeriesInstanceUID), preds


def test_routes_refuse_bad_input_with_400(client: httpx.Client) -> None:
    """Out-of-bounds parameters give 400 with a message, never 500."""
    for params in ({"limit": "500"}, {"offset": "-3"}, {"q": "q" * 65}, {"verdict": "x"}):
        r = client.get("/api/studies", params=params)
        assert r.status_code == 400 and r.json()["error"], params
    assert client.get("/api/studies").status_code == 200
    assert client.get("/api/series/not%20a%20uid").status_code == 400
    assert client.get("/api/series/1.2.3").status_code == 404
    assert client.get("/api/series/1.2.3", params={"limit": "0"}).status_code == 400
    assert client.get("/api/images/1.png", params={"size": "4096"}).status_code == 400
    assert client.get("/api/images/1.png", params={"size": "abc"}).status_code == 400
    assert client.get("/api/images/99999.png").status_code == 404
    for body in (b"{", b"[]", b'{"label": 3}', b'{"label": "flu", "who": "a"}'):
        r = client.post(
            "/api/series/1.2.3/label", content=body, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, body
    r = client.post("/api/series/1.2.3/label", json={"label": "covid", "who": "x" * 65})
    assert r.status_code == 400
    assert client.post("/api/series/1.2.3/label", json={"label": "covid"}).status_code == 404


def test_series_label_applies_to_every_slice(
    node: Daemon, client: httpx.Client, tmp_path: Path
) -> None:
    """A series label is recorded, through the label book, for each slice of the series, with
    its author; repeating it changes nothing."""
    series_uid, preds = _upload_series(client, tmp_path, 3)
    r = client.post(f"/api/series/{series_uid}/label", json={"label": "non-covid", "who": "dr_b"})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "label": "non_covid", "slices": 3, "changed": 3}
    with LabelBook(node.config.paths.database) as book:
        got = {p["sop_instance_uid"]: book.get(p["sop_instance_uid"]) for p in preds}
    assert {(g.label, g.who, g.source) for g in got.values() if g} == {("non_covid", "dr_b", "api")}
    assert len(got) == 3 and all(got.values())
    again = client.post(f"/api/series/{series_uid}/label", json={"label": "non_covid", "who": "b"})
    assert again.json()["changed"] == 0


def test_larger_render_is_the_lung_windowed_slice(client: httpx.Client, tmp_path: Path) -> None:
    """/api/images/{id}.png renders the preprocessed slice at the size asked for."""
    _uid, preds = _upload_series(client, tmp_path, 1)
    r = client.get(f"/api/images/{preds[0]['id']}.png", params={"size": "512"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (512, 512) and img.mode == "L"
    lo, hi = img.getextrema()
    # Lung window -600/1500: air (-1000 HU) is 60/255, soft tissue (+40 HU) 236/255.
    assert lo < 80 and hi > 220
    page = client.get("/").text
    assert 'id="banner"' in page and "not calibrated" in page
    assert '<strong id="model">5</strong>' in page
    assert client.get("/api/model").json()["version"] == "5"


def test_fingerprint_moves_with_slices_series_and_labels(db: Path) -> None:
    """The change token the page polls moves when a label is given or a series completes,
    and stays put otherwise."""
    before = browse.fingerprint(db)
    assert browse.fingerprint(db) == before
    with LabelBook(db) as book:
        book.set("1.1.1.1", "covid", who="dr_a", source="api")
    labelled = browse.fingerprint(db)
    assert labelled != before
    con = sqlite3.connect(db, isolation_level=None)
    con.execute(
        "UPDATE series SET status = 'complete', verdict = 'non_covid' WHERE status = 'open'"
    )
    con.close()
    assert browse.fingerprint(db) != labelled


def test_page_and_routes_behind_the_token(tmp_path: Path) -> None:
    """With api.token set, the page and its JSON need the token (query on GET or bearer)."""
    toml = init_node(tmp_path / "node")
    make_classifier(tmp_path / "node" / "models" / "current.onnx", version="5")
    cfg = load_config(
        toml, {"api": {"port": 0, "token": "s3cret"}, "inference": {"intra_op_threads": 1}}
    )
    d = Daemon(cfg)
    d.start()
    try:
        port = int((cfg.paths.state_dir / "api.port").read_text())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as anon:
            for path in ("/", "/api/studies", "/api/changes", "/api/model", "/api/images/1.png"):
                assert anon.get(path).status_code == 401, path
            assert anon.get("/", params={"token": "s3cret"}).status_code == 200
            assert anon.get("/api/studies", params={"token": "s3cret"}).status_code == 200
            bearer = {"Authorization": "Bearer s3cret"}
            assert anon.get("/api/changes", headers=bearer).json()["changes"]
    finally:
        d.shutdown(10)


def test_frame_labels_show_on_their_frame_only(tmp_path: Path) -> None:
    """A two-frame file: a label on frame 1 shows on that frame's row only; a whole-file label
    shows on both; each slice says how many frames its file has (the page labels by frame)."""
    path = tmp_path / "node.sqlite"
    store = Store(path)
    con = sqlite3.connect(path, isolation_level=None)
    _study(con, "2.1")
    _series(con, "2.1.1", "2.1")
    con.close()
    row = ("2.1.1.1", "2.1.1", "2.1", "k", "/inbox/mf.dcm", "covid", 0.7, 0.7, "5")
    preds = [PredictionRow(row[0], f, *row[1:], None, None, None, None) for f in (0, 1)]
    store.record_file(FileRecord("/inbox/mf.dcm", 1, 1.0, "2.1.1.1", "predicted", None, 2), preds)
    store.close()
    with LabelBook(path) as book:
        book.set("2.1.1.1", "non_covid", who="dr_f", source="api", frame=1)
    slices = browse.series_detail(path, "2.1.1")["slices"]
    assert [(s["frame"], s["n_frames"], s["human_label"]) for s in slices] == [
        (0, 2, None),
        (1, 2, "non_covid"),
    ]
    with LabelBook(path) as book:
        book.set("2.1.1.1", "covid", who="dr_f", source="api")
    slices = browse.series_detail(path, "2.1.1")["slices"]
    assert [s["human_label"] for s in slices] == ["covid", "covid"]
