"""The per-run fast path reports exactly what the per-row path reports, on a store that holds
every kind of trouble at once: the same findings, the same counters, in every mode."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from chachaml_ops.demo import ALL_FAULTS, DemoStore
from chachaml_ops.orphans import ORPHAN_ONLY
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, Subset, _plain_run, run_check
from tests.conftest import NOW

OLD = NOW - 7200  # older than the orphan grace period
MS = int(NOW * 1000) - 3_600_000


def _add(conn, run_id: str, name: str, data: bytes | None, **over) -> None:
    """A row for `run_id/name` (and the file, unless data is None), fields overridable."""
    row = {
        "id": f"{run_id}:{name}",
        "run_id": run_id,
        "name": name,
        "path": f"{run_id}/{name}",
        "size": len(data or b""),
        "hash": hashlib.sha256(data or b"").hexdigest(),
        "created_at": MS,
    }
    row.update(over)
    conn.execute(
        "INSERT INTO artifacts (id, run_id, name, path, content_type, size, hash, created_at)"
        " VALUES (:id, :run_id, :name, :path, NULL, :size, :hash, :created_at)",
        row,
    )


def _file(folder: Path, name: str | bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, (OLD, OLD))


def _run(conn, art: Path, run_id: str) -> Path:
    conn.execute(
        "INSERT INTO runs (id, experiment, name, status, start_time) VALUES (?, 'zoo', ?, "
        "'completed', ?)",
        (run_id, run_id, MS),
    )
    (art / run_id).mkdir()
    return art / run_id


@pytest.fixture
def zoo(store_factory) -> DemoStore:
    """The demo's planted faults, plus one run per kind of odd row or odd file."""
    store = store_factory(ALL_FAULTS)
    art = store.artifact_dir
    conn = sqlite3.connect(store.db, isolation_level=None)
    try:
        # A plain run where some files went wrong in every way a file can.
        f = _run(conn, art, "run-files")
        for i in range(6):
            _add(conn, "run-files", f"ok{i}.bin", b"ok%d" % i)
            _file(f, f"ok{i}.bin", b"ok%d" % i)
        _add(conn, "run-files", "rotten.bin", b"good bytes")
        _file(f, "rotten.bin", b"evil bytes")
        _add(conn, "run-files", "short.bin", b"twelve bytes")
        _file(f, "short.bin", b"twelve")
        _add(conn, "run-files", "gone.bin", b"gone")
        _add(conn, "run-files", "link.bin", b"x")
        os.symlink("/etc/passwd", f / "link.bin")
        _add(conn, "run-files", "fifo.bin", b"x")
        os.mkfifo(f / "fifo.bin")
        _add(conn, "run-files", "dir.bin", b"x")  # a folder where a file should be
        (f / "dir.bin").mkdir()
        _file(f / "dir.bin", "inside", b"i")
        _file(f, "stray.tmp", b"s")
        _file(f, b"caf\xe9.bin", b"latin-1 name")
        (f / "sub").mkdir()
        _file(f / "sub", "deep.bin", b"deep")
        os.symlink("/etc", f / "etc-link")
        # A plain run whose folder holds only an unlisted subfolder and its rows' files.
        g = _run(conn, art, "run-subdir")
        for i in range(3):
            _add(conn, "run-subdir", f"g{i}", b"g%d" % i)
            _file(g, f"g{i}", b"g%d" % i)
        (g / "nested" / "more").mkdir(parents=True)
        _file(g / "nested" / "more", "n.bin", b"n")
        # A plain run with nested names, one of whose folders is a symlink.
        h = _run(conn, art, "run-nested-link")
        (h / "plots").mkdir()
        _add(conn, "run-nested-link", "plots/a.png", b"a")
        _file(h / "plots", "a.png", b"a")
        (art.parent / "outside").mkdir()
        _file(art.parent / "outside", "b.png", b"b")
        os.symlink(art.parent / "outside", h / "linked")
        _add(conn, "run-nested-link", "linked/b.png", b"b")
        # Runs that are not plain, one reason each.
        for run_id, name, data, over in [
            ("run-nohash", "a.bin", b"a", {"hash": None}),
            ("run-upper", "a.bin", b"a", {"hash": hashlib.sha256(b"a").hexdigest().upper()}),
            ("run-badhash", "a.bin", b"a", {"hash": "not-a-digest"}),
            ("run-blobhash", "a.bin", b"a", {"hash": hashlib.sha256(b"a").digest()}),
            ("run-nosize", "a.bin", b"a", {"size": None}),
            ("run-textsize", "a.bin", b"a", {"size": "1"}),
            ("run-floatsize", "a.bin", b"a", {"size": 1.0}),
            ("run-nested", "sub/a.bin", b"a", {}),
            ("run-escape", "a.bin", b"a", {"path": "../../etc/passwd"}),
            ("run-s3", "a.bin", b"a", {"path": "s3://bucket/prefix/run-s3/a.bin"}),
            ("run-foreign", "a.bin", b"a", {"path": "run-files/ok0.bin"}),
            ("run-dot", ".", b"a", {}),
            ("run-nul", "a\x00b", b"a", {}),
        ]:
            folder = _run(conn, art, run_id)
            _add(conn, run_id, name, data, **over)
            if "/" not in name and "\x00" not in name and name != ".":
                _file(folder, name, data)
            _add(conn, run_id, "plain.bin", b"p")
            _file(folder, "plain.bin", b"p")
        # A run folder that is a symlink, a run with no folder, rows of an unknown run.
        real = art.parent / "elsewhere"
        real.mkdir()
        conn.execute(
            "INSERT INTO runs (id, experiment, name, status, start_time) VALUES"
            " ('run-linked', 'zoo', 'l', 'completed', ?), ('run-nofolder', 'zoo', 'n',"
            " 'completed', ?)",
            (MS, MS),
        )
        os.symlink(real, art / "run-linked")
        _file(real, "l.bin", b"l")
        _add(conn, "run-linked", "l.bin", b"l")
        _add(conn, "run-nofolder", "n.bin", b"n")
        (art / "run-unknown").mkdir()
        _add(conn, "run-unknown", "u.bin", b"u")
        _file(art / "run-unknown", "u.bin", b"u")
    finally:
        conn.close()
    return store


