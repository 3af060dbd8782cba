"""The node's HTTP API served by real uvicorn from an in-process daemon, called with httpx."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from edge_node.daemon import Daemon
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path, write_garbage
from tests.helpers.node_api import DICOM, api_client, start_daemon, upload_sample


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    yield d
    d.shutdown(10)


@pytest.fixture
def client(node: Daemon) -> Iterator[httpx.Client]:
    with api_client(node) as c:
        yield c


def test_health(client: httpx.Client) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_version"] == "5" and h["node_id"] == "node1"
    assert h["queue"] == {"ready": 0, "prepared": 0}


def test_upload_predicts_stores_and_lists(client: httpx.Client, tmp_path: Path) -> None:
    uid, body = upload_sample(client, tmp_path)
    assert body["outcome"] == "predicted"
    (pred,) = body["predictions"]
    assert pred["sop_instance_uid"] == uid and pred["model_version"] == "5"
    assert pred["label"] in ("covid", "non_covid")
    listed = client.get("/api/predictions", params={"limit": 10}).json()["predictions"]
    assert [p["id"] for p in listed] == [pred["id"]]
    one = client.get(f"/api/predictions/{pred['id']}").json()
    assert (
        one["sop_instance_uid"] == uid and one["thumbnail"] == f"/api/thumbnails/{pred['id']}.png"
    )
    assert client.get("/api/predictions/999").status_code == 404
    assert client.get("/api/predictions", params={"limit": "x"}).status_code == 400
    again = client.post(
        "/api/predict", content=(tmp_path / "up.dcm").read_bytes(), headers=DICOM
    ).json()
    assert again["outcome"] == "duplicate"  # same SOP instance: its stored prediction
    assert [p["id"] for p in again["predictions"]] == [pred["id"]]
    assert len(client.get("/api/predictions").json()["predictions"]) == 1


def test_upload_refusals(client: httpx.Client, tmp_path: Path) -> None:
    assert client.post("/api/predict", content=b"", headers=DICOM).status_code == 400
    garbage = write_garbage(tmp_path / "g.dcm").read_bytes()
    r = client.post("/api/predict", content=garbage, headers=DICOM)
    assert r.status_code == 422 and "not_dicom" in r.json()["error"]
    assert client.get("/api/predictions").json()["predictions"] == []


def test_thumbnail_is_a_small_png_and_cached(
    node: Daemon, client: httpx.Client, tmp_path: Path
) -> None:
    _uid, body = upload_sample(client, tmp_path)
    pid = body["predictions"][0]["id"]
    r = client.get(f"/api/thumbnails/{pid}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (128, 128) and img.mode == "L"
    assert 0 < sum(img.getdata()) / (128 * 128) < 255  # an image, not a blank square
    assert (node.config.paths.state_dir / "thumbnails" / f"{pid}.png").read_bytes() == r.content
    assert client.get("/api/thumbnails/424242.png").status_code == 404


def test_labels_are_recorded_through_the_label_book(client: httpx.Client, tmp_path: Path) -> None:
    pytest.importorskip("edge_node.labels")
    uid, _ = upload_sample(client, tmp_path)
    r = client.post("/api/labels", json={"sop_instance_uid": uid, "label": "covid", "who": "dr_a"})
    assert r.status_code == 200 and r.json()["changed"] is True
    (row,) = client.get("/api/predictions").json()["predictions"]
    assert row["human_label"] == "covid" and row["labelled_by"] == "dr_a"
    bad = client.post("/api/labels", json={"sop_instance_uid": uid, "label": "flu", "who": "dr_a"})
    assert bad.status_code == 400
    unknown = client.post("/api/labels", json={"sop_instance_uid": "1.2.3.4", "label": "covid"})
    assert unknown.status_code == 400 and "unknown slice" in unknown.json()["error"]
    json_type = {"Content-Type": "application/json"}
    assert client.post("/api/labels", content=b"{not json", headers=json_type).status_code == 400


def test_metrics_in_prometheus_text(client: httpx.Client, tmp_path: Path) -> None:
    upload_sample(client, tmp_path)
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'fedscan_files{outcome="predicted"}' in text  # uploads are not inbox files
    assert "fedscan_predictions{label=" in text
    assert 'fedscan_model_info{version="5",arch="tiny_mean"} 1' in text
    assert 'fedscan_file_to_prediction_seconds_bucket{le="+Inf"} 1' in text
    assert "fedscan_file_to_prediction_seconds_count 1" in text
    assert 'fedscan_queue_depth{stage="ready"} 0' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


def test_page_lists_predictions_with_label_buttons(client: httpx.Client, tmp_path: Path) -> None:
    """The all-slices page (/slices, linked from the studies page) lists every slice."""
    uid, body = upload_sample(client, tmp_path)
    page = client.get("/slices").text
    assert f'data-uid="{uid}"' in page
    assert page.count('class="label covid"') == 1 and 'data-label="non_covid"' in page
    assert f"/api/thumbnails/{body['predictions'][0]['id']}.png" in page
    assert '<strong id="model">5</strong>' in page
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/slices.js").status_code == 200
    assert client.get("/static/../api.py").status_code == 404
    fragment = client.get("/slices", params={"fragment": "rows"}).text
    assert fragment.startswith("<tr") and uid in fragment


def test_inbox_file_reaches_the_api(node: Daemon, client: httpx.Client) -> None:
    """A file written into the inbox is listed by the API shortly after."""
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), node.config.paths.inbox / "new.dcm")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = client.get("/api/predictions").json()["predictions"]
        if rows:
            break
        time.sleep(0.05)
    assert [r["sop_instance_uid"] for r in rows] == [uid]


def test_token_is_required_when_set(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, token="s3cret")
    try:
        with api_client(d) as anon:
            assert anon.get("/health").status_code == 200
            assert anon.get("/api/predictions").status_code == 401
            assert anon.get("/metrics").status_code == 401
            assert anon.get("/", params={"token": "wrong"}).status_code == 401
            assert anon.get("/", params={"token": "s3cret"}).status_code == 200
            assert (
                anon.post(
                    "/api/predict", params={"token": "s3cret"}, content=b"x", headers=DICOM
                ).status_code
                == 401
            )
        with api_client(d, headers={"Authorization": "Bearer s3cret"}) as c:
            assert c.get("/api/predictions").status_code == 200
            empty = c.post("/api/predict", content=b"", headers=DICOM)
            assert empty.status_code == 400  # past the auth check
    finally:
        d.shutdown(10)
