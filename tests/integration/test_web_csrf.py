"""CSRF and DNS rebinding against a real `fedscan node run`, from headless Chromium (issues 10
and 14): a page on another origin tries every way a browser lets it write to the node (simple
fetch, fetch with JSON, an auto-submitted form, a DICOM upload), and a page under a rebound
name tries to read the predictions. Nothing is stored, nothing is read; the node's own page
still labels a slice with its button (clicked through the DevTools protocol)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.cdp import CHROMIUM
from tests.helpers.cdp import SCREENSHOT_FLAGS as FLAGS
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration

ATTACK = """<!doctype html><html><body><pre id="log">start</pre>
<form id="form" method="POST" action="{node}/api/labels" enctype="text/plain" target="sink">
<input name='{{"sop_instance_uid":"{uid}","label":"covid","who":"evil","x":"' value='"}}'>
</form><iframe name="sink"></iframe>
<script>
const log = (m) => {{ document.getElementById("log").textContent += "\\n" + m; }};
const img = new Image();
img.onload = () => log("img loaded");
img.onerror = () => log("img refused");
img.src = "{node}/api/thumbnails/{pred_id}.png";
const body = JSON.stringify({{sop_instance_uid: "{uid}", label: "covid", who: "evil"}});
(async () => {{
  try {{ await fetch("{node}/api/labels", {{method: "POST", mode: "no-cors",
      headers: {{"Content-Type": "text/plain"}}, body}}); log("simple sent"); }}
  catch (e) {{ log("simple error " + e); }}
  try {{ const r = await fetch("{node}/api/labels", {{method: "POST",
      headers: {{"Content-Type": "application/json"}}, body}}); log("json status " + r.status); }}
  catch (e) {{ log("json blocked"); }}
  try {{ const dicom = await (await fetch("/upload.dcm")).arrayBuffer();
      await fetch("{node}/api/predict", {{method: "POST", mode: "no-cors", body: dicom}});
      log("upload sent"); }}
  catch (e) {{ log("upload error " + e); }}
  try {{ const r = await fetch("{node}/api/predictions");
      log("read " + (await r.text())); }}
  catch (e) {{ log("read blocked"); }}
  document.getElementById("form").submit();
  log("form submitted");
}})();
</script></body></html>
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, str]]:
    """One node with one predicted slice (its UID) for both tests; the attack runs first and
    must leave it unlabelled."""
    n = NodeProcess(tmp_path_factory.mktemp("csrf") / "node")
    make_classifier(n.folder / "models" / "current.onnx", version="3")
    n.start()
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), n.inbox / "a.dcm")
    wait_for(lambda: n.n_predictions() >= 1, what="a prediction")
    yield n, uid
    try:
        assert n.terminate() == 0
    finally:
        n.kill()


