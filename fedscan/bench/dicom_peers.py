"""Outside DICOM peers for the DICOM benchmark and tests: DCMTK ``storescp`` (a real PACS
stand-in from Debian) and a recording pynetdicom C-STORE SCP whose answers can be scripted.

    with DcmtkStoreScp(folder) as pacs:        # files land in folder, as storescp names them
        ...  pacs.port, pacs.ae_title
    with RecordingScp(statuses=[0xA700]) as pacs:  # first C-STORE answered A700, then success
        ...  pacs.received -> [(sop_instance_uid, transfer_syntax, arrival time)]
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(tool: str) -> str:
    """The DCMTK binary ``tool``: pynetdicom installs Python apps of the same names
    (``echoscu``, ``storescu``, ...) into the virtual environment, so that folder is skipped."""
    venv_bin = str(Path(sys.prefix) / "bin")
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != venv_bin]
    found = shutil.which(tool, path=os.pathsep.join([*dirs, "/usr/bin", "/usr/local/bin"]))
    if found is None:
        raise FileNotFoundError(f"DCMTK {tool} not found (apt-get install dcmtk)")
    return found


def dcmtk_available() -> bool:
    try:
        return all(dcmtk(b) for b in ("storescp", "storescu", "echoscu"))
    except FileNotFoundError:
        return False


def echo(port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout: float = 5.0) -> bool:
    """DCMTK ``echoscu``: True when the SCP on ``port`` answers C-ECHO."""
    cmd = [dcmtk("echoscu"), "-to", str(int(timeout)), "-aet", calling_ae, "-aec", called_ae]
    result = subprocess.run(
        [*cmd, "127.0.0.1", str(port)], capture_output=True, timeout=timeout + 5
    )
    return result.returncode == 0


class DcmtkStoreScp:
    """``storescp`` on a free loopback port writing what it receives into ``folder``."""

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "PACS",
        port: int | None = None,
        pdu: int = 131072,
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.pdu = pdu
        self.env = env or {}  # extra environment (DCMTK reads TCP_NODELAY, TCP_BUFFER_LENGTH)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DcmtkStoreScp:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "-pm", "+xa"]
        cmd += ["--max-pdu", str(self.pdu), str(self.port)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **self.env}
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"storescp exited {self.proc.returncode}: {err}")
            if echo(self.port, self.ae_title, timeout=2):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("storescp did not answer C-ECHO within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def __enter__(self) -> DcmtkStoreScp:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RecordingScp:
    """A pynetdicom C-STORE SCP that records (SOP Instance UID, transfer syntax, time) and
    answers each C-STORE with the next of ``statuses`` (then success)."""

    def __init__(
        self,
        *,
        ae_title: str = "PACS",
        port: int | None = None,
        statuses: list[int] | None = None,
        folder: Path | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.statuses = list(statuses or [])
        self.folder = folder
        self.received: list[tuple[str, str, float]] = []
        self.sop_classes: list[str] = []  # SOP Class UID of each received object, same order
        self.answers: list[int] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            self.answers.append(status)
            if status == 0x0000:
                self.received.append(
                    (str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), time.time())
                )
                self.sop_classes.append(str(ds.SOPClassUID))
                if self.folder is not None:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    (self.folder / f"{len(self.received):05d}.dcm").write_bytes(data)
        return status

    def start(self) -> RecordingScp:
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        ae.require_called_aet = True  # a PACS refuses calls to another AE title
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> RecordingScp:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
