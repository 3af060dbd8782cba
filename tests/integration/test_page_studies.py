"""The studies page in headless Chromium, against a real `fedscan node run` process fed real
DICOM series: three synthetic chest CT studies (covid-like, non-covid-like, borderline) and a
real head CT series that the node skips; screenshots are saved for a person to look at."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.helpers.cdp import CHROMIUM, Browser, Page
from tests.helpers.onnx_models import make_classifier
from tests.helpers.study_factory import new_study, write_chest_series, write_head_series
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration

# The rule is pinned so that the borderline study stays "uncertain" whatever the default.
SERIES_TOML = '\n[series]\nquiet_time_s = 1.0\ncheck_interval_s = 0.2\nrule = "top_k_mean"\n'
# With the tiny mean-brightness model, adding HU brightens the lung-windowed slice:
# +200 HU gives P(covid) ~0.8, -250 HU ~0.02, +45 HU ~0.45 (inside the default band).
STUDIES = [
    ("Doe^Jane", "TP-001", "ACC-1001", "CT THORAX W/O CONTRAST", "20240102", [200, 150, 250, 180]),
    ("Roe^Richard", "TP-002", "ACC-1002", "CT CHEST LOW DOSE", "20240215", [-250, -300, -200]),
    ("Poe^Edgar", "TP-003", "ACC-1003", "CT CHEST", "20240301", [45, 40, 50]),
]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One node, fed once; the tests below read it (module scope keeps the suite short)."""
    tmp = tmp_path_factory.mktemp("page")
    node = NodeProcess(tmp / "node", extra_toml=SERIES_TOML)
    make_classifier(node.folder / "models" / "current.onnx", version="0")  # random init
    node.start()
    try:
        staging = tmp / "staging"
        series: dict[str, str] = {}
        fed_files = 0
        for name, pid, acc, desc, date, offsets in STUDIES:
            study = new_study(name, pid, acc, desc, date)
            paths = write_chest_series(staging / pid, study, hu_offsets=offsets)
            series[pid] = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
            if pid == "TP-001":
                head = write_head_series(staging / "head", study, n=2)
                series["head"] = str(pydicom.dcmread(head[0]).SeriesInstanceUID)
                paths += head
            for i, path in enumerate(paths):  # complete files appear in the inbox at once
                os.replace(path, node.inbox / f"{pid}-{path.parent.name}-{i}.dcm")
            # One study after the other, so "newest first" has a defined order.
            fed_files += len(paths)
            wait_for(
                lambda n=fed_files: node.query("SELECT COUNT(*) FROM files")[0][0] >= n,
                what=f"{fed_files} files handled",
            )
        n_series = len(series)
        wait_for(
            lambda: len(node.query("SELECT 1 FROM series WHERE status != 'open'")) == n_series,
            timeout=60,
            what=f"{n_series} series complete or skipped",
        )
        yield {"node": node, "series": series, "tmp": tmp}
    finally:
        try:
            assert node.terminate() == 0
        finally:
            node.kill()


@pytest.fixture(scope="module")
def browser(fed: dict[str, Any]) -> Iterator[Browser]:
    """One headless Chromium for the module, driven over the DevTools pipe."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    with Browser(fed["tmp"] / "chromium-profile") as b:
        yield b


def _open(browser: Browser, fed: dict[str, Any], path: str = "/") -> Page:
    """A tab on the node's page, once the study list (or its error) is rendered."""
    page = browser.open(f"http://127.0.0.1:{fed['node'].port}{path}")
    page.wait_for("document.getElementById('status-line').textContent.length > 0")
    return page


def _api(fed: dict[str, Any], path: str, **kw: Any) -> httpx.Response:
    port = fed["node"].port
    return httpx.request(
        kw.pop("method", "GET"), f"http://127.0.0.1:{port}{path}", timeout=30, **kw
    )


