"""Attacks on the per-run fast path of verify (found by an adversarial review): each test
builds a real store in tmp_path where the fast path must report what the per-row path
(fast_path=False) reports, or stay safe."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import chachaml_ops.verify as verify
from chachaml_ops.orphans import ORPHAN_ONLY
from chachaml_ops.verify import Subset
from tests.test_fast_path import _add, _file, _outcome, _run

FULL = dict(jobs=1, processes=False)
QUICK = dict(jobs=1, processes=False, hash=False)
ORPHANS = dict(jobs=1, processes=False, **ORPHAN_ONLY)


def _connect(store) -> sqlite3.Connection:
    return sqlite3.connect(store.db, isolation_level=None)


def _both(store, **kw):
    """(fast path outcome, per-row outcome) of the same check."""
    return _outcome(store, fast_path=True, **kw), _outcome(store, fast_path=False, **kw)


# -- names the fast path splits differently from resolve_stored_path ----------------------


@pytest.mark.parametrize("mode", ["full", "orphans"])
@pytest.mark.parametrize("name", ["a/", "a/.", "d/a/"])
def test_trailing_slash_name_keeps_its_file_referenced(store_factory, name, mode):
    """`r1/a/` resolves to the file r1/a: that file is referenced, never an orphan_file (which
    `orphans --delete` would remove). Names with empty or dot segments go the per-row way."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    (run / "d").mkdir()
    _add(conn, "r1", name, b"x")
    _file(run, name.rstrip("/.").rstrip("/"), b"x")
    _add(conn, "r1", "ok.bin", b"ok")
    _file(run, "ok.bin", b"ok")
    conn.close()
    fast, slow = _both(store, **(FULL if mode == "full" else ORPHANS))
    assert not [f for f in fast[0] if f[0] == "orphan_file"]
    assert fast == slow


def test_dotdot_last_segment_is_unsafe_in_orphan_mode_too(store_factory):
    """`a/..` is an unsafe_path in every mode, orphans-only included."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    (run / "a").mkdir()
    _add(conn, "r1", "a/..", b"x")
    _add(conn, "r1", "ok.bin", b"ok")
    _file(run, "ok.bin", b"ok")
    conn.close()
    fast, slow = _both(store, **ORPHANS)
    assert [f[0] for f in slow[0]] == ["unsafe_path"]
    assert fast == slow


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_leading_slash_name_counts_every_row(store_factory, mode):
    """A missing file under the name `/x.bin` is one row, counted once."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    _add(conn, "r1", "/x.bin", b"x")  # path r1//x.bin, no file
    _add(conn, "r1", "ok.bin", b"ok")
    _file(run, "ok.bin", b"ok")
    conn.close()
    fast, slow = _both(store, **(FULL if mode == "full" else QUICK))
    assert fast == slow


# -- group_concat lists that line up by accident -------------------------------------------


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_null_size_next_to_a_size_with_a_comma(store_factory, mode):
    """group_concat drops a NULL, and a text size '1,1' would fill its place in the list: a
    run with any NULL size is not plain, and both `unverifiable` findings are reported."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    _add(conn, "r1", "a.bin", b"a", size=None)
    _file(run, "a.bin", b"a")
    _add(conn, "r1", "b.bin", b"b", size="1,1")
    _file(run, "b.bin", b"b")
    conn.close()
    fast, slow = _both(store, **(FULL if mode == "full" else QUICK))
    assert [f[0] for f in slow[0]] == ["unverifiable", "unverifiable"]
    assert fast == slow


def test_null_id_next_to_an_id_with_a_nul(store_factory):
    """The same with ids (a NULL id next to one holding a NUL): rows never swap ids, so
    --subset 1/3 hashes the rotten file it owns."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    _add(conn, "r1", "a.bin", b"a", id=None)
    _file(run, "a.bin", b"e")  # same size, other bytes
    _add(conn, "r1", "b.bin", b"b", id="q\x00z")
    _file(run, "b.bin", b"b")
    conn.close()
    fast, slow = _both(store, jobs=1, processes=False, subset=Subset(1, 3))
    assert ("hash_mismatch", "r1/a.bin") in [f[:2] for f in slow[0]]
    assert fast == slow


# -- the file system ----------------------------------------------------------------------


