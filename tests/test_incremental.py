"""Incremental verify (--max-age, --max-duration), the rate limit, and the worker paths."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from conftest import NOW, check, kinds, run_cli

from chachaml_ops import verify
from chachaml_ops.demo import ALL_FAULTS, ChachamlWriter
from chachaml_ops.hashing import RateLimit
from chachaml_ops.report import iso_time
from chachaml_ops.state import MarkReader, store_key
from chachaml_ops.units import parse_size

DAY = 86400.0


def _first(store):
    aid, run_id, name = store.artifacts[0]
    return aid, store.artifact_dir / run_id / name, f"{run_id}/{name}"


def _marks(store, state_dir):
    reader = MarkReader(state_dir, store_key(store.db))
    try:
        return reader.for_runs({run for _, run, _ in store.artifacts})
    finally:
        reader.close()


def test_unchanged_files_are_skipped_within_max_age(clean_store, tmp_path):
    state = tmp_path / "state"
    first = check(clean_store, state_dir=state, max_age=7 * DAY)
    n = len(clean_store.artifacts)
    assert first.stats["files_hashed"] == n
    assert first.stats["files_never_verified"] == 0
    second = check(clean_store, NOW + DAY, state_dir=state, max_age=7 * DAY)
    assert second.findings == []
    assert second.stats["files_hashed"] == 0
    assert second.stats["files_skipped"] == n
    assert second.stats["oldest_verified"] == iso_time(NOW)


def test_marks_expire_after_max_age(clean_store, tmp_path):
    state = tmp_path / "state"
    check(clean_store, state_dir=state, max_age=7 * DAY)
    later = check(clean_store, NOW + 8 * DAY, state_dir=state, max_age=7 * DAY)
    assert later.stats["files_skipped"] == 0
    assert later.stats["files_hashed"] == len(clean_store.artifacts)


def test_touched_file_is_hashed_again(clean_store, tmp_path):
    state = tmp_path / "state"
    check(clean_store, state_dir=state, max_age=7 * DAY)
    _, path, _ = _first(clean_store)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    report = check(clean_store, NOW + 60, state_dir=state, max_age=7 * DAY)
    assert report.stats["files_hashed"] == 1
    assert report.stats["files_skipped"] == len(clean_store.artifacts) - 1


def test_rewritten_file_with_restored_mtime_is_still_caught(clean_store, tmp_path):
    # Writing and then restoring the mtime changes the ctime, which the mark also holds.
    state = tmp_path / "state"
    check(clean_store, state_dir=state, max_age=7 * DAY)
    _, path, rel = _first(clean_store)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = check(clean_store, NOW + 60, state_dir=state, max_age=7 * DAY)
    assert kinds(report) == [("hash_mismatch", rel)]


def test_new_artifact_is_hashed_and_others_skipped(clean_store, tmp_path):
    state = tmp_path / "state"
    check(clean_store, state_dir=state, max_age=7 * DAY)
    w = ChachamlWriter(clean_store.db, clock=lambda: NOW)
    run_id = next(iter(clean_store.runs.values()))
    w.log_artifact(run_id, "late.bin", b"fresh bytes", at_ms=int((NOW - 7200) * 1000))
    w.close()
    report = check(clean_store, NOW + 60, state_dir=state, max_age=7 * DAY)
    assert report.findings == []
    assert report.stats["files_hashed"] == 1
    assert report.stats["files_skipped"] == len(clean_store.artifacts)


def test_bit_rot_behind_unchanged_metadata_is_caught_only_when_max_age_expires(
    clean_store, tmp_path
):
    # Media errors change bytes without touching size, times or inode; the trade-off of
    # --max-age is that such rot waits for the mark to expire. Simulate it by corrupting the
    # file and then updating the mark to what the file looks like now.
    state = tmp_path / "state"
    check(clean_store, state_dir=state, max_age=7 * DAY)
    aid, path, rel = _first(clean_store)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    st = path.stat()
    with sqlite3.connect(state / "state.db") as db:
        db.execute(
            "UPDATE verify_marks SET mtime_ns = ?, ctime_ns = ?, inode = ? WHERE artifact_id = ?",
            (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, aid),
        )
    soon = check(clean_store, NOW + DAY, state_dir=state, max_age=7 * DAY)
    assert soon.findings == []
    expired = check(clean_store, NOW + 8 * DAY, state_dir=state, max_age=7 * DAY)
    assert kinds(expired) == [("hash_mismatch", rel)]
    # A bad file loses its mark, so it is hashed (and reported) on every run until fixed.
    assert aid not in _marks(clean_store, state)
    again = check(clean_store, NOW + 8 * DAY + 60, state_dir=state, max_age=7 * DAY)
    assert kinds(again) == [("hash_mismatch", rel)]


class TickingClock:
    """A fake wall clock that moves one second each time it is read."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_max_duration_stops_cleanly_and_later_runs_cover_the_rest(clean_store, tmp_path):
    from chachaml_ops.store import Store

    state = tmp_path / "state"
    n = len(clean_store.artifacts)
    total = sum(
        (clean_store.artifact_dir / r / name).stat().st_size for _, r, name in clean_store.artifacts
    )
    verified: list[int] = []
    for night in range(10):
        clock = TickingClock(NOW + night * DAY)
        opts = verify.CheckOptions(
            jobs=1, state_dir=state, max_duration=30.0, max_age=7 * DAY, processes=False
        )
        with Store(clean_store.db) as s:
            report = verify.run_check(s, clean_store.artifact_dir, opts, clock=clock)
        st = report.stats
        assert report.findings == []
        assert st["rows"] == n  # presence and size still cover every row
        verified.append(len(_marks(clean_store, state)))
        if night == 0:
            assert st["budget_exhausted"] is True
            assert 0 < st["files_hashed"] < n
            assert st["files_hashed"] + st["files_deferred"] == n
            assert st["files_never_verified"] == st["files_deferred"]
            assert 0 < st["bytes_never_verified"] < total
        if verified[-1] == n:
            assert st["files_never_verified"] == 0
            assert st["bytes_never_verified"] == 0
            break
    assert verified == sorted(verified) and verified[-1] == n
    assert len(verified) > 1


