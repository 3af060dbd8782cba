"""Drive headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
no websocket library, no extra package; JSON messages separated by NUL on fds 3 (to the
browser) and 4 (from it).

    with Browser(tmp / "profile") as b:
        page = b.open("http://127.0.0.1:8765/")
        page.wait_for("document.querySelectorAll('section.study').length === 3")
        page.eval("document.querySelector('button.expand').click()")
        page.key("ArrowRight")
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
HEADLESS = [  # a quiet headless Chromium: no network of its own, no first-run work
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLAGS = [*HEADLESS, "--hide-scrollbars", "--remote-debugging-pipe"]  # driven over the pipe
SCREENSHOT_FLAGS = [*HEADLESS, "--window-size=1200,700"]  # one-shot page screenshots


# Windows virtual key codes Chromium needs for keys with a default action (Escape closes a
# modal dialog); single characters use their upper-case code.
_VIRTUAL_KEYS = {"Escape": 27, "Enter": 13, "ArrowLeft": 37, "ArrowRight": 39, "Tab": 9}


class CdpError(RuntimeError):
    """The browser answered a command with an error, or did not answer in time."""


class Browser:
    """One headless Chromium process; ``open`` gives pages (targets) on it."""

    def __init__(self, profile: Path, *, size: tuple[int, int] = (1400, 1000)) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends as fds 3 and 4
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [CHROMIUM, *FLAGS, f"--window-size={size[0]},{size[1]}"]
        cmd += [f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            cmd,
            preexec_fn=wire,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(CdpError, OSError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one command and wait for its answer (events meanwhile go to ``events``)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise CdpError("no answer from the browser in time")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise CdpError("the browser closed the pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return dict(json.loads(raw))

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        return Page(self, session["sessionId"])


class Page:
    """One tab: evaluate JS, wait for a condition, press keys, take screenshots."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def eval(self, expression: str) -> Any:
        """The value of a JS expression (promises awaited); a JS exception raises CdpError."""
        out = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in out:
            raise CdpError(f"JS error: {out['exceptionDetails']}")
        return out.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except CdpError:
                value = None  # the page may still be loading
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {expression}")

    def key(self, key: str, code: str | None = None, text: str | None = None) -> None:
        """A real key press (keyDown + keyUp) where the focus is."""
        vk = _VIRTUAL_KEYS.get(key, ord(key.upper()) if len(key) == 1 else 0)
        base = {"key": key, "code": code or key, "windowsVirtualKeyCode": vk}
        down = {"type": "keyDown", **base, **({"text": text} if text else {})}
        self.call("Input.dispatchKeyEvent", down)
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **base})

    def resize(self, width: int, height: int) -> None:
        """The viewport size (what a screenshot shows)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def html(self) -> str:
        return str(self.eval("document.documentElement.outerHTML"))

    def images_loaded(self) -> None:
        """Wait until every image in the viewport has loaded (lazy ones below it may not)."""
        self.wait_for(
            "[...document.images].every((i) => (i.complete && i.naturalWidth > 0)"
            " || !i.getAttribute('src') || i.getBoundingClientRect().top > innerHeight)"
        )

    def close(self) -> None:
        target = self.browser.call("Target.getTargetInfo", session=self.session)
        self.browser.call("Target.closeTarget", {"targetId": target["targetInfo"]["targetId"]})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
