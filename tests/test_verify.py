"""verify: one fault injected into a clean store, one exact finding out."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from conftest import NOW, age, check, kinds

from chachaml_ops.demo import ALL_FAULTS, ChachamlWriter
from chachaml_ops.verify import Subset


def _artifact(store, name="model.nippy", index=0):
    aid, run_id, art = [a for a in store.artifacts if a[2] == name][index]
    return aid, run_id, store.artifact_dir / run_id / art, f"{run_id}/{art}"


def test_clean_store_has_no_findings(clean_store):
    report = check(clean_store)
    assert report.findings == []
    assert report.exit_code() == 0
    assert report.stats["rows"] == len(clean_store.artifacts)
    assert report.stats["files_hashed"] == len(clean_store.artifacts)


def test_demo_store_findings_are_exactly_the_planted_faults(store_factory):
    store = store_factory(ALL_FAULTS)
    report = check(store)
    assert {(f.kind, f.path) for f in report.findings} == store.expected()
    assert len(report.findings) == len(store.planted)
    assert report.exit_code() == 2


def test_deleted_file_is_missing(clean_store):
    aid, _, path, rel = _artifact(clean_store)
    path.unlink()
    report = check(clean_store)
    assert kinds(report) == [("missing", rel)]
    assert report.findings[0].artifact_id == aid


def test_truncated_file_is_size_mismatch(clean_store):
    _, _, path, rel = _artifact(clean_store)
    size = path.stat().st_size
    os.truncate(path, size - 10)
    report = check(clean_store)
    assert kinds(report) == [("size_mismatch", rel)]
    assert report.findings[0].extra["expected_size"] == size
    assert report.findings[0].extra["actual_size"] == size - 10


def test_bit_rot_is_hash_mismatch_not_modified_after_log(store_factory):
    store = store_factory(["bit_rot"])
    report = check(store)
    (finding,) = report.findings
    assert finding.kind == "hash_mismatch"
    assert finding.extra["modified_after_log"] is False


def test_duplicate_log_shows_as_hash_mismatch_modified_after_log(store_factory):
    store = store_factory(["duplicate_log"])
    report = check(store)
    (finding,) = report.findings
    assert finding.kind == "hash_mismatch"
    assert finding.extra["modified_after_log"] is True
    assert "logged twice" in finding.detail


def test_symlink_at_artifact_path_is_not_a_file_and_not_followed(clean_store, tmp_path):
    _, _, path, rel = _artifact(clean_store)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    report = check(clean_store)
    assert kinds(report) == [("not_a_file", rel)]
    assert report.findings[0].extra["file_type"] == "symlink"


def test_symlinked_run_folder_is_not_followed(clean_store, tmp_path):
    _, run_id, _, _ = _artifact(clean_store)
    run_dir = clean_store.artifact_dir / run_id
    moved = tmp_path / "elsewhere"
    run_dir.rename(moved)
    run_dir.symlink_to(moved)
    age(run_dir, 7200, NOW)
    report = check(clean_store)
    rows = [a for a in clean_store.artifacts if a[1] == run_id]
    not_files = [f for f in report.findings if f.kind == "not_a_file"]
    assert len(not_files) == len(rows)
    assert all("parent folder" in f.detail for f in not_files)
    # the link itself has no row: an orphan entry of type symlink, never descended into
    assert [(f.kind, f.path) for f in report.findings if f.kind != "not_a_file"] == [
        ("orphan_file", run_id)
    ]


def test_fifo_at_artifact_path_is_not_a_file_and_does_not_hang(clean_store):
    _, _, path, rel = _artifact(clean_store)
    path.unlink()
    os.mkfifo(path)
    report = check(clean_store)
    assert kinds(report) == [("not_a_file", rel)]
    assert report.findings[0].extra["file_type"] == "fifo"


def test_directory_at_artifact_path_is_not_a_file(clean_store):
    _, _, path, rel = _artifact(clean_store)
    path.unlink()
    path.mkdir()
    report = check(clean_store)
    assert kinds(report) == [("not_a_file", rel)]


def test_escaping_name_is_unsafe_path_and_never_opened(store_factory):
    store = store_factory(["escaped_path"])
    report = check(store)
    (finding,) = report.findings
    assert finding.kind == "unsafe_path"
    assert "'..'" in finding.detail
    assert report.stats["files_hashed"] == len(store.artifacts) - 1


def test_absolute_stored_path_is_unsafe_path(clean_store):
    aid, _, _, _ = _artifact(clean_store)
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("UPDATE artifacts SET path = '/etc/passwd' WHERE id = ?", (aid,))
    report = check(clean_store)
    (finding,) = report.findings
    assert (finding.kind, finding.artifact_id) == ("unsafe_path", aid)
    assert "absolute" in finding.detail
    assert report.stats["files_hashed"] == len(clean_store.artifacts) - 1


def test_retention_leftover_is_dangling_version_and_deleted_run_orphans(store_factory):
    store = store_factory(["retention_leftover"])
    report = check(store)
    assert {(f.kind, f.path) for f in report.findings} == store.expected()
    orphans = [f for f in report.findings if f.kind == "orphan_file"]
    assert {f.extra["cause"] for f in orphans} == {"deleted_run"}
    (dangling,) = [f for f in report.findings if f.kind == "dangling_model_version"]
    assert dangling.extra["stage"] == "archived"


def test_crash_leftover_is_orphan_with_cause(store_factory):
    store = store_factory(["crash_leftover"])
    (finding,) = check(store).findings
    assert finding.kind == "orphan_file"
    assert finding.extra["cause"] == "crash_leftover"
    assert finding.extra["run_status"] == "failed"


def test_top_level_file_is_stray_orphan(clean_store):
    stray = clean_store.artifact_dir / "notes.txt"
    stray.write_text("hello")
    age(stray, 7200, NOW)
    (finding,) = check(clean_store).findings
    assert (finding.kind, finding.path, finding.extra["cause"]) == (
        "orphan_file",
        "notes.txt",
        "stray",
    )


def test_young_unreferenced_file_is_in_flight_not_orphan(clean_store):
    _, run_id, _, _ = _artifact(clean_store)
    fresh = clean_store.artifact_dir / run_id / "being-written.bin"
    fresh.write_bytes(b"x" * 100)
    age(fresh, 60, NOW)
    report = check(clean_store)
    (finding,) = report.findings
    assert (finding.kind, str(finding.severity)) == ("in_flight", "info")
    assert report.exit_code() == 0
    # the same file an hour later is an orphan
    assert check(clean_store, now=NOW + 3600).findings[0].kind == "orphan_file"


def test_row_without_hash_is_unverifiable(clean_store):
    aid, _, _, rel = _artifact(clean_store)
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("UPDATE artifacts SET hash = NULL WHERE id = ?", (aid,))
    report = check(clean_store)
    assert kinds(report) == [("unverifiable", rel)]
    assert report.exit_code() == 1


def test_s3_object_key_is_unverifiable_not_missing(clean_store):
    w = ChachamlWriter(clean_store.db)
    run_id = clean_store.artifacts[0][1]
    w.conn.execute(
        "INSERT INTO artifacts VALUES ('s3-1', ?, 'model.bin', ?, NULL, 10, ?, 1)",
        (run_id, f"chachaml/{run_id}/model.bin", "0" * 64),
    )
    w.close()
    (finding,) = check(clean_store).findings
    assert finding.kind == "unverifiable"
    assert "object-store" in finding.detail


def test_row_of_unknown_run_is_run_missing(clean_store):
    _aid, run_id, _, _rel = _artifact(clean_store)
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
    report = check(clean_store)
    rows_of_run = sum(1 for a in clean_store.artifacts if a[1] == run_id)
    assert [f.kind for f in report.findings] == ["run_missing"] * rows_of_run
    assert report.exit_code() == 1


def test_quick_mode_skips_hashing(store_factory):
    store = store_factory(["bit_rot", "missing_file"])
    report = check(store, hash=False)
    assert [f.kind for f in report.findings] == ["missing"]
    assert report.stats["files_hashed"] == 0


def test_subsets_together_hash_every_row_exactly_once(store_factory):
    store = store_factory(["bit_rot"])
    hashed = 0
    rot_seen = 0
    for n in range(1, 8):
        report = check(store, subset=Subset(n, 7))
        hashed += report.stats["files_hashed"]
        rot_seen += sum(1 for f in report.findings if f.kind == "hash_mismatch")
    assert hashed == len(store.artifacts)
    assert rot_seen == 1


def test_run_filter_checks_only_that_run(store_factory):
    store = store_factory(["bit_rot", "missing_file"])
    bitrot = next(p for p in store.planted if p.fault == "bit_rot")
    run_id = bitrot.path.split("/")[0]
    report = check(store, run_ids=(run_id,))
    assert kinds(report) == [("hash_mismatch", bitrot.path)]
    assert report.stats["rows"] == sum(1 for a in store.artifacts if a[1] == run_id)


def test_non_utf8_orphan_name_is_reported(clean_store):
    _, run_id, _, _ = _artifact(clean_store)
    raw = os.fsencode(clean_store.artifact_dir / run_id) + b"/caf\xe9.bin"
    with open(raw, "wb") as fh:
        fh.write(b"x")
    os.utime(raw, (NOW - 7200, NOW - 7200))
    (finding,) = check(clean_store).findings
    assert finding.kind == "orphan_file"
    assert os.fsencode(finding.path) == os.fsencode(run_id) + b"/caf\xe9.bin"


def test_file_vanishing_before_hash_is_missing_not_a_crash(clean_store, monkeypatch):
    import chachaml_ops.verify as verify

    _, _, path, rel = _artifact(clean_store)
    real = verify.sha256_file

    def vanish_then_hash(p, **kw):
        if os.fsencode(p).endswith(os.fsencode(rel)):
            path.unlink(missing_ok=True)
        return real(p, **kw)

    monkeypatch.setattr(verify, "sha256_file", vanish_then_hash)
    # The per-row path (the fast path's twin is in test_fast_path.py).
    assert kinds(check(clean_store, fast_path=False)) == [("missing", rel)]


def test_every_problem_is_reported_not_just_the_first(store_factory):
    store = store_factory(["bit_rot"])
    for _aid, run_id, name in store.artifacts[:5]:
        (store.artifact_dir / run_id / name).unlink()
    report = check(store)
    assert sum(1 for f in report.findings if f.kind == "missing") == 5
    assert sum(1 for f in report.findings if f.kind == "hash_mismatch") == 1


def test_missing_artifact_dir_path_resolution(tmp_path):
    from chachaml_ops.layout import derive_artifact_dir

    assert derive_artifact_dir(Path("/x/foo.db")) == Path("/x/foo-artifacts")
    assert derive_artifact_dir(Path("/x/foo.sqlite")) == Path("/x/foo.sqlite-artifacts")
    assert derive_artifact_dir(Path("chachaml.db")) == Path("chachaml-artifacts")