def test_max_duration_verifies_the_least_recently_verified_first(clean_store, tmp_path):
    from chachaml_ops.store import Store

    state = tmp_path / "state"
    check(clean_store, state_dir=state)  # everything verified at NOW
    aid, _, _ = _first(clean_store)
    with sqlite3.connect(state / "state.db") as db:
        db.execute(
            "UPDATE verify_marks SET verified_at = ? WHERE artifact_id = ?", (NOW - DAY, aid)
        )
    opts = verify.CheckOptions(jobs=1, state_dir=state, max_duration=2.5, processes=False)
    with Store(clean_store.db) as s:
        report = verify.run_check(s, clean_store.artifact_dir, opts, clock=TickingClock(NOW + 10))
    assert report.stats["files_hashed"] == 1
    assert _marks(clean_store, state)[aid].verified_at > NOW


def test_plain_verify_keeps_no_state(clean_store, tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    report = check(clean_store)
    assert "files_skipped" not in report.stats
    assert not (tmp_path / "state").exists()


def test_process_workers_find_exactly_what_threads_find(store_factory, monkeypatch):
    monkeypatch.setattr(verify, "_MIN_BATCH_ROWS", 1)
    store = store_factory(ALL_FAULTS)
    threads = check(store, processes=False)
    procs = check(store, processes=True)
    assert threads.stats["workers"] == "threads"
    assert procs.stats["workers"] == "processes"

    def docs(report):
        return sorted(repr(sorted(f.to_json().items())) for f in report.findings)

    assert docs(procs) == docs(threads)
    assert {(f.kind, f.path) for f in procs.findings} == store.expected()
    for key in ("rows", "files_seen", "files_hashed", "bytes_hashed", "orphan_bytes"):
        assert procs.stats[key] == threads.stats[key], key
    quick_t = check(store, processes=False, hash=False)
    quick_p = check(store, processes=True, hash=False)
    assert docs(quick_p) == docs(quick_t)


def test_max_rate_parses_and_rejects_nonsense(clean_store):
    assert parse_size("200M") == 200 * 2**20
    ok = run_cli("verify", "--db", clean_store.db, "--max-rate", "200M", "--min-age", "0")
    assert ok.code == 0, ok.stderr
    bad = run_cli("verify", "--db", clean_store.db, "--max-rate", "fast")
    assert bad.code == 3
    assert "not a size" in bad.stderr
    zero = run_cli("verify", "--db", clean_store.db, "--max-rate", "0")
    assert zero.code == 3


def test_rate_limit_holds_readers_to_the_rate():
    limit = RateLimit(8 * 2**20, burst_s=0.0)
    start = time.monotonic()
    for _ in range(9):
        limit(2**18)  # 9 x 256 KiB at 8 MiB/s: the last read may start after ~0.25 s
    assert time.monotonic() - start >= 0.24
    with pytest.raises(ValueError):
        RateLimit(0)


def test_cli_max_age_skips_on_the_second_run(clean_store, tmp_path):
    args = ["verify", "--db", clean_store.db, "--json", "--min-age", "0"]
    args += ["--state-dir", tmp_path / "state", "--max-age", "7d"]
    first = run_cli(*args)
    second = run_cli(*args)
    assert first.code == 0 and second.code == 0, second.stderr
    assert first.json()["summary"]["files_hashed"] == len(clean_store.artifacts)
    summary = second.json()["summary"]
    assert summary["files_hashed"] == 0
    assert summary["files_skipped"] == len(clean_store.artifacts)
    assert summary["bytes_never_verified"] == 0
