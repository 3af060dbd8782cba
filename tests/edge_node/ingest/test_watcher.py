"""Watcher on a real folder: inotify close/move events, quiet-period fallback, catch-up scan."""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_node.config import WatcherConfig
from edge_node.ingest.watcher import ReadyFile, Watcher

WAIT = 10.0  # generous: the machine is shared; nothing here asserts timing


class Sink:
    def __init__(self) -> None:
        self.q: queue.Queue[ReadyFile] = queue.Queue()

    def __call__(self, r: ReadyFile) -> None:
        self.q.put(r)

    def get(self, timeout: float = WAIT) -> ReadyFile:
        return self.q.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            r = self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        pytest.fail(f"unexpected hand-over: {r}")


def _start(inbox: Path, sink: Sink, known: dict | None = None, **cfg: object) -> Watcher:
    config = WatcherConfig(**{"quiet_period_s": 0.3, "poll_interval_s": 0.5, **cfg})  # type: ignore[arg-type]
    w = Watcher(inbox, config, sink, known=known)
    w.start()
    return w


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    p = tmp_path / "inbox"
    p.mkdir()
    return p


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def watcher(inbox: Path, sink: Sink) -> Iterator[Watcher]:
    w = _start(inbox, sink)
    yield w
    w.stop()


def test_closed_file_is_handed_over_at_once_unconfirmed(
    inbox: Path, sink: Sink, watcher: Watcher
) -> None:
    """A writer closing a file is the completeness signal; the parse confirms it downstream."""
    assert watcher.events_active
    (inbox / "a.dcm").write_bytes(b"x" * 1000)
    r = sink.get()
    assert r.path == (inbox / "a.dcm").resolve()
    assert (r.via, r.stable, r.size) == ("closed", False, 1000)
    watcher.finished(r)
    sink.none_within(1.0)  # neither the modify events nor the poll hand it over again


def test_file_kept_open_waits_for_the_quiet_period(
    inbox: Path, sink: Sink, watcher: Watcher
) -> None:
    """No close event: the file is handed over (stable) once its size stops changing."""
    with open(inbox / "slow.dcm", "wb") as f:
        f.write(b"a" * 100)
        f.flush()
        sink.none_within(0.1)
        f.write(b"b" * 100)
        f.flush()
        r = sink.get()
        assert (r.via, r.stable, r.size) == ("quiet", True, 200)
        watcher.finished(r)


def test_retry_waits_for_a_stable_size_then_hands_over_stable(
    inbox: Path, sink: Sink, watcher: Watcher
) -> None:
    (inbox / "half.dcm").write_bytes(b"h" * 10)
    first = sink.get()
    assert not first.stable
    watcher.retry(first)  # did not parse: maybe the writer comes back
    second = sink.get()
    assert (second.via, second.stable) == ("quiet", True)
    watcher.finished(second)


def test_changed_file_is_handed_over_again(inbox: Path, sink: Sink, watcher: Watcher) -> None:
    (inbox / "c.dcm").write_bytes(b"1" * 10)
    r = sink.get()
    watcher.finished(r)
    with open(inbox / "c.dcm", "ab") as f:
        f.write(b"2" * 10)
    again = sink.get()
    assert again.size == 20


def test_change_during_processing_is_not_lost(inbox: Path, sink: Sink, watcher: Watcher) -> None:
    (inbox / "d.dcm").write_bytes(b"1" * 10)
    r = sink.get()
    (inbox / "d.dcm").write_bytes(b"2" * 30)  # rewritten while the pipeline holds version 1
    sink.none_within(0.3)  # not handed over twice at the same time
    watcher.finished(r)
    again = sink.get()
    assert again.size == 30


def test_renamed_into_inbox_and_recursive_folders(inbox: Path, sink: Sink, tmp_path: Path) -> None:
    """A rename inside the inbox (hidden temp name -> final name) counts as complete; a file
    moved in from elsewhere looks like a creation to inotify and waits for the quiet period;
    new subfolders (labelled/covid/...) are watched."""
    watcher = _start(inbox, sink, poll_interval_s=60.0)  # events only: no race with the poll
    try:
        _renames_and_folders(inbox, sink, tmp_path)
    finally:
        watcher.stop()


