"""The verify and orphans commands as an operator runs them: real processes, exit codes,
one-line errors, JSON on stdout."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import age, run_cli

from chachaml_ops.demo import ALL_FAULTS, make_store


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture
def demo_store(tmp_path):
    return make_store(tmp_path / "demo", ALL_FAULTS, scale=0.01)


def test_verify_json_reports_every_planted_fault(demo_store):
    result = run_cli("verify", "--db", demo_store.db, "--json")
    assert result.code == 2, result.stderr
    doc = result.json()
    assert doc["schema"] == 1
    assert doc["store"]["db"] == str(demo_store.db)
    assert doc["store"]["artifact_dir"] == str(demo_store.artifact_dir)
    found = {(f["kind"], f["path"]) for f in doc["findings"]}
    assert found == demo_store.expected()
    for f in doc["findings"]:
        assert set(f) >= {"kind", "severity", "path", "artifact_id", "run_id", "detail"}
    summary = doc["summary"]
    assert summary["exit_code"] == 2
    assert summary["by_kind"]["orphan_file"] == 5
    assert summary["bytes_hashed"] > 0 and "duration_s" in summary


def test_verify_text_groups_findings_by_kind(demo_store):
    result = run_cli("verify", "--db", demo_store.db)
    assert result.code == 2
    assert "hash_mismatch (error): 2" in result.stdout
    assert "orphan_file (warning): 5" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour off a TTY
    assert result.stderr == ""  # no progress off a TTY


def test_clean_store_exits_zero(tmp_path):
    store = make_store(tmp_path / "s", (), scale=0.01)
    result = run_cli("verify", "--db", store.db)
    assert result.code == 0, result.stdout + result.stderr
    assert "No problems found." in result.stdout


def test_warnings_only_exit_one(tmp_path):
    store = make_store(tmp_path / "s", ["crash_leftover"], scale=0.01)
    assert run_cli("verify", "--db", store.db).code == 1


def _one_line_error(result, code=3):
    assert result.code == code, (result.code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:")
    return lines[0]


def test_missing_db_exits_3_with_one_line(tmp_path):
    line = _one_line_error(run_cli("verify", "--db", tmp_path / "nope.db"))
    assert "no database" in line


def test_non_sqlite_file_exits_3(tmp_path):
    bogus = tmp_path / "chachaml.db"
    bogus.write_text("this is a CSV,not,a,db\n")
    assert "not a SQLite database" in _one_line_error(run_cli("verify", "--db", bogus))


def test_foreign_schema_exits_3(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    assert "no 'artifacts' table" in _one_line_error(run_cli("verify", "--db", db))


def test_artifacts_table_missing_columns_exits_3(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE artifacts (id TEXT, run_id TEXT, name TEXT, path TEXT)")
    assert "lacks column" in _one_line_error(run_cli("verify", "--db", db))


def test_missing_artifact_dir_exits_3(tmp_path):
    store = make_store(tmp_path / "s", (), scale=0.01)
    shutil.move(store.artifact_dir, tmp_path / "moved")
    assert "--artifact-dir" in _one_line_error(run_cli("verify", "--db", store.db))


def test_usage_errors_exit_3(tmp_path):
    store = make_store(tmp_path / "s", (), scale=0.01)
    bad_subset = run_cli("verify", "--db", store.db, "--subset", "8/7")
    assert bad_subset.code == 3 and "subset" in bad_subset.stderr
    assert run_cli("verify", "--no-such-option").code == 3
    assert run_cli("verify", "--db", store.db, "--min-age", "soon").code == 3
    assert run_cli("orphans", "--db", store.db, "--delete").code == 3


def test_locked_db_exits_3_after_busy_timeout(tmp_path):
    db = tmp_path / "locked.db"
    with sqlite3.connect(db) as conn:  # rollback-journal mode: a writer can block readers
        conn.execute(
            "CREATE TABLE artifacts (id TEXT, run_id TEXT, name TEXT, path TEXT, size INT,"
            " hash TEXT, created_at INT)"
        )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sqlite3, sys
            c = sqlite3.connect({str(db)!r}, isolation_level=None)
            c.execute("PRAGMA locking_mode=EXCLUSIVE")
            c.execute("BEGIN EXCLUSIVE")
            c.execute("INSERT INTO artifacts (id) VALUES ('x')")
            print("locked", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(run_cli("verify", "--db", db, "--busy-timeout", "200"))
        assert "locked" in line
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_db_and_wal_bytes_unchanged_while_a_writer_holds_rows_in_the_wal(tmp_path):
    store = make_store(tmp_path / "s", (), scale=0.01)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from chachaml_ops.demo import ChachamlWriter
            w = ChachamlWriter({str(store.db)!r})
            w.conn.execute("PRAGMA wal_autocheckpoint=0")
            run = w.start_run("live", "still-training")
            for i in range(20):
                w.log_artifact(run, f"ckpt/{{i}}.bin", bytes([i]) * 1000)
            w.write_bytes(run, "ckpt/lost.bin", b"x")  # this row never comes: a leftover
            w.conn.execute(
                "INSERT INTO artifacts VALUES ('wal-only', ?, 'gone.bin', ?, NULL, 1, ?, 1)",
                (run, run + "/gone.bin", "0" * 64))
            print(run, flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = writer.stdout.readline().strip()
        wal = Path(str(store.db) + "-wal")
        before = (_digest(store.db), _digest(wal))
        assert before[1] is not None and wal.stat().st_size > 0
        result = run_cli("verify", "--db", store.db, "--json", "--min-age", "0")
        doc = result.json()
        assert doc["summary"]["rows"] == len(store.artifacts) + 21  # WAL-only rows are seen
        found = {(f["kind"], f["path"]) for f in doc["findings"]}
        assert found == {
            ("missing", f"{run_id}/gone.bin"),
            ("orphan_file", f"{run_id}/ckpt/lost.bin"),
        }
        assert (_digest(store.db), _digest(wal)) == before
    finally:
        writer.stdin.close()
        writer.wait(10)


def test_fifo_orphan_does_not_hang(tmp_path):
    store = make_store(tmp_path / "s", (), scale=0.01)
    run_id = store.artifacts[0][1]
    fifo = store.artifact_dir / run_id / "pipe"
    os.mkfifo(fifo)
    age(fifo, 7200)
    result = run_cli("verify", "--db", store.db, "--json", timeout=30)
    (finding,) = result.json()["findings"]
    assert (finding["kind"], finding["file_type"]) == ("orphan_file", "fifo")


def test_non_utf8_names_survive_into_json_losslessly(tmp_path):
    store = make_store(tmp_path / "s", (), scale=0.01)
    run_id = store.artifacts[0][1]
    raw = os.fsencode(store.artifact_dir / run_id) + b"/r\xe9sultat-\xff.bin"
    with open(raw, "wb") as fh:
        fh.write(b"leftover")
    os.utime(raw, (1, 1))
    result = run_cli("verify", "--db", store.db, "--json")
    (finding,) = result.json()["findings"]
    assert base64.b64decode(finding["path_b64"]) == run_id.encode() + b"/r\xe9sultat-\xff.bin"
    assert finding["path"].startswith(run_id + "/r\\xe9sultat")


def _without_read_override():
    """Run as root would, minus the capabilities that let root read a mode-000 file."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root without setpriv cannot be denied a read")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]