def test_studies_page_shows_patients_series_verdicts_and_banner(
    fed: dict[str, Any], browser: Browser
) -> None:
    """The page groups the node's slices by study and series, newest first, with patient,
    accession, descriptions, the series verdicts (the head CT skipped as not chest), label
    authors, and a banner saying the model is untrained and uncalibrated."""
    node, series = fed["node"], fed["series"]
    r = _api(
        fed,
        f"/api/series/{series['TP-002']}/label",
        method="POST",
        json={"label": "non_covid", "who": "dr_test"},
        headers={"Origin": f"http://127.0.0.1:{node.port}"},  # as the page's fetch sends it
    )
    assert r.status_code == 200 and r.json()["slices"] == 3, r.text
    foreign = {"Origin": "http://evil.example"}  # another site's page may not label (CSRF)
    r = _api(fed, f"/api/series/{series['TP-002']}/label", method="POST",
             json={"label": "covid", "who": "x"}, headers=foreign)  # fmt: skip
    assert r.status_code == 403
    page = _api(fed, "/api/studies").json()
    assert [s["patient_id"] for s in page["studies"]] == ["TP-003", "TP-002", "TP-001"]
    states = {s["series_instance_uid"]: s["state"] for st in page["studies"] for s in st["series"]}
    assert states[series["head"]] == "skipped"
    assert states[series["TP-001"]] == "covid" and states[series["TP-002"]] == "non_covid"
    assert states[series["TP-003"]] == "uncertain"

    page = _open(browser, fed)
    dom = page.html()
    page.close()
    for text in ("Doe, Jane", "Roe, Richard", "Poe, Edgar", "ACC-1001", "TP-002", "2024-02-15"):
        assert text in dom, text
    for text in ("CT THORAX W/O CONTRAST", "Thorax 1.0 lung", "Head routine"):
        assert text in dom, text
    assert dom.count('class="badge covid"') == 1 and dom.count('class="badge non_covid"') == 1
    assert dom.count('class="badge uncertain"') == 1 and dom.count('class="badge skipped"') == 1
    assert "skipped: not chest" in dom and "inside the uncertain band" in dom
    assert "last by dr_test" in dom
    assert "Model untrained" in dom and "not calibrated" in dom
    assert dom.count('class="thumb"') == 10  # every chest slice shown, head slices not predicted
    assert "Studies 1\u20133 of 3" in dom


def test_filters_and_pagination(fed: dict[str, Any], browser: Browser) -> None:
    """Filters in the URL narrow the list as the page shows it; pages are server-side."""
    page = _open(browser, fed, "/?verdict=non_covid")
    dom = page.html()
    page.close()
    assert "Roe, Richard" in dom and "Doe, Jane" not in dom and "Poe, Edgar" not in dom
    page = _open(browser, fed, "/?q=acc-1001&status=skipped")
    dom = page.html()
    assert page.eval("document.getElementById('q').value") == "acc-1001"  # the form says so
    page.close()
    assert "Doe, Jane" in dom and "Head routine" in dom and "Thorax 1.0 lung" not in dom
    assert "1 other series of this study hidden by the filter" in dom
    page = _open(browser, fed)
    page.eval("document.getElementById('show-slices').click()")  # compact: no slice strips
    assert page.eval(
        "[...document.querySelectorAll('tr.slices-row')].every((r) => !r.offsetHeight)"
    )
    page.eval("document.getElementById('show-slices').click()")
    assert page.eval("document.querySelector('tr.slices-row').offsetHeight") > 100
    page.close()
    page = _open(browser, fed, "/?limit=1")
    assert page.eval("document.getElementById('status-line').textContent") == (
        "Studies 1\u20131 of 3, newest first"
    )
    page.eval("[...document.querySelectorAll('#pager button')].at(-1).click()")  # Next
    page.wait_for("document.getElementById('status-line').textContent.startsWith('Studies 2')")
    assert "Roe, Richard" in page.html() and "page 2 of 3" in page.html()
    assert "offset=1" in page.eval("location.search")  # the URL keeps the page for a reload
    page.close()
    first = _api(fed, "/api/studies", params={"limit": "2"}).json()
    rest = _api(fed, "/api/studies", params={"limit": "2", "offset": "2"}).json()
    assert first["total"] == rest["total"] == 3
    assert len(first["studies"]) == 2 and len(rest["studies"]) == 1
    assert _api(fed, "/api/studies", params={"limit": "201"}).status_code == 400