def _outcome(store: DemoStore, **kw):
    with Store(store.db) as s:
        report = run_check(s, store.artifact_dir, CheckOptions(**kw), clock=lambda: NOW)
    findings = sorted(
        (f.kind, f.path, f.detail, f.artifact_id, f.run_id, sorted(f.extra.items()))
        for f in report.findings
    )
    stats = {k: v for k, v in report.stats.items() if k not in ("duration_s", "hash_rate_mib_s")}
    return findings, stats


MODES = {
    "full-inline": dict(jobs=1, processes=False),
    "full-threads": dict(jobs=2, processes=False),
    "quick": dict(jobs=2, hash=False),
    "orphans": dict(jobs=2, **ORPHAN_ONLY),
    "subset": dict(jobs=1, processes=False, subset=None),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fast_path_reports_what_the_per_row_path_reports(zoo, mode):
    kw = dict(MODES[mode])
    if mode == "subset":
        kw["subset"] = Subset(2, 3)
    with Store(zoo.db) as s:
        runs = [r for r, _ in s.run_row_counts()]
        known = s.known_runs(runs)
        aggregates = s.run_aggregates(runs, ids=True, detail=True)
        plain = [a.run_id for a in aggregates if _plain_run(a, known, True, True)]
    assert {"run-files", "run-subdir", "run-nested-link"} <= set(plain)
    assert len(plain) >= 15  # the demo's runs (nested names) and the zoo's plain ones
    fast = _outcome(zoo, fast_path=True, **kw)
    slow = _outcome(zoo, fast_path=False, **kw)
    assert fast == slow
    assert len(fast[0]) > 15  # the zoo really is full of trouble


def test_fast_path_keeps_incremental_marks_and_coverage_the_same(zoo, tmp_path):
    for fast_path in (False, True):
        state = tmp_path / f"state-{fast_path}"
        kw = dict(jobs=2, processes=False, state_dir=state, max_age=7 * 86400.0)
        first = _outcome(zoo, fast_path=fast_path, **kw)
        second = _outcome(zoo, fast_path=fast_path, **kw)
        if not fast_path:
            slow_first, slow_second = first, second
    assert (first, second) == (slow_first, slow_second)
    assert second[1]["files_skipped"] > 0


def test_a_file_vanishing_between_listing_and_open_is_missing(clean_store, monkeypatch):
    import chachaml_ops.verify as verify

    _, run_id, name = clean_store.artifacts[0]
    target = clean_store.artifact_dir / run_id / name
    real = verify.open_regular

    def vanish_then_open(path, **kw):
        if os.fsencode(path) == os.fsencode(name):
            target.unlink(missing_ok=True)
        return real(path, **kw)

    monkeypatch.setattr(verify, "open_regular", vanish_then_open)
    findings, _ = _outcome(clean_store, jobs=1, processes=False)
    assert [(k, p) for k, p, *_ in findings] == [("missing", f"{run_id}/{name}")]