def test_paths_longer_than_path_max(store_factory):
    """Folders nested past PATH_MAX are reported `unreadable`, as the per-row path sees them,
    although descriptors could reach them."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    parts = ["s" * 200] * 22  # 4400+ bytes
    fd = os.open(run, os.O_RDONLY)
    for part in parts:
        os.mkdir(part, dir_fd=fd)
        nxt = os.open(part, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    for base in ("deep.bin", "stray.bin"):
        out = os.open(base, os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(out, b"d")
        os.close(out)
    os.utime("stray.bin", (1e9, 1e9), dir_fd=fd)
    os.close(fd)
    _add(conn, "r1", "/".join([*parts, "deep.bin"]), b"d")
    conn.close()
    fast, slow = _both(store, **FULL)
    assert fast == slow


def test_a_fifo_row_is_never_opened(store_factory):
    """A FIFO named by a row is never opened (opening it would release a writer blocked in
    open(O_WRONLY) on it): the listing says it is not a regular file."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "r1")
    _add(conn, "r1", "pipe.bin", b"p")
    os.mkfifo(run / "pipe.bin")
    conn.close()
    flag = store.artifact_dir.parent / "writer-got-through"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; os.open(sys.argv[1], os.O_WRONLY); open(sys.argv[2], 'w').close()",
            str(run / "pipe.bin"),
            str(flag),
        ]
    )
    try:
        time.sleep(1.0)  # the writer is now blocked in open()
        findings, _ = _outcome(store, fast_path=True, **FULL)
        time.sleep(0.5)
        assert ("not_a_file", "r1/pipe.bin") in [f[:2] for f in findings]
        assert not flag.exists(), "verify opened the FIFO and released its blocked writer"
    finally:
        writer.kill()
        writer.wait()


def test_run_folder_moved_out_of_the_tree_mid_run(store_factory, monkeypatch):
    """The run folder is moved out of the artifact dir (a symlink left in its place) just as
    its first file is opened. Both paths refuse every file: the per-row path confines each
    open file, the fast path checks the folder's descriptor before it counts any result."""
    results = []
    for fast_path in (True, False):
        store = store_factory(())
        conn = _connect(store)
        run = _run(conn, store.artifact_dir, "r1")
        for i in range(3):
            _add(conn, "r1", f"f{i}", b"%d" % i)
            _file(run, f"f{i}", b"%d" % i)
        conn.close()
        outside = store.artifact_dir.parent / "moved-away"
        moved: list[bool] = []

        def move(run=run, outside=outside, moved=moved):
            if not moved:
                moved.append(True)
                os.rename(run, outside)
                os.symlink(outside, run)

        real_open, real_hash = verify.open_regular, verify.sha256_file

        def open_hook(path, real_open=real_open, move=move, **kw):
            if kw.get("dir_fd") is not None and os.fsencode(path).startswith(b"f"):
                move()
            return real_open(path, **kw)

        def hash_hook(path, real_hash=real_hash, move=move, **kw):
            if b"/r1/" in path:
                move()
            return real_hash(path, **kw)

        monkeypatch.setattr(verify, "open_regular", open_hook)  # the fast path's open
        monkeypatch.setattr(verify, "sha256_file", hash_hook)  # the per-row path's open
        results.append(_outcome(store, fast_path=fast_path, **FULL))
        monkeypatch.undo()
    fast, slow = results
    assert [f[0] for f in slow[0]] == ["not_a_file"] * 3
    # Both refuse every file; the per-row path notices the move while reading, the fast path
    # when it checks the folder, so the re-check words it as a symlinked parent.
    assert [f[:2] for f in fast[0]] == [f[:2] for f in slow[0]]
    assert fast[1] == slow[1]  # the same counters: none of the three was counted as hashed


_FD_SWEEP = """
import json, resource, sys
from pathlib import Path
from chachaml_ops.errors import OpsError
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, run_check

db, art, fast = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
crashes = []
for limit in range(8, 40):
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with Store(db) as store:
            opts = CheckOptions(jobs=1, processes=False, fast_path=fast)
            run_check(store, art, opts, clock=lambda: 1_796_000_000.0)
    except OpsError:
        pass  # a clear 'Error: ...' (e.g. the DB cannot be opened): fine
    except Exception as exc:
        crashes.append([limit, repr(exc)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(json.dumps(crashes))
"""


