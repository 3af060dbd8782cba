"""Run a real `fedscan node run` subprocess on a folder made by `fedscan node init`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from edge_node.cli.daemon import init_node
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]


class NodeProcess:
    """`fedscan node run --config DIR/node.toml --api-port 0` with its log in DIR/node.log."""

    def __init__(
        self,
        folder: Path,
        *,
        extra_toml: str = "",
        model: Path | None = None,
        chest_only: bool = False,
    ) -> None:
        self.folder = folder
        if not (folder / "node.toml").exists():
            toml = init_node(folder)
            text = toml.read_text().replace("intra_op_threads = 2", "intra_op_threads = 1")
            if not chest_only and "[series]" not in extra_toml:
                # Most tests feed the real head CT slice 693_UNCR as "a CT slice"; the node's
                # default chest-only filter would skip it (tests/edge_node/series test that).
                extra_toml += "\n[series]\nchest_only = false\n"
            toml.write_text(text + extra_toml)
        self.toml = folder / "node.toml"
        self.inbox = folder / "inbox"
        self.db = folder / "state" / "node.sqlite"
        self.log = folder / "node.log"
        self.model = model
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> NodeProcess:
        port_file = self.folder / "state" / "api.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fedscan.cli", "node", "run", "--config", str(self.toml)]
        cmd += ["--api-port", "0"] + (["--model", str(self.model)] if self.model else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        proc = self.proc
        try:
            wait_for(lambda: port_file.exists() or proc.poll() is not None, 60, "api.port")
            if proc.poll() is not None:
                raise AssertionError(f"node exited {proc.returncode}:\n{self.log.read_text()}")
            self.port = int(port_file.read_text())
            wait_for(lambda: self.health().get("status") == "ok", 60, "model loaded")
        except BaseException:
            # a start that fails must not leave a daemon running after the test
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            raise
        return self

    def health(self) -> dict[str, Any]:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()
        except httpx.HTTPError:
            return {}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []  # tables not created yet
        finally:
            con.close()

    def outcome(self, path: Path) -> tuple[str, str | None] | None:
        rows = self.query(
            "SELECT outcome, reason FROM files WHERE path = ?", (str(path.resolve()),)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def n_predictions(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM predictions")[0][0]) if self.db.exists() else 0
