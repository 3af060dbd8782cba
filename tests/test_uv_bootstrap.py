"""`make bootstrap` (.ci/uv) on a machine without uv: pip first, the install script as a fallback,
one clear error line when neither works.

Each test runs the real Makefile target with a PATH that holds no uv (only /usr/bin, /bin and a
folder of stand-ins), HOME pointed at a fresh folder, and a `curl` stand-in that records its
calls. The original bug: `(curl ... | sh) || pip install uv` never reached pip, because the
pipeline's status is sh's (0) when curl cannot resolve the host.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/bin:/bin"
CURL_FAILS = """#!/bin/sh
echo "$@" >> "$HOME/curl.calls"
echo "curl: (6) Could not resolve host: astral.sh" >&2
exit 6
"""
# `curl -LsSf URL -o FILE`: write an install script that puts a working uv in ~/.local/bin.
CURL_SERVES_SCRIPT = """#!/bin/sh
echo "$@" >> "$HOME/curl.calls"
while [ $# -gt 0 ]; do
    if [ "$1" = "-o" ]; then out=$2; fi
    shift
done
cat > "$out" <<'EOS'
mkdir -p "$HOME/.local/bin"
printf '#!/bin/sh\\necho "uv 9.9.9 (from the install script)"\\n' > "$HOME/.local/bin/uv"
chmod +x "$HOME/.local/bin/uv"
EOS
"""
NO_PYTHON = """#!/bin/sh
echo "python3: stand-in without pip" >&2
exit 1
"""


def _script(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


def _make_bootstrap(
    tmp_path: Path, *, curl: str, python: Path | str, index: Path | None = None
) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    bin_dir = tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    _script(bin_dir, "curl", curl)
    if isinstance(python, Path):
        (bin_dir / "python3").symlink_to(python)
    else:
        _script(bin_dir, "python3", python)
    path = f"{bin_dir}:{SYSTEM_PATH}"
    assert shutil.which("uv", path=path) is None, "the test PATH must hold no uv"
    assert shutil.which("make", path=path), "make is needed in /usr/bin or /bin"
    env = {
        "PATH": path,
        "HOME": str(home),
        "TMPDIR": str(tmp_path),
        "PIP_NO_INDEX": "1",  # nothing from the network: pip may only use what is installed
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "LANG": "C.UTF-8",
    }
    if index is not None:
        env["PIP_FIND_LINKS"] = str(index)
    return subprocess.run(
        ["make", "-s", "bootstrap"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


_WHEEL_FILES = r"""
import importlib.metadata as m, json, sys
d = m.distribution("uv")
print(json.dumps({"version": d.version, "wheel": d.read_text("WHEEL"),
                  "files": [[str(f), str(f.locate())] for f in d.files]}))
"""


def _base_python() -> Path:
    return Path(sys.base_prefix) / "bin" / "python3"


def _repack_installed_uv(wheelhouse: Path) -> Path | None:
    """A real uv wheel rebuilt from the uv that this venv's base interpreter has installed
    (no network here): the package index pip reads in these tests."""
    probe = subprocess.run(
        [_base_python(), "-c", _WHEEL_FILES], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        return None
    doc = json.loads(probe.stdout)
    version = doc["version"]
    tag = next(
        line.split(": ", 1)[1] for line in doc["wheel"].splitlines() if line.startswith("Tag:")
    )
    dist_info = f"uv-{version}.dist-info"
    wheel = wheelhouse / f"uv-{version}-{tag}.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for rel, located in doc["files"]:
            name = Path(rel).name
            if "__pycache__" in rel or name in ("INSTALLER", "REQUESTED", "RECORD"):
                continue
            arc = f"uv-{version}.data/scripts/{name}" if rel.startswith("../") else rel
            data = Path(located).read_bytes()
            info = zipfile.ZipInfo(arc)
            info.external_attr = Path(located).stat().st_mode << 16  # S_IFREG + x: pip keeps +x
            zf.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{arc},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    if _repack_installed_uv(folder) is None:
        pytest.skip(f"{_base_python()} has no uv installed to build a wheel from (no network)")
    return folder


def test_pip_installs_uv_from_the_index_first(tmp_path: Path, wheelhouse: Path) -> None:
    """No uv anywhere, curl cannot resolve the host, the distribution's Python is externally
    managed (PEP 668): pip installs uv from the package index into ~/.local/bin (not on PATH),
    curl is never called, and `make bootstrap` runs that uv."""
    system = Path("/usr/bin/python3")
    probe = subprocess.run([system, "-m", "pip", "--version"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("/usr/bin/python3 with pip is needed for this scenario")
    if subprocess.run([system, "-s", "-m", "uv", "--version"], capture_output=True).returncode == 0:
        pytest.skip("/usr/bin/python3 already has uv installed")
    result = _make_bootstrap(tmp_path, curl=CURL_FAILS, python=system, index=wheelhouse)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("uv "), result.stdout
    assert "installing it from the package index" in result.stderr
    assert (tmp_path / "home" / ".local" / "bin" / "uv").is_file()
    assert f"using {tmp_path}/home/.local/bin/uv" in result.stderr
    assert not (tmp_path / "home" / "curl.calls").exists()  # the fallback was not needed


def test_uv_as_a_module_of_python3_is_used_as_it_is(tmp_path: Path) -> None:
    """uv installed with pip into python3 itself (pyenv, a virtualenv) but not on PATH:
    `python3 -m uv` runs it; nothing is installed, curl is not called."""
    python = _base_python()
    if subprocess.run([python, "-s", "-m", "uv", "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"{python} has no uv package")
    result = _make_bootstrap(tmp_path, curl=CURL_FAILS, python=python)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("uv "), result.stdout
    assert result.stderr == ""
    assert not (tmp_path / "home" / "curl.calls").exists()


def test_the_install_script_is_the_fallback_when_pip_fails(tmp_path: Path) -> None:
    """pip is missing: the install script is fetched to a file, run, and the uv it put in
    ~/.local/bin (not on PATH) is found and used."""
    result = _make_bootstrap(tmp_path, curl=CURL_SERVES_SCRIPT, python=NO_PYTHON)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "uv 9.9.9 (from the install script)"
    assert "trying the install script" in result.stderr
    calls = (tmp_path / "home" / "curl.calls").read_text()
    assert "https://astral.sh/uv/install.sh" in calls


def test_neither_works_one_clear_error_line(tmp_path: Path) -> None:
    """No pip and no network: make fails with one line saying what was tried, not with
    `~/.local/bin/uv: No such file or directory`."""
    result = _make_bootstrap(tmp_path, curl=CURL_FAILS, python=NO_PYTHON)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "uv is missing and could not be installed" in errors[0]
    assert "pip install uv" in errors[0] and "install script" in errors[0]
    assert "No such file or directory" not in result.stderr
    log = errors[0].split("details: ")[1].split(")")[0]
    assert "Could not resolve host" in Path(log).read_text()  # the cause is kept for the reader
    assert os.path.exists(tmp_path / "home" / "curl.calls")
