"""The node's all-slices page (/slices) in headless Chromium, against a real `fedscan node run`
process (the studies page at / is tested in test_page_studies.py)."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.cdp import CHROMIUM
from tests.helpers.cdp import SCREENSHOT_FLAGS as FLAGS
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "node")
    make_classifier(n.folder / "models" / "current.onnx", version="3")
    n.start()
    yield n
    try:
        assert n.terminate() == 0
    finally:
        n.kill()


def _chromium(url: str, tmp: Path, *extra: str) -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *extra, url]
    out = subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    return out.stdout.decode()


def test_page_lists_predictions_with_thumbnails(node: NodeProcess, tmp_path: Path) -> None:
    uids = [
        copy_with_new_uid(sample_path(name), node.inbox / f"slice{i}.dcm")
        for i, name in enumerate(("693_UNCR.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm"))
    ]
    wait_for(lambda: node.n_predictions() >= 4, what="4 predictions")
    url = f"http://127.0.0.1:{node.port}/slices"
    dom = _chromium(url, tmp_path, "--dump-dom")
    for uid in uids:
        assert f'data-uid="{uid}"' in dom
    assert dom.count("<tr data-id=") == 4  # the two-frame Enhanced CT gives two rows
    assert dom.count('data-label="covid"') == 4 and dom.count('data-label="non_covid"') == 4
    assert 'class="thumb"' in dom and '<strong id="model">3</strong>' in dom
    for name in ("slice0.dcm", "slice1.dcm", "slice2.dcm [frame 1]"):
        assert name in dom

    shot = tmp_path / "fedscan-page.png"
    _chromium(url, tmp_path, f"--screenshot={shot}")
    shutil.copyfile(shot, "/tmp/fedscan-page.png")  # for a person to look at
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float32)
    assert img.shape == (700, 1200)
    # The thumbnails are real CT images: the slice column has dark and bright pixels.
    column = img[120:600, 30:135]
    assert column.min() < 40 and column.max() > 200