def _renames_and_folders(inbox: Path, sink: Sink, tmp_path: Path) -> None:
    staged = inbox / ".staging.dcm"
    staged.write_bytes(b"m" * 64)
    sink.none_within(0.5)  # hidden: ignored
    os.rename(staged, inbox / "moved.dcm")
    r = sink.get()
    assert (r.path.name, r.via, r.stable) == ("moved.dcm", "moved", False)
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"o" * 64)
    os.rename(outside, inbox / "from_outside.dcm")
    r = sink.get()
    assert (r.path.name, r.via, r.stable) == ("from_outside.dcm", "quiet", True)
    deep = inbox / "labelled" / "covid" / "p1"
    deep.mkdir(parents=True)
    (deep / "s1.dcm").write_bytes(b"s" * 32)
    r2 = sink.get()
    assert r2.path == (deep / "s1.dcm").resolve()


def test_filters_ignore_droppings_hidden_and_other_extensions(
    inbox: Path, sink: Sink, watcher: Watcher
) -> None:
    for name in ("x.tmp", "y.part", ".hidden.dcm", "notes.txt", "z.dcm~"):
        (inbox / name).write_bytes(b"junk")
    (inbox / ".cache").mkdir()
    (inbox / ".cache" / "in_hidden_dir.dcm").write_bytes(b"junk")
    (inbox / "IMG0001").write_bytes(b"no suffix")  # allowed: "" is in the default extensions
    (inbox / "upper.DCM").write_bytes(b"upper")
    names = {sink.get().path.name, sink.get().path.name}
    assert names == {"IMG0001", "upper.DCM"}
    sink.none_within(1.0)


def test_catch_up_scan_at_start(inbox: Path, sink: Sink) -> None:
    """Files that arrived while the node was down are handed over; known ones are not."""
    old = time.time() - 3600
    for name in ("done.dcm", "changed.dcm", "new.dcm"):
        (inbox / name).write_bytes(b"o" * 50)
        os.utime(inbox / name, (old, old))
    fresh = inbox / "being_written.dcm"
    fresh.write_bytes(b"f" * 5)  # mtime now: might still be written, waits for the quiet period
    known = {
        str((inbox / "done.dcm").resolve()): (50, os.stat(inbox / "done.dcm").st_mtime),
        str((inbox / "changed.dcm").resolve()): (49, old),
    }
    w = _start(inbox, sink, known=known)
    try:
        got = {}
        for _ in range(3):
            r = sink.get()
            got[r.path.name] = r
        assert set(got) == {"changed.dcm", "new.dcm", "being_written.dcm"}
        assert got["new.dcm"].via == "catchup" and got["new.dcm"].stable
        assert got["being_written.dcm"].via == "quiet"
        sink.none_within(1.0)
    finally:
        w.stop()


def test_polling_only_for_shares_without_events(inbox: Path, sink: Sink) -> None:
    w = _start(inbox, sink, use_events=False)
    try:
        assert not w.events_active
        (inbox / "share.dcm").write_bytes(b"p" * 10)
        r = sink.get()
        assert (r.via, r.stable) == ("quiet", True)
        w.finished(r)
        sink.none_within(1.2)
    finally:
        w.stop()


def test_deleted_files_are_forgotten_and_a_new_file_at_the_same_path_is_seen(
    inbox: Path, sink: Sink, watcher: Watcher
) -> None:
    (inbox / "e.dcm").write_bytes(b"1" * 10)
    r = sink.get()
    watcher.finished(r)
    (inbox / "e.dcm").unlink()
    wait = time.monotonic() + WAIT
    while str(r.path) in watcher._done and time.monotonic() < wait:
        time.sleep(0.05)
    assert str(r.path) not in watcher._done  # pruned by the periodic scan
    (inbox / "e.dcm").write_bytes(b"1" * 10)
    assert sink.get().path == r.path
