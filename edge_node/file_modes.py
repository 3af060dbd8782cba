"""Owner-only modes for what the node writes: its state holds patient data (uploaded DICOM,
thumbnails, quarantine copies, UIDs and names in SQLite) and node.toml holds the API token.

Started by hand, a shell's umask of 022 would leave it all world-readable (and the systemd
unit's ``UMask=0027`` group-readable). So `fedscan node init` and `fedscan node run` set the
process umask to 077 first (`set_private_umask`), and the daemon tightens, at start, whatever
an earlier run or another tool left group/other-readable (`tighten_state`). The inbox is not
touched: it belongs to whoever exports into it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from edge_node.layout import StateLayout

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def set_private_umask() -> int:
    """Files and folders this process creates are owner-only; returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def tighten(path: Path, mode: int) -> bool:
    """Drop group/other bits of ``path`` down to ``mode`` (never a symlink's target);
    True when the mode changed. A path that is gone or not ours is left as it is."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o077 == 0:
            return False
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        return True
    except OSError:
        return False


def tighten_state(state_dir: Path, quarantine_dir: Path, extra_files: tuple[Path, ...]) -> int:
    """Owner-only modes on the state and quarantine folders, the SQLite files, the files in
    uploads/ and thumbnails/ and in the quarantine, and ``extra_files`` (node.toml)."""
    changed = 0
    for folder in (state_dir, quarantine_dir):
        changed += tighten(folder, PRIVATE_DIR)
    layout = StateLayout(state_dir)
    files = [*layout.database_files, *extra_files]
    for sub in layout.patient_data_dirs:
        changed += tighten(sub, PRIVATE_DIR)
        files += _files_in(sub)
    files += _files_in(quarantine_dir)
    changed += sum(tighten(f, PRIVATE_FILE) for f in files)
    if changed:
        log.warning("%d state file(s)/folder(s) were readable by others: now owner-only", changed)
    return changed


def _files_in(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()]
    except OSError:
        return []
