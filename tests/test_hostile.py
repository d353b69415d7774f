"""Hostile and damaged inputs: each gives a finding or a one-line exit 3, never a traceback,
a hang, or a touched file."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from conftest import age, check, run_cli

from chachaml_ops.demo import ChachamlWriter, make_store
from chachaml_ops.hashing import OutsideTree, sha256_file


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s", ["crash_leftover"], scale=0.01)


def _files(root: Path) -> list[str]:
    # SQLite's -wal/-shm may appear: any reader of a WAL DB creates them
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm"))
    )


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "RUN/"])
def test_run_option_must_be_one_folder_name(store, bad):
    before = _files(store.db.parent)
    value = store.artifacts[0][1] + "/" if bad == "RUN/" else bad
    result = run_cli("orphans", "--db", store.db, "--run", value, "--delete", "--yes")
    assert result.code == 3 and result.stderr.startswith("Error: --run")
    assert _files(store.db.parent) == before


def test_symlinked_run_folder_is_reported_but_never_deleted(store, tmp_path):
    run_id = store.artifacts[0][1]
    run_dir = store.artifact_dir / run_id
    run_dir.rename(tmp_path / "relocated")
    run_dir.symlink_to(tmp_path / "relocated")
    age(run_dir, 7200)
    result = run_cli("orphans", "--db", store.db, "--delete", "--yes", "--json")
    spared = [a for a in result.json()["actions"] if a["action"] == "spared"]
    assert [a["path"] for a in spared] == [run_id]
    assert run_dir.is_symlink()


def test_run_id_with_a_slash_owns_its_folder_and_stays_protected_while_running(tmp_path):
    s = make_store(tmp_path / "s", (), scale=0.01)
    w = ChachamlWriter(s.db)
    w.conn.execute(
        "INSERT INTO runs (id, experiment, status, start_time) VALUES"
        " ('team/r1', 'x', 'running', 1)"
    )
    w.log_artifact("team/r1", "kept.bin", b"kept")
    w.write_bytes("team/r1", "leftover.bin", b"left")
    w.close()
    age(s.artifact_dir / "team/r1/leftover.bin", 7200)
    age(s.artifact_dir / "team/r1/kept.bin", 7200)
    doc = run_cli("orphans", "--db", s.db, "--delete", "--yes", "--json").json()
    (finding,) = doc["findings"]
    assert (finding["path"], finding["run_id"], finding["cause"], finding["run_status"]) == (
        "team/r1/leftover.bin",
        "team/r1",
        "crash_leftover",
        "running",
    )
    assert [a["action"] for a in doc["actions"]] == ["spared"]
    assert (s.artifact_dir / "team/r1/leftover.bin").exists()


def test_quarantine_across_file_systems_never_overwrites(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm to cross file systems")
    s = make_store(tmp_path / "s", (), scale=0.01)
    run_id = s.artifacts[0][1]
    for name in ("w.bin.partial", "w.bin"):
        (s.artifact_dir / run_id / name).write_bytes(name.encode())
        age(s.artifact_dir / run_id / name, 7200)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as q:
        result = run_cli("orphans", "--db", s.db, "--quarantine", q, "--json")
        assert result.code == 1, result.stderr
        moved = sorted(a["path"] for a in result.json()["actions"] if a["action"] == "moved")
        assert moved == [f"{run_id}/w.bin", f"{run_id}/w.bin.partial"]
        assert (Path(q) / run_id / "w.bin.partial").read_bytes() == b"w.bin.partial"
        assert (Path(q) / run_id / "w.bin").read_bytes() == b"w.bin"
        assert not [p for p in Path(q).rglob("*") if p.name.startswith(".chachaml-ops-")]


def test_quarantine_through_a_link_into_the_artifact_dir_is_refused(store, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(store.artifact_dir)
    result = run_cli("orphans", "--db", store.db, "--quarantine", link / "q")
    assert result.code == 3 and "inside the artifact dir" in result.stderr


def test_quarantine_dir_under_a_file_is_a_one_line_error(store, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli("orphans", "--db", store.db, "--quarantine", tmp_path / "afile" / "q")
    assert result.code == 3 and len(result.stderr.strip().splitlines()) == 1


def test_null_size_with_a_hash_is_still_hashed_and_not_a_size_mismatch(clean_store):
    aid = clean_store.artifacts[0][0]
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("UPDATE artifacts SET size = NULL WHERE id = ?", (aid,))
    report = check(clean_store)
    assert [f.kind for f in report.findings] == ["unverifiable"]
    assert report.stats["files_hashed"] == len(clean_store.artifacts)


def test_size_stored_as_text_is_understood(clean_store):
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("UPDATE artifacts SET size = CAST(size AS TEXT)")
    assert check(clean_store).findings == []


def test_unsafe_path_wins_over_object_key_lookalike(clean_store):
    aid, run_id, name = clean_store.artifacts[0]
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("UPDATE artifacts SET path = ? WHERE id = ?", (f"/{run_id}/{name}", aid))
    (finding,) = check(clean_store).findings
    assert finding.kind == "unsafe_path"


def test_json_is_valid_utf8_with_undecodable_folder_names(clean_store):
    raw = os.fsencode(clean_store.artifact_dir) + b"/r\xff2"
    os.mkdir(raw)
    with open(raw + b"/f.bin", "wb") as fh:
        fh.write(b"x")
    os.utime(raw + b"/f.bin", (1, 1))
    result = run_cli("verify", "--db", clean_store.db, "--json", text=False)
    doc = json.loads(result.stdout.decode("utf-8"))  # strict UTF-8
    (finding,) = doc["findings"]
    assert finding["run_id"] == "r\\xff2" and "path_b64" in finding


def test_control_characters_in_names_are_escaped_on_the_terminal_report(clean_store):
    run_id = clean_store.artifacts[0][1]
    evil = clean_store.artifact_dir / run_id / "evil\x1b[2J\nname.bin"
    evil.write_bytes(b"x")
    age(evil, 7200)
    out = run_cli("verify", "--db", clean_store.db).stdout
    assert "\x1b[2J" not in out and "evil\\x1b[2J\\x0aname.bin" in out


def test_fifo_as_db_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "chachaml.db")
    result = run_cli("verify", "--db", tmp_path / "chachaml.db", timeout=20)
    assert result.code == 3 and "not a regular file" in result.stderr


def test_empty_db_option_is_a_one_line_error():
    result = run_cli("verify", "--db", "")
    assert result.code == 3 and result.stderr.count("\n") == 1


def test_odd_table_names_are_tolerated(clean_store):
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute('CREATE TABLE "x"")" (a)')
    assert check(clean_store).findings == []


def test_truncated_db_is_a_one_line_error(clean_store):
    with sqlite3.connect(clean_store.db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = clean_store.db.read_bytes()
    clean_store.db.write_bytes(data[: len(data) // 2])
    result = run_cli("verify", "--db", clean_store.db)
    assert result.code in (2, 3), result.stderr  # damage found in rows, or not readable at all
    assert "Traceback" not in result.stderr


def test_hashing_refuses_a_file_reached_through_a_symlinked_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_bytes(b"data")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutsideTree):
        sha256_file(os.fsencode(tmp_path / "link" / "f"), confine=True)
    assert sha256_file(os.fsencode(real / "f"), confine=True).size == 4


def test_unenterable_folder_is_unreadable_finding(clean_store):
    from test_cli import _without_read_override

    _, run_id, name = next(a for a in clean_store.artifacts if "/" in a[2])
    folder = clean_store.artifact_dir / run_id / name.rsplit("/", 1)[0]
    folder.chmod(0)
    try:
        result = run_cli(
            "verify", "--db", clean_store.db, "--json", prefix=_without_read_override()
        )
        found = {(f["kind"], f["path"]) for f in result.json()["findings"]}
        assert ("unreadable", f"{run_id}/{name}") in found
        assert "Traceback" not in result.stderr
    finally:
        folder.chmod(0o755)
