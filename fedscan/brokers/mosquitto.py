"""Start a real Mosquitto process on a free loopback port, with a given config.

Usage::

    with Mosquitto(tmp_path, config=Path("broker_config/dev.conf")) as broker:
        client.connect("127.0.0.1", broker.port)

The config file is copied and a ``listener`` line for the chosen port is appended unless
``listener_block`` is given (TLS configs pass their own listener block with ``{port}``).
Used by the integration tests and by ``fedscan bench federation``. Without the binary the
constructor raises :class:`MosquittoNotFound` (the test suite turns it into a skip, the
benchmark into a skipped part).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from types import TracebackType

from fedscan.errors import BenchError

DEV_CONFIG = Path(str(resources.files("broker_config") / "dev.conf"))


class MosquittoNotFound(BenchError):
    """No mosquitto binary where it was looked for."""


def mosquitto_binary(override: str | None = None) -> str | None:
    """``override`` when it is a file, else mosquitto on PATH or in /usr/sbin, else None."""
    if override:
        return override if Path(override).is_file() else None
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


def require_mosquitto(override: str | None = None) -> str:
    binary = mosquitto_binary(override)
    if binary is None:
        where = override or "PATH and /usr/sbin"
        raise MosquittoNotFound(
            f"mosquitto not found ({where}): apt-get install mosquitto (.ci/run does this)"
        )
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A Mosquitto child process; ``stop()`` / ``start()`` again keep the same port."""

    def __init__(
        self,
        workdir: Path,
        config: Path | None = None,
        listener_block: str | None = None,
        port: int | None = None,
        extra: str = "",
        binary: str | None = None,
    ) -> None:
        self.binary = require_mosquitto(binary)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        base = (config or DEV_CONFIG).read_text()
        listener = (
            listener_block.format(port=self.port)
            if listener_block
            else f"listener {self.port} 127.0.0.1\n"
        )
        self.conf_path = self.workdir / f"mosquitto-{self.port}.conf"
        self.conf_path.write_text(base + "\n" + listener + "\n" + extra + "\n")
        self.log_path = self.workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
