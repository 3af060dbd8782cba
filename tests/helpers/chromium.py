"""Headless Chromium for the page tests: the binary and its flags."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"


FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,700",
]
