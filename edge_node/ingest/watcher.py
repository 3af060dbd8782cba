"""Inbox watcher: tells the pipeline when a file is complete, once per version of the file.

Completeness without fixed waits (ARCHITECTURE.md): a writer closing a file (inotify
close-write, watchdog ``FileClosedEvent``) or renaming it into the inbox hands it over at once
as *unconfirmed*: if it parses fully it is used, if not the pipeline calls ``retry`` and the
file waits for a stable size over the quiet period. Files seen only by polling (network shares,
where no close event exists) or events without a close are handed over *stable* after that
quiet period. A catch-up scan at start picks up whatever arrived while the node was down.
The inbox is only ever read: nothing here (or downstream) writes, moves or deletes in it.

Files that are not inputs (another extension, a dangling symlink, a FIFO) are not handed over
but still get a ``skipped`` row with the reason (``on_ignored``), so that every inbox file has
exactly one outcome; only hidden files and writers' temporary files (``.tmp``, ``.part``, ...)
are left out altogether, by the watcher and by `fedscan node audit` alike.

The watcher keys files by (path, size, mtime): a file whose outcome is stored is not handed
over again unless it changes. Deduplication by SOPInstanceUID happens in the pipeline, which
is the first to read the header.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from edge_node.config import WatcherConfig
from edge_node.errors import ConfigError
from edge_node.ingest.quarantine import path_tag

log = logging.getLogger(__name__)

# Same filters as `fedscan node audit` (edge_node/cli/audit.py): writer droppings and hidden
# files are not inputs.
IGNORED_PREFIXES = (".",)
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".swp", "~")

Signature = tuple[int, float]  # (size, st_mtime)

# skip reasons of inbox files that are not handed over
EXTENSION_NOT_ALLOWED = "extension_not_allowed"
DANGLING_LINK = "dangling_link"
NOT_REGULAR = "not_a_regular_file"


@dataclass(frozen=True)
class ReadyFile:
    """A file the watcher believes complete."""

    path: Path  # absolute, resolved
    size: int
    mtime: float
    stable: bool  # size was stable over the quiet period: a parse failure is final
    detected: float  # time.monotonic() when it was handed over (latency start)
    via: str  # "closed" | "moved" | "quiet" | "catchup" | "upload" | "ignored"

    @property
    def signature(self) -> Signature:
        return (self.size, self.mtime)


@dataclass
class _Pending:
    signature: Signature
    changed_at: float  # monotonic time of the last observed change


class Watcher:
    """Watches ``inbox`` recursively and calls ``sink(ReadyFile)`` for complete files."""

    def __init__(
        self,
        inbox: Path,
        config: WatcherConfig,
        sink: Callable[[ReadyFile], None],
        known: dict[str, Signature] | None = None,
    ) -> None:
        self.inbox = Path(inbox).resolve()
        self.config = config
        self._sink = sink
        self._allowed = {e.lower() for e in config.extensions}
        self._lock = threading.Lock()
        self._done: dict[str, Signature] = dict(known or {})
        self._pending: dict[str, _Pending] = {}
        self._inflight: dict[str, Signature] = {}
        self._dirty: dict[str, str] = {}  # changed while in flight -> strongest evidence seen
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self.events_active = False
        self.inbox_missing = False  # the inbox folder vanished while running (see scan)
        # Files that are not inputs get a "skipped" row through this (the daemon wires
        # Pipeline.record_ignored), so that every inbox file has exactly one outcome.
        self.on_ignored: Callable[[ReadyFile, str, str], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start events first, then the catch-up scan, so nothing falls between the two."""
        if not self.inbox.is_dir():  # never created here: the inbox belongs to the sender
            raise ConfigError(f"inbox {self.inbox} is not a folder")
        if self.config.use_events:
            self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="watcher-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.unschedule_all()  # no late events into a stopping emitter
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _start_observer(self) -> None:
        handler = _Handler(self)
        try:
            observer = Observer()
            observer.schedule(
                handler,
                str(self.inbox),
                recursive=True,
                event_filter=[
                    FileCreatedEvent,
                    FileModifiedEvent,
                    FileClosedEvent,
                    FileMovedEvent,
                    DirCreatedEvent,
                    DirMovedEvent,
                ],
            )
            observer.start()
        except OSError as exc:  # e.g. inotify watch limit reached, unsupported filesystem
            log.warning(
                "inbox events unavailable (%s); polling every %.1fs only",
                exc,
                self.config.poll_interval_s,
            )
            return
        self._observer = observer
        self.events_active = True

    # -- called by the pipeline -------------------------------------------------------------

    def finished(self, ready: ReadyFile) -> None:
        """The file's outcome is stored (or it vanished): do not hand this version over again."""
        key = str(ready.path)
        with self._lock:
            self._inflight.pop(key, None)
            self._done[key] = ready.signature
            again = self._dirty.pop(key, None)
        if again is not None:
            self._consider(ready.path, again)

    def retry(self, ready: ReadyFile) -> None:
        """An unconfirmed file did not parse: wait for a stable size, then try once more."""
        key = str(ready.path)
        with self._lock:
            self._inflight.pop(key, None)
            again = self._dirty.pop(key, None)
            if again is None:
                self._pending[key] = _Pending(ready.signature, time.monotonic())
        if again is not None:  # the writer closed it again meanwhile: try that version now
            self._consider(ready.path, again)
        self._wake.set()

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- internals ---------------------------------------------------------------------------

    def visible(self, path: Path) -> bool:
        """Inside the inbox, not hidden, not a writer's temporary file."""
        try:
            rel = path.relative_to(self.inbox)
        except ValueError:
            return False
        if any(part.startswith(IGNORED_PREFIXES) for part in rel.parts):
            return False
        return not rel.name.endswith(IGNORED_SUFFIXES)

    def accepts(self, path: Path) -> bool:
        """A candidate input: visible, with an allowed extension."""
        return self.visible(path) and Path(path.name).suffix.lower() in self._allowed

    def _ignore_dangling(self, path: Path, via: str) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            return  # gone
        if stat.S_ISLNK(st.st_mode):
            why = "symbolic link whose target does not exist"
            self._ignore(path, (st.st_size, st.st_mtime), via, DANGLING_LINK, why)

    def _ignore(self, path: Path, sig: Signature, via: str, reason: str, detail: str) -> None:
        """A file that is not handed over still gets its row (``on_ignored``), once per version."""
        if via == "modified":
            return  # still being written: its close event or the next scan records it
        key = str(path)
        with self._lock:
            if key in self._inflight or self._done.get(key) == sig:
                return
            self._pending.pop(key, None)
            if self.on_ignored is None:
                self._done[key] = sig
                return
            ready = self._take(path, sig, stable=True, via="ignored", now=time.monotonic())
        try:
            self.on_ignored(ready, reason, detail)
        except Exception:
            with self._lock:
                self._inflight.pop(key, None)  # the next scan tries again
            log.exception("outcome of an ignored file not recorded")

    def _consider(self, path: Path, via: str) -> None:
        """React to evidence that ``path`` exists/changed.

        ``via``: closed | moved (complete, try at once), catchup (scan at start: old files are
        complete), modified | scan (wait for a stable size).
        """
        if not self.visible(path):
            return  # hidden files and writer droppings are not inputs
        try:
            st = os.stat(path)
        except OSError:
            self._ignore_dangling(path, via)
            return
        if not _is_regular(st.st_mode):
            self._ignore(path, (st.st_size, st.st_mtime), via, NOT_REGULAR, "not a regular file")
            return
        if Path(path.name).suffix.lower() not in self._allowed:
            why = f"extension {Path(path.name).suffix or '(none)'!r} not in [watcher] extensions"
            self._ignore(path, (st.st_size, st.st_mtime), via, EXTENSION_NOT_ALLOWED, why)
            return
        sig: Signature = (st.st_size, st.st_mtime)
        key = str(path)
        now = time.monotonic()
        emit: ReadyFile | None = None
        with self._lock:
            if key in self._inflight:
                if via in ("closed", "moved"):
                    self._dirty[key] = via
                elif self._inflight[key] != sig:
                    self._dirty.setdefault(key, "modified")
                return
            if self._done.get(key) == sig:
                self._pending.pop(key, None)
                return
            if via in ("closed", "moved"):
                self._pending.pop(key, None)
                emit = self._take(path, sig, stable=False, via=via, now=now)
            elif via == "catchup" and time.time() - st.st_mtime >= self.config.quiet_period_s:
                # Arrived while the node was down and untouched since: no need to watch it.
                # (Periodic polls observe the size themselves: a share's mtime may be skewed.)
                self._pending.pop(key, None)
                emit = self._take(path, sig, stable=True, via=via, now=now)
            else:
                p = self._pending.get(key)
                if p is None or p.signature != sig:
                    self._pending[key] = _Pending(sig, now)
        if emit is not None:
            self._sink(emit)
        else:
            self._wake.set()

    def _take(self, path: Path, sig: Signature, *, stable: bool, via: str, now: float) -> ReadyFile:
        self._inflight[str(path)] = sig
        return ReadyFile(path, sig[0], sig[1], stable=stable, detected=now, via=via)

    def _check_pending(self) -> None:
        """Hand over pending files whose size and mtime stayed the same for the quiet period."""
        now = time.monotonic()
        with self._lock:
            keys = list(self._pending)
        ready: list[ReadyFile] = []
        for key in keys:
            try:
                st = os.stat(key)
            except OSError:
                with self._lock:
                    self._pending.pop(key, None)
                continue
            sig: Signature = (st.st_size, st.st_mtime)
            with self._lock:
                cur = self._pending.get(key)
                if cur is None:
                    continue
                if sig != cur.signature:
                    self._pending[key] = _Pending(sig, now)
                elif now - cur.changed_at >= self.config.quiet_period_s:
                    del self._pending[key]
                    if key not in self._inflight and self._done.get(key) != sig:
                        ready.append(self._take(Path(key), sig, stable=True, via="quiet", now=now))
        for r in ready:
            self._sink(r)

    def scan(self, root: Path | None = None, via: str = "scan") -> int:
        """Walk ``root`` (default the inbox) and consider every candidate; returns files seen.

        A walk of the whole inbox also forgets files that are gone, so the memory of handled
        files stays the size of the inbox. An inbox that is gone (an unmounted share) forgets
        nothing: ``inbox_missing`` is set (``/health`` shows it) until it is back.
        """
        if root is None:
            missing = not self.inbox.is_dir()
            if missing != self.inbox_missing:
                if missing:
                    log.error("inbox %s is gone (unmounted?): waiting for it", self.inbox)
                else:
                    log.info("inbox %s is back", self.inbox)
                self.inbox_missing = missing
            if missing:
                return 0
        seen: set[str] = set()
        for path in _walk(root or self.inbox):
            seen.add(str(path))
            self._consider(path, via)
        if root is None:
            with self._lock:
                for key in [k for k in self._done if k not in seen and k not in self._inflight]:
                    del self._done[key]
        return len(seen)

    def _loop(self) -> None:
        t0 = time.monotonic()
        n = self.scan(via="catchup")
        log.info(
            "catch-up scan: %d candidate files in %.0f ms (events %s)",
            n,
            (time.monotonic() - t0) * 1000,
            "on" if self.events_active else "off",
        )
        next_scan = time.monotonic() + self.config.poll_interval_s
        tick = max(0.02, min(0.25, self.config.quiet_period_s / 4))
        while not self._stop.is_set():
            with self._lock:
                has_pending = bool(self._pending)
            timeout = tick if has_pending else max(0.0, next_scan - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._check_pending()
                if time.monotonic() >= next_scan:
                    self.scan()
                    next_scan = time.monotonic() + self.config.poll_interval_s
            except Exception:  # the watcher must outlive any filesystem surprise
                log.exception("watcher poll failed; continuing")


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("watcher event handling failed; polling will catch up")

    def _dispatch(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            dest = Path(
                _str(event.dest_path if isinstance(event, DirMovedEvent) else event.src_path)
            )
            if not dest.is_relative_to(self.w.inbox):
                return
            # Files that landed before the new folder was watched (or came with it).
            for path in _walk(dest):
                self.w._consider(path, "moved" if isinstance(event, DirMovedEvent) else "scan")
        elif isinstance(event, FileClosedEvent):
            self.w._consider(Path(_str(event.src_path)), "closed")
        elif isinstance(event, FileMovedEvent):
            self.w._consider(Path(_str(event.dest_path)), "moved")
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self.w._consider(Path(_str(event.src_path)), "modified")


def _str(p: str | bytes) -> str:
    return os.fsdecode(p)


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(IGNORED_PREFIXES)]
        for name in files:
            yield Path(dirpath) / name


def inbox_relative(inbox: Path, path: Path) -> str:
    """``path`` relative to ``inbox`` for logs ([watcher] log_paths); a tag when outside it."""
    try:
        return str(Path(path).relative_to(inbox))
    except ValueError:
        return path_tag(path)


def iter_candidates(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under each of ``paths`` (a file itself, or a folder walked recursively)."""
    for p in paths:
        if p.is_dir():
            yield from sorted(_walk(p))
        else:
            yield p
