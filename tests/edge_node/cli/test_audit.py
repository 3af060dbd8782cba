"""`fedscan node audit`: the inbox compared with the node's recorded outcomes.

A real node (the daemon in-process: watcher, preprocessing, onnxruntime, SQLite) handles real
CT, a two-frame Enhanced CT, an MR slice and garbage, and the audit counts each file once by
its outcome. Then the audit's own rules: the watcher's filters, symlinks, files rewritten after
their outcome, `--wait` while a node catches up, `--strict`, a missing inbox, and reading the
state while a writer holds a transaction.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from edge_node.cli.audit import audit, audit_until_complete, inbox_files
from edge_node.cli.daemon import init_node
from edge_node.config import NodeConfig, load_config
from edge_node.errors import ConfigError
from edge_node.store import FileRecord, Store
from fedscan.cli import main
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path, write_ct, write_garbage
from tests.helpers.onnx_models import make_classifier


def _node(tmp_path: Path) -> NodeConfig:
    toml = init_node(tmp_path / "node")
    toml.write_text(
        toml.read_text()
        .replace("intra_op_threads = 2", "intra_op_threads = 1")
        .replace("[api]\n", "[api]\nenabled = false\n")
    )
    # chest_only off: the real head CT slice 693_UNCR stands for "a CT slice" here
    return load_config(toml, {"series": {"chest_only": False}})


def _record(cfg: NodeConfig, path: Path, outcome: str, **kw: object) -> None:
    st = path.stat()
    store = Store(cfg.paths.database)
    try:
        store.record_file(
            FileRecord(
                str(kw.pop("as_path", path.resolve())),
                int(kw.pop("size", st.st_size)),  # type: ignore[call-overload]
                float(kw.pop("mtime", st.st_mtime)),  # type: ignore[arg-type]
                None,
                outcome,
                "test: recorded by hand" if outcome != "predicted" else None,
            )
        )
    finally:
        store.close()


def _cli(cfg: NodeConfig, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["node", "audit", "--config", str(cfg.source), *extra])
    return code, out.getvalue()


def test_a_real_node_records_one_outcome_per_file_and_the_audit_counts_them(
    tmp_path: Path,
) -> None:
    """Real files through the real daemon: 2 predicted (one of them two frames, counted once),
    one MR skipped, one garbage file quarantined; then nothing is missing."""
    from edge_node.daemon import Daemon

    cfg = _node(tmp_path)
    make_classifier(cfg.model_path, version="1")
    inbox = cfg.paths.inbox
    copy_with_new_uid(sample_path("693_UNCR.dcm"), inbox / "a" / "ct.dcm")
    copy_with_new_uid(sample_path("eCT_Supplemental.dcm"), inbox / "a" / "ect.dcm")
    write_ct(inbox / "b" / "mr.dcm", rows=32, cols=32, modality="MR")
    write_garbage(inbox / "b" / "junk.dcm")
    before = audit(cfg)
    assert before.files_seen == 4 and len(before.missing) == 4
    daemon = Daemon(cfg)
    daemon.start()
    try:
        report = audit_until_complete(cfg, 60, poll_s=0.1)
    finally:
        daemon.stop()
        daemon.shutdown(30)
    assert report.complete, report
    assert (report.files_seen, report.predicted, report.skipped, report.quarantined) == (
        4,
        2,
        1,
        1,
    )
    code, out = _cli(cfg, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc == {
        "files_seen": 4,
        "predicted": 2,
        "skipped": 1,
        "quarantined": 1,
        "missing": [],
    }
    # predictions: 1 + 2 frames, the multi-frame file is one file in the audit
    con = sqlite3.connect(cfg.paths.database)
    try:
        assert con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 3
    finally:
        con.close()


def test_candidates_follow_the_watcher_filters(tmp_path: Path) -> None:
    """Hidden files and folders and writer droppings are not inputs; every other file counts,
    whatever its extension (the node records the ones it ignores as skipped), and so does a
    dangling symlink; folders are not files."""
    inbox = tmp_path / "inbox"
    keep = ["a.dcm", "b.DCM", "c.ima", "d.dicom", "NOSUFFIX", "sub/e.dcm", "notes.txt"]
    drop = ["x.dcm.tmp", "y.part", ".hidden.dcm", ".cache/z.dcm", "f.dcm~"]
    for rel in keep + drop:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
    (inbox / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (inbox / "dir.dcm").mkdir()
    found = inbox_files(inbox)
    names = sorted(str(p.relative_to(inbox.resolve())) for p in found)
    assert names == sorted([*keep, "dangling.dcm"])


def test_ignored_files_and_dangling_links_get_one_skipped_row_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real node on an inbox with a CT slice, a text file the allow-list ignores, a dangling
    symlink and a FIFO: each gets exactly one row (the three skipped with their reason), the
    audit is complete, a restart records nothing twice, and every outcome is logged at INFO
    naming the file (by its inbox-relative path with [watcher] log_paths on)."""
    import logging

    from edge_node.daemon import Daemon

    cfg = _node(tmp_path)
    toml = Path(str(cfg.source))
    toml.write_text(toml.read_text().replace("[watcher]\n", "[watcher]\nlog_paths = true\n"))
    cfg = load_config(toml)
    make_classifier(cfg.model_path, version="1")
    inbox = cfg.paths.inbox
    copy_with_new_uid(sample_path("693_UNCR.dcm"), inbox / "ct" / "slice.dcm")
    (inbox / "ct" / "notes.txt").write_text("not an image\n")
    (inbox / "ct" / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    os.mkfifo(inbox / "ct" / "pipe.dcm")
    assert audit(cfg).files_seen == 4
    expect = {
        "notes.txt": ("skipped", "extension_not_allowed"),
        "gone.dcm": ("skipped", "dangling_link"),
        "pipe.dcm": ("skipped", "not_a_regular_file"),
    }
    for _run in range(2):  # the second start finds every row and records nothing again
        with caplog.at_level(logging.INFO, logger="edge_node"):
            daemon = Daemon(cfg)
            daemon.start()
            try:
                report = audit_until_complete(cfg, 60, poll_s=0.1)
            finally:
                daemon.stop()
                daemon.shutdown(30)
        assert report.complete and report.files_seen == 4 and report.skipped >= 3
        con = sqlite3.connect(cfg.paths.database)
        try:
            rows = con.execute("SELECT path, outcome, reason, updated_at FROM files").fetchall()
        finally:
            con.close()
        got = {Path(p).name: (o, r.split(":")[0] if r else None) for p, o, r, _u in rows}
        assert got.pop("slice.dcm")[0] in ("predicted", "skipped")  # [series] chest_only
        assert got == expect and len(rows) == 4
        if _run == 0:
            first_rows = rows
            logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            for name, outcome in [*((n, o) for n, (o, _r) in expect.items()), ("slice.dcm", "")]:
                line = f"file {os.path.join('ct', name)} {outcome}"
                assert any(m.startswith(line) for m in logged), (line, logged)
            caplog.clear()
    assert sorted(rows) == sorted(first_rows)  # not even updated_at moved
    from edge_node.ingest.quarantine import path_tag

    tag = path_tag(inbox.resolve() / "ct" / "notes.txt")  # as a log line without log_paths
    code, out = _cli(cfg, "--which", tag)
    assert code == 0 and out.startswith(f"{os.path.join('ct', 'notes.txt')}: skipped (")
    assert _cli(cfg, "--which", "0123456789")[0] == 9


def test_missing_lists_unrecorded_and_rewritten_files(tmp_path: Path) -> None:
    """A file with no row is missing; so is one whose size or mtime changed after its outcome
    (the node will handle the new version); a recorded, unchanged file is not."""
    cfg = _node(tmp_path)
    inbox = cfg.paths.inbox
    done = write_ct(inbox / "done.dcm", rows=16, cols=16)
    changed = write_ct(inbox / "changed.dcm", rows=16, cols=16)
    write_ct(inbox / "new" / "new.dcm", rows=16, cols=16)
    _record(cfg, done, "predicted")
    _record(cfg, changed, "quarantined")
    with open(changed, "ab") as f:
        f.write(b"\0" * 16)
    report = audit(cfg)
    assert (report.files_seen, report.predicted, report.quarantined) == (3, 1, 0)
    assert report.missing == ["changed.dcm", os.path.join("new", "new.dcm")]
    code, out = _cli(cfg)
    assert code == 0 and "missing=2" in out and "  missing: changed.dcm" in out
    assert _cli(cfg, "--strict")[0] == 9  # some inputs without an outcome


def test_paths_match_the_node_form_for_symlinks_and_a_symlinked_inbox(tmp_path: Path) -> None:
    """The node stores <resolved inbox>/<relative path>: a symlinked file inside the inbox is
    matched by its own path, and an inbox configured through a symlink still matches."""
    real_inbox = tmp_path / "real_inbox"
    cfg = _node(tmp_path)
    cfg.paths.inbox.rmdir()
    real_inbox.mkdir()
    cfg.paths.inbox.symlink_to(real_inbox)
    target = write_ct(tmp_path / "outside.dcm", rows=16, cols=16)
    link = real_inbox / "link.dcm"
    link.symlink_to(target)
    plain = write_ct(real_inbox / "plain.dcm", rows=16, cols=16)
    _record(cfg, link, "predicted", as_path=real_inbox.resolve() / "link.dcm")
    _record(cfg, plain, "skipped", as_path=real_inbox.resolve() / "plain.dcm")
    report = audit(cfg)
    assert report.complete and (report.predicted, report.skipped) == (1, 1)


def test_wait_returns_once_the_node_caught_up(tmp_path: Path) -> None:
    """`--wait` re-checks while outcomes are being written and returns complete."""
    cfg = _node(tmp_path)
    files = [write_ct(cfg.paths.inbox / f"s{i}.dcm", rows=16, cols=16) for i in range(3)]

    def late_writer() -> None:
        for f in files:
            time.sleep(0.3)
            _record(cfg, f, "predicted")

    t = threading.Thread(target=late_writer)
    t.start()
    code, out = _cli(cfg, "--json", "--strict", "--wait", "30")
    t.join()
    assert code == 0 and json.loads(out)["missing"] == []
    assert json.loads(out)["predicted"] == 3


def test_auditing_while_the_node_writes_and_a_missing_inbox(tmp_path: Path) -> None:
    """A read-only audit is not blocked by a writer holding a transaction (WAL); an inbox that
    does not exist is a configuration error, not an empty success."""
    cfg = _node(tmp_path)
    f = write_ct(cfg.paths.inbox / "s.dcm", rows=16, cols=16)
    _record(cfg, f, "predicted")
    writer = sqlite3.connect(cfg.paths.database, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE files SET reason = 'in flight'")
        assert audit(cfg).predicted == 1
        writer.execute("COMMIT")
    finally:
        writer.close()
    os.rename(cfg.paths.inbox, tmp_path / "gone")
    with pytest.raises(ConfigError, match="inbox"):
        audit(cfg)
    assert _cli(cfg)[0] == ConfigError.exit_code