def test_descriptor_exhaustion_never_crashes(clean_store):
    """With few descriptors left, verify reports what it cannot open; it never dies with a
    bare OSError."""
    out = {}
    for fast in ("1", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", _FD_SWEEP, clean_store.db, clean_store.artifact_dir, fast],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        out[fast] = proc.stdout.strip()
    assert out["0"] == "[]"
    assert out["1"] == "[]"


def test_sigterm_does_not_wait_for_every_queued_file(store_factory):
    """SIGTERM to a real `verify` hashing large files on threads waits only for the files
    being read: queued ones are cancelled first, not started one by one while waiting."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "big")
    for i in range(8):
        data = os.urandom(2 << 20)
        _add(conn, "big", f"f{i}.bin", data)
        _file(run, f"f{i}.bin", data)
    conn.close()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "chachaml_ops", "verify", "--db", str(store.db)),
            *("--jobs", "2", "--no-processes", "--max-rate", "1M"),  # 16 MiB: 16 s to hash
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        time.sleep(1.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=8)  # the two files being read need at most 4 s more
        took = time.monotonic() - sent
        assert proc.returncode == 143, f"still running {took:.1f} s after SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


# -- shared by both paths (not the fast path's doing) -------------------------------------


def _blob_run_store(store_factory):
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "rb")
    _add(conn, "rb", "a.bin", b"a")
    conn.execute("UPDATE artifacts SET run_id = CAST(run_id AS BLOB) WHERE run_id = 'rb'")
    _file(run, "a.bin", b"a")
    rows = conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]
    conn.close()
    return store, rows


@pytest.mark.parametrize("mode", ["full", "orphans"])
def test_a_blob_run_id_rows_file_is_never_an_orphan(store_factory, mode):
    """A row whose run_id a foreign writer stored as a BLOB still claims its file: the live
    re-check asks for both forms, so the file is never reported (or moved) as an orphan."""
    store, _ = _blob_run_store(store_factory)
    for fast_path in (True, False):
        findings, _ = _outcome(store, fast_path=fast_path, **(FULL if mode == "full" else ORPHANS))
        assert ("orphan_file", "rb/a.bin") not in [f[:2] for f in findings]


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_blob_run_id_row_is_verified(store_factory, fast_path):
    """Every row is checked, whatever storage class its run_id has, and its run (a TEXT id in
    `runs`) is known."""
    store, rows = _blob_run_store(store_factory)
    findings, stats = _outcome(store, fast_path=fast_path, **FULL)
    assert stats["rows"] == rows and stats["files_hashed"] == rows
    assert findings == []


def test_a_run_id_stored_as_text_and_as_a_blob_is_one_run(store_factory):
    """Rows of one run, some with the id as TEXT and some as a BLOB: one run, every row
    checked, the same on both paths (the fast path leaves such a run to the per-row one)."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "mixed")
    for name in ("t.bin", "b.bin"):
        _add(conn, "mixed", name, name.encode())
        _file(run, name, name.encode())
    conn.execute("UPDATE artifacts SET run_id = CAST(run_id AS BLOB) WHERE name = 'b.bin'")
    rows = conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]
    conn.close()
    for kw in (FULL, QUICK, ORPHANS):
        fast, slow = _both(store, **kw)
        assert fast == slow and fast[0] == []
        if kw is not ORPHANS:
            assert fast[1]["rows"] == rows


@pytest.mark.parametrize("fast_path", [True, False])
def test_incremental_verify_with_a_non_utf8_run_id(store_factory, tmp_path, fast_path):
    """A run id that is not UTF-8 (TEXT holding byte 0xff) works with marks: ids are stored
    in the state DB as their exact bytes."""
    store = store_factory(())
    raw = b"bad\xff"
    os.mkdir(os.path.join(os.fsencode(store.artifact_dir), raw))
    _file(store.artifact_dir / os.fsdecode(raw), "n.bin", b"q")
    conn = _connect(store)
    conn.execute(
        "INSERT INTO runs (id, experiment, name, status, start_time)"
        " VALUES (CAST(? AS TEXT), 'x', 'x', 'completed', 0)",
        (raw,),
    )
    conn.execute(
        "INSERT INTO artifacts (id, run_id, name, path, size, hash, created_at)"
        " VALUES ('bx', CAST(? AS TEXT), 'n.bin', CAST(? AS TEXT), 1, ?, 0)",
        (raw, raw + b"/n.bin", hashlib.sha256(b"q").hexdigest()),
    )
    conn.close()
    kw = dict(jobs=1, processes=False, state_dir=tmp_path / "marks", max_age=3600.0)
    findings, stats = _outcome(store, fast_path=fast_path, **kw)
    assert findings == []
    assert stats["files_hashed"] == stats["rows"]