def test_unreadable_file_is_a_finding_and_the_check_goes_on(tmp_path):
    store = make_store(tmp_path / "s", ["bit_rot"], scale=0.01)
    _, run_id, name = store.artifacts[0]
    (store.artifact_dir / run_id / name).chmod(0o000)
    result = run_cli("verify", "--db", store.db, "--json", prefix=_without_read_override())
    kinds = sorted((f["kind"], f["path"]) for f in result.json()["findings"])
    rot = next(p for p in store.planted if p.fault == "bit_rot")
    assert kinds == [("hash_mismatch", rot.path), ("unreadable", f"{run_id}/{name}")]
    assert result.code == 2


def test_every_command_has_help_with_an_example():
    from chachaml_ops.cli import cli

    for name, command in cli.commands.items():
        result = run_cli(name, "--help")
        assert result.code == 0, name
        assert command.help and "chachaml-ops" in result.stdout, name
        sub = getattr(command, "commands", None)
        for subname in sub or ():
            assert run_cli(name, subname, "--help").code == 0
    assert run_cli("--help").code == 0


def test_verify_and_orphans_wait_for_the_store_lock_and_record_history(tmp_path, private_state_dir):
    from chachaml_ops.state import StateDB, store_key, store_lock

    store = make_store(tmp_path / "s", (), scale=0.01)
    with store_lock(private_state_dir, store.db, holder="backup in another process"):
        for command in ("verify", "orphans"):
            result = run_cli(command, "--db", store.db)
            assert result.code == 3, result.stderr
            assert "another chachaml-ops job" in result.stderr
            assert "backup in another process" in result.stderr
    assert run_cli("verify", "--db", store.db, "--wait", "5").code == 0
    with StateDB(private_state_dir) as history:
        last = history.last_job(store_key(store.db), "verify")
    assert last is not None and last.exit_code == 0 and last.summary["rows"] > 0


def test_quick_verify_never_stands_in_for_a_full_one_in_the_history(tmp_path, private_state_dir):
    from chachaml_ops.state import StateDB, store_key

    store = make_store(tmp_path / "s", ["bit_rot"], scale=0.01)
    assert run_cli("verify", "--db", store.db).code == 2
    assert run_cli("verify", "--db", store.db, "--quick").code == 0
    with StateDB(private_state_dir) as history:
        full = history.last_job(store_key(store.db), "verify")
        quick = history.last_job(store_key(store.db), "verify-quick")
    assert full.exit_code == 2 and quick.exit_code == 0
    assert run_cli("verify", "--db", store.db, "--max-duration", "0s").code == 3


def test_sigterm_during_a_forked_verify_stops_workers_and_frees_the_lock(tmp_path):
    import signal
    import time

    from chachaml_ops.demo import ChachamlWriter

    store = make_store(tmp_path / "s", (), scale=0.001)
    w = ChachamlWriter(store.db)
    for r in range(20):
        run = w.start_run("many", f"r{r}")
        for i in range(150):
            w.log_artifact(run, f"f{i}.bin", b"x" * 64)
    w.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chachaml_ops",
            "verify",
            "--db",
            str(store.db),
            "--max-rate",
            "20K",
            "--jobs",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    # no worker outlives the parent holding the store lock
    assert run_cli("verify", "--db", store.db, "--quick").code == 0


def test_a_global_option_after_the_command_says_where_it_goes(clean_store):
    result = run_cli("verify", "--log-level", "info", "--db", clean_store.db)
    assert result.code == 3
    assert result.stderr.strip().splitlines() == [
        "Error: No such option '--log-level'; --log-level goes before the command:"
        " chachaml-ops --log-level ..."
    ]