@contextlib.contextmanager
def _attacker(pages: dict[str, bytes]) -> Iterator[int]:
    """A second web server (the attacker's origin) serving ``pages`` on a free port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path.split("?")[0])
            self.send_response(200 if body is not None else 404)
            html = self.path.endswith(".html")
            self.send_header("Content-Type", "text/html" if html else "application/octet-stream")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _chromium(tmp: Path, *args: str) -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=True).stdout.decode()


def test_other_origin_and_rebound_name_cannot_touch_the_node(
    served: tuple[NodeProcess, str], tmp_path: Path
) -> None:
    """From http://127.0.0.1:<other port>: a text/plain fetch, a JSON fetch (preflight), a
    DICOM upload and a text/plain form POST reach nothing (no label, no upload, no new
    prediction), the page cannot read predictions, and an <img> of an existing thumbnail
    does not load (no probing which ids exist); a page at a name mapped to 127.0.0.1
    (DNS rebinding, --host-resolver-rules) gets 400 and no UID."""
    node, uid = served
    upload = tmp_path / "up.dcm"
    copy_with_new_uid(sample_path("693_UNCR.dcm"), upload)
    node_url = f"http://127.0.0.1:{node.port}"
    pred_id = node.query("SELECT id FROM predictions LIMIT 1")[0][0]
    assert httpx.get(f"{node_url}/api/thumbnails/{pred_id}.png", timeout=30).status_code == 200
    page = ATTACK.format(node=node_url, uid=uid, pred_id=pred_id).encode()
    with _attacker({"/attack.html": page, "/upload.dcm": upload.read_bytes()}) as port:
        attack = f"http://127.0.0.1:{port}/attack.html"
        dom = _chromium(tmp_path, "--virtual-time-budget=8000", "--dump-dom", attack)
    log = dom.split('<pre id="log">', 1)[1].split("</pre>", 1)[0].splitlines()
    for line in ("simple sent", "json blocked", "upload sent", "read blocked", "img refused"):
        assert line in log, (line, log)
    assert "form submitted" in log and not [x for x in log if x.startswith("read {")], log
    time.sleep(1.0)  # let anything that did get through finish
    assert node.query("SELECT COUNT(*) FROM labels") in ([], [(0,)])
    assert node.n_predictions() == 1
    uploads = node.folder / "state" / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []

    rebound = _chromium(
        tmp_path,
        "--host-resolver-rules=MAP attacker.example 127.0.0.1",
        "--dump-dom",
        f"http://attacker.example:{node.port}/api/predictions",
    )
    assert uid not in rebound and "Host header" in rebound, rebound


def _cdp(ws_url: str) -> Any:
    from websockets.sync.client import connect

    return connect(ws_url, max_size=None, open_timeout=30)


def test_node_page_label_button_still_works(
    served: tuple[NodeProcess, str], tmp_path: Path
) -> None:
    """The node's own /slices page, clicked in Chromium: its covid button sends a same-origin
    JSON POST that the guard accepts, and the label is stored (who = web)."""
    pytest.importorskip("websockets")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    node, uid = served
    debug_port = _free_port()
    cmd = [
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--remote-debugging-port={debug_port}",
        f"http://127.0.0.1:{node.port}/slices",
    ]
    browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets: list[dict[str, Any]] = []

        def page_target() -> bool:
            nonlocal targets
            try:
                r = httpx.get(f"http://127.0.0.1:{debug_port}/json", timeout=2)
                targets = [t for t in r.json() if t.get("type") == "page"]
            except (httpx.HTTPError, ValueError):
                return False
            return any("/slices" in t.get("url", "") for t in targets)

        wait_for(page_target, 60, "the page in Chromium")
        target = next(t for t in targets if "/slices" in t["url"])
        with _cdp(target["webSocketDebuggerUrl"]) as ws:
            script = """new Promise((done) => {
                const t0 = Date.now();
                const poll = setInterval(() => {
                    const b = document.querySelector("tr[data-uid] button.label.covid");
                    if (!b) {
                        if (Date.now() - t0 > 15000) { clearInterval(poll); done("no button"); }
                        return;
                    }
                    clearInterval(poll);
                    b.click();
                    const cell = b.closest("tr").querySelector("td.human");
                    const wait = setInterval(() => {
                        if (cell.textContent === "covid" || cell.textContent.startsWith("error")) {
                            clearInterval(wait);
                            done(cell.textContent);
                        }
                    }, 50);
                }, 100);
            })"""
            reply: dict[str, Any] = {}
            for attempt in range(1, 6):  # the first load may still be navigating: retry
                ws.send(
                    json.dumps(
                        {
                            "id": attempt,
                            "method": "Runtime.evaluate",
                            "params": {"expression": script, "awaitPromise": True},
                        }
                    )
                )
                while reply.get("id") != attempt:
                    reply = json.loads(ws.recv(timeout=30))
                if "result" in reply:
                    break
                time.sleep(0.5)
        shown = reply.get("result", {}).get("result", {}).get("value")
        assert shown == "covid", reply
        rows = node.query(
            "SELECT label, who, source FROM labels WHERE sop_instance_uid = ?", (uid,)
        )
        assert rows == [("covid", "web", "api")]
    finally:
        browser.kill()
        browser.wait(10)
