"""orphans: report by default; quarantine and delete only what is an orphan now."""

from __future__ import annotations

import json
import os

import pytest
from conftest import age, run_cli

from chachaml_ops.demo import make_store


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s", ["crash_leftover", "retention_leftover"], scale=0.01)


def _tree(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_report_lists_orphans_with_totals_and_moves_nothing(store):
    before = _tree(store.artifact_dir)
    result = run_cli("orphans", "--db", store.db, "--json")
    assert result.code == 1
    doc = result.json()
    orphans = [f for f in doc["findings"] if f["kind"] == "orphan_file"]
    assert {(f["kind"], f["path"]) for f in orphans} == {
        p for p in store.expected() if p[0] == "orphan_file"
    }
    assert doc["summary"]["reclaimable_bytes"] == sum(f["size"] for f in orphans)
    for f in orphans:
        assert {"size", "mtime", "age_s", "cause", "run_status"} <= set(f)
    assert _tree(store.artifact_dir) == before


def test_no_orphans_exits_zero(tmp_path):
    clean = make_store(tmp_path / "c", (), scale=0.01)
    result = run_cli("orphans", "--db", clean.db)
    assert result.code == 0 and "No problems found." in result.stdout


def test_quarantine_moves_only_old_orphans_and_logs_them(store, tmp_path):
    run_id = store.artifacts[0][1]
    fresh = store.artifact_dir / run_id / "in-flight.bin"
    fresh.write_bytes(b"being written")
    referenced = [store.artifact_dir / r / n for _, r, n in store.artifacts]
    expected_moved = {p for k, p in store.expected() if k == "orphan_file"}
    quarantine = tmp_path / "quarantine"

    result = run_cli("orphans", "--db", store.db, "--quarantine", quarantine, "--json")
    assert result.code == 1, result.stderr
    moved = {a["path"] for a in result.json()["actions"] if a["action"] == "moved"}
    assert moved == expected_moved
    for rel in expected_moved:
        assert (quarantine / rel).is_file()
        assert not (store.artifact_dir / rel).exists()
    assert fresh.exists()
    assert all(p.exists() for p in referenced)
    log = [
        json.loads(line) for line in (quarantine / "quarantine-log.jsonl").read_text().splitlines()
    ]
    assert {entry["path"] for entry in log} == expected_moved
    # the deleted run's emptied folder is gone; the crashed run's folder stays
    deleted_run = next(
        p
        for k, p in store.expected()
        if k == "orphan_file" and "xgboost" not in p and p.endswith("config.edn")
    ).split("/")[0]
    assert not (store.artifact_dir / deleted_run).exists()
    # and verify now only sees the registry fault and the in-flight file
    after = run_cli("verify", "--db", store.db, "--json").json()
    assert sorted(f["kind"] for f in after["findings"]) == ["dangling_model_version", "in_flight"]


def test_delete_needs_yes(store):
    before = _tree(store.artifact_dir)
    result = run_cli("orphans", "--db", store.db, "--delete")
    assert result.code == 3 and "--yes" in result.stderr
    assert _tree(store.artifact_dir) == before


def test_delete_with_yes_removes_orphans_only(store):
    referenced = [store.artifact_dir / r / n for _, r, n in store.artifacts]
    result = run_cli("orphans", "--db", store.db, "--delete", "--yes", "--json")
    assert result.code == 1
    deleted = {a["path"] for a in result.json()["actions"] if a["action"] == "deleted"}
    assert deleted == {p for k, p in store.expected() if k == "orphan_file"}
    assert all(p.exists() for p in referenced)
    assert run_cli("orphans", "--db", store.db).code == 0


def test_orphans_of_running_runs_are_spared_by_default(tmp_path):
    from chachaml_ops.demo import ChachamlWriter

    s = make_store(tmp_path / "r", (), scale=0.01)
    w = ChachamlWriter(s.db)
    run = w.start_run("live", "training-now")
    w.write_bytes(run, "checkpoint.bin", b"x" * 10)
    w.close()
    age(s.artifact_dir / run / "checkpoint.bin", 7200)
    result = run_cli("orphans", "--db", s.db, "--delete", "--yes", "--json")
    actions = result.json()["actions"]
    assert [a["action"] for a in actions] == ["spared"]
    assert (s.artifact_dir / run / "checkpoint.bin").exists()
    result = run_cli("orphans", "--db", s.db, "--delete", "--yes", "--include-running")
    assert not (s.artifact_dir / run / "checkpoint.bin").exists()


def test_file_that_gains_a_row_after_the_scan_is_not_moved(store, tmp_path):
    """Apply re-checks right before acting: a row that appears between plan and move wins."""
    from chachaml_ops.demo import ChachamlWriter
    from chachaml_ops.orphans import apply_removal, find_orphans, plan_removal
    from chachaml_ops.store import Store

    with Store(store.db) as s:
        report = find_orphans(s, store.artifact_dir, 3600)
        plan, _ = plan_removal(report.findings)
        crash = next(p for p in plan if p.cause == "crash_leftover")
        run_id, name = crash.relpath.split("/", 1)
        w = ChachamlWriter(store.db)  # chachaml commits the row late
        w.conn.execute(
            "INSERT INTO artifacts VALUES ('late', ?, ?, ?, NULL, 1, ?, 1)",
            (run_id, name, crash.relpath, "0" * 64),
        )
        w.close()
        actions = apply_removal(
            s, store.artifact_dir, [crash], quarantine=tmp_path / "q", min_age=3600
        )
    assert actions == [
        {
            "path": crash.relpath,
            "size": crash.size,
            "cause": "crash_leftover",
            "action": "skipped",
            "reason": "a row references it now",
        }
    ]
    assert (store.artifact_dir / crash.relpath).exists()


def test_quarantine_inside_artifact_dir_is_refused(store):
    result = run_cli("orphans", "--db", store.db, "--quarantine", store.artifact_dir / "q")
    assert result.code == 3 and "inside the artifact dir" in result.stderr


def test_a_failed_move_is_reported_and_exits_2(store, tmp_path):
    quarantine = tmp_path / "q"
    crash = next(p for k, p in store.expected() if k == "orphan_file" and "epoch-3" in p)
    blocker = quarantine / crash.split("/")[0]
    blocker.parent.mkdir()
    blocker.write_text("a file where the run folder should go")
    result = run_cli("orphans", "--db", store.db, "--quarantine", quarantine, "--json")
    doc = result.json()
    failed = [a for a in doc["actions"] if a["action"] == "failed"]
    assert [a["path"] for a in failed] == [crash]
    assert result.code == 2 and doc["summary"]["exit_code"] == 2
    assert doc["summary"]["actions"]["failed"] == 1
    assert (store.artifact_dir / crash).exists()


def test_unknown_run_id_is_a_usage_error_not_a_clean_pass(store):
    for command in ("verify", "orphans"):
        result = run_cli(command, "--db", store.db, "--run", "0b35cf76")
        assert result.code == 3 and "no run '0b35cf76'" in result.stderr