def test_screenshots_of_the_list_and_the_slice_viewer(
    fed: dict[str, Any], browser: Browser
) -> None:
    """Screenshots of the list and of one slice opened larger (the viewer); both are saved
    under the test's tmp dir and /tmp for a person to look at."""
    series, tmp = fed["series"], fed["tmp"]
    shot = tmp / "studies-page.png"
    page = _open(browser, fed)
    page.resize(1400, 1560)
    page.images_loaded()
    shot.write_bytes(page.screenshot())
    page.close()
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), dtype=np.float32)
    assert img.shape == (1560, 1400, 3)
    # The verdict badges are coloured: the covid orange is on the page, not only grey text.
    orange = (img[..., 0] > 200) & (img[..., 1] > 130) & (img[..., 1] < 180) & (img[..., 2] < 110)
    assert orange.sum() > 200
    shutil.copyfile(shot, "/tmp/fedscan-studies.png")

    detail = _api(fed, f"/api/series/{series['TP-001']}").json()
    pid = detail["slices"][0]["id"]
    big = _api(fed, f"/api/images/{pid}.png", params={"size": "512"})
    assert Image.open(io.BytesIO(big.content)).size == (512, 512)
    viewer = tmp / "slice-viewer.png"
    page = _open(browser, fed, f"/#slice={pid}")
    page.resize(1400, 1000)
    page.wait_for("document.getElementById('viewer').open")
    page.images_loaded()
    viewer.write_bytes(page.screenshot())
    page.close()
    view = np.asarray(Image.open(viewer).convert("L"), dtype=np.float32)
    assert view.shape == (1000, 1400)
    shutil.copyfile(viewer, "/tmp/fedscan-viewer.png")


def test_labelling_from_the_page_with_mouse_and_keyboard(
    fed: dict[str, Any], browser: Browser
) -> None:
    """In Chromium, a label without a reader's initials is refused on the page (focus goes to
    the field); a series expands to all its slices; the reader enters initials, labels a whole
    series with its button, opens a slice, steps to the next with the arrow key and labels it
    with N; both labels are stored under the reader's name (the browser's own POSTs pass the
    API's Origin check) and shown."""
    series, tmp = fed["series"], fed["tmp"]
    poe, doe = series["TP-003"], series["TP-001"]
    row = "document.querySelector('tr.series[data-series-uid=\"{}\"]')"
    page = _open(browser, fed)
    page.wait_for("document.querySelectorAll('section.study').length === 3")
    page.eval("localStorage.removeItem('fedscan.reader')")
    page.eval(f"{row.format(poe)}.querySelector('button.label.covid').click()")  # no reader yet
    assert "Enter your initials" in page.eval(
        f"{row.format(poe)}.querySelector('.msg').textContent"
    )
    assert page.eval("document.activeElement.id") == "who"
    page.eval(f"{row.format(doe)}.querySelector('button.expand').click()")
    page.wait_for(
        f"{row.format(doe)}.nextElementSibling.textContent.includes('All slices, in arrival order')"
        f" && {row.format(doe)}.nextElementSibling.querySelectorAll('figure.slice').length === 4"
    )
    page.eval(
        "(() => { const w = document.getElementById('who'); w.value = 'dr_page';"
        " w.dispatchEvent(new Event('input')); })()"
    )
    page.eval(f"{row.format(poe)}.querySelector('button.label.covid').focus()")
    page.key("Enter", "Enter", "\r")  # the keyboard, on the focused button
    page.wait_for(f"{row.format(poe)}.querySelector('.label-summary').textContent"
                  ".startsWith('covid 3')")  # fmt: skip
    # The list re-rendered: the focus is back on the same button, the outcome is said.
    assert page.eval("document.activeElement.dataset.focus") == f"{poe}:covid"
    said = page.eval(f"{row.format(poe)}.querySelector('.msg').textContent")
    assert "3 slices labelled covid by dr_page" in said
    page.eval(f"{row.format(doe)}.nextElementSibling.querySelector('button.open').click()")
    page.wait_for("document.getElementById('viewer').open")
    page.key("ArrowRight")
    page.wait_for("document.getElementById('viewer-title').textContent.includes('slice 2 of 4')")
    page.key("n", "KeyN", "n")
    page.wait_for("document.getElementById('viewer-msg').textContent.includes('by dr_page')")
    labelled_id = int(page.eval("document.getElementById('viewer').dataset.id"))
    (tmp / "viewer-labelled.png").write_bytes(page.screenshot())
    page.key("Escape")
    page.wait_for("!document.getElementById('viewer').open")
    page.close()
    poe_slices = _api(fed, f"/api/series/{poe}").json()["slices"]
    assert {(s["human_label"], s["labelled_by"]) for s in poe_slices} == {("covid", "dr_page")}
    doe_slices = {s["id"]: s for s in _api(fed, f"/api/series/{doe}").json()["slices"]}
    assert doe_slices[labelled_id]["human_label"] == "non_covid"
    assert doe_slices[labelled_id]["labelled_by"] == "dr_page"
    assert sum(1 for s in doe_slices.values() if s["human_label"]) == 1
