"""backup, verify-backup and restore: real stores, real archives, real processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import NOW, check, run_cli

from chachaml_ops.archive import ARCHIVE_RE, PARTIAL_RE
from chachaml_ops.backup import BackupOptions, _MemberSource, _Throttle, run_backup
from chachaml_ops.demo import ChachamlWriter
from chachaml_ops.hashing import StreamingSha256, open_regular
from chachaml_ops.state import store_lock
from chachaml_ops.store import Store


def _backup(store, out: Path, *extra: str, state: Path | None = None):
    state = state or out.parent / "state"
    return run_cli("backup", "--db", store.db, "--out", out, "--state-dir", state, "--json", *extra)


def _archives(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if ARCHIVE_RE.match(p.name))


def _members(archive: Path) -> list[str]:
    """Member names as GNU tar lists them (it reads .tar, .tar.gz and .tar.zst alike)."""
    listing = subprocess.run(["tar", "-tf", archive], capture_output=True, text=True, check=True)
    return listing.stdout.splitlines()


def test_clean_backup_extracts_with_tar_and_passes_sha256sum(clean_store, tmp_path):
    out = tmp_path / "out"
    res = _backup(clean_store, out, "--compression", "none")
    assert res.code == 0, res.stderr
    doc = res.json()
    archive = Path(doc["archive"])
    assert [archive] == _archives(out)
    assert doc["bytes"] == archive.stat().st_size
    assert doc["artifacts"] == len(clean_store.artifacts)
    assert doc["schema"] == 1 and doc["findings"] == []
    names = _members(archive)
    assert names[0] == "chachaml.db"
    assert names[-2:] == ["MANIFEST.json", "SHA256SUMS"]
    expected = {f"chachaml-artifacts/{run}/{name}" for _, run, name in clean_store.artifacts}
    assert set(names[1:-2]) == expected
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", dest], check=True)
    sums = subprocess.run(
        ["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, capture_output=True, text=True
    )
    assert sums.returncode == 0, sums.stdout + sums.stderr
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["rows"] == len(clean_store.artifacts)
    assert manifest["source"]["db"] == str(clean_store.db)
    assert len(manifest["members"]) == len(expected) + 1


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_compressed_archive_extracts_with_tar(clean_store, tmp_path, compression):
    out = tmp_path / "out"
    assert _backup(clean_store, out, "--compression", compression).code == 0
    (archive,) = _archives(out)
    assert archive.name.endswith({"zstd": ".tar.zst", "gzip": ".tar.gz"}[compression])
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", archive, "-C", dest], check=True)
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, check=True)
    assert run_cli("verify-backup", archive).code == 0


def test_rotten_artifact_is_archived_as_found_and_exits_2(store_factory, tmp_path):
    store = store_factory(["bit_rot"])
    (planted,) = store.planted
    res = _backup(store, tmp_path / "out")
    assert res.code == 2
    doc = res.json()
    assert [(f["kind"], f["path"]) for f in doc["findings"]] == [("hash_mismatch", planted.path)]
    archive = Path(doc["archive"])
    assert f"chachaml-artifacts/{planted.path}" in _members(archive)
    verified = run_cli("verify-backup", archive, "--json")
    assert verified.code == 2
    (finding,) = verified.json()["findings"]
    assert finding["kind"] == "hash_mismatch" and finding["at_backup"] is True
    assert verified.json()["summary"]["intact"] is True


def test_an_unsafe_path_the_store_had_is_repeated_by_verify_backup(store_factory, tmp_path):
    store = store_factory(["escaped_path"])
    (planted,) = store.planted
    res = _backup(store, tmp_path / "out")
    assert [(f["kind"], f["path"]) for f in res.json()["findings"]] == [
        ("unsafe_path", planted.path)
    ]
    verified = run_cli("verify-backup", res.json()["archive"], "--json")
    assert verified.code == 2
    (finding,) = verified.json()["findings"]
    assert (finding["kind"], finding["path"]) == ("unsafe_path", planted.path)
    assert finding["at_backup"] is True
    assert verified.json()["summary"]["intact"] is True


def test_missing_file_is_skipped_and_recorded(clean_store, tmp_path):
    _, run_id, name = clean_store.artifacts[0]
    (clean_store.artifact_dir / run_id / name).unlink()
    res = _backup(clean_store, tmp_path / "out")
    assert res.code == 2
    assert [(f["kind"], f["path"]) for f in res.json()["findings"]] == [
        ("missing", f"{run_id}/{name}")
    ]
    assert res.json()["artifacts"] == len(clean_store.artifacts) - 1


def test_orphans_are_added_only_when_asked(clean_store, tmp_path):
    _, run_id, _ = clean_store.artifacts[0]
    (clean_store.artifact_dir / run_id / "leftover.bin").write_bytes(b"x" * 100)
    plain = _backup(clean_store, tmp_path / "a")
    with_orphans = _backup(clean_store, tmp_path / "b", "--include-orphans")
    assert plain.code == with_orphans.code == 0
    assert with_orphans.json()["orphans"] == 1
    assert f"orphans/{run_id}/leftover.bin" in _members(Path(with_orphans.json()["archive"]))
    assert not any(n.startswith("orphans/") for n in _members(Path(plain.json()["archive"])))


def test_names_are_unique_within_one_second(clean_store, tmp_path):
    out = tmp_path / "out"
    with Store(clean_store.db) as store:
        names = {
            run_backup(
                store, clean_store.artifact_dir, out, BackupOptions("none"), clock=lambda: NOW
            )[1].archive.name
            for _ in range(5)
        }
    assert len(names) == 5
    assert len({n.split("-")[1] for n in names}) == 1  # the same second in every name


def test_member_source_pads_a_file_that_shrinks_and_notices_one_that_grows(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    fd, st = open_regular(os.fsencode(path))
    try:
        os.truncate(path, 400)
        src = _MemberSource(fd, st.st_size, StreamingSha256(), _Throttle(None))
        data = src.read(-1)
        assert data == b"a" * 400 + bytes(600)
        assert (src.read_bytes, src.padded) == (400, 600)
    finally:
        os.close(fd)
    fd, st = open_regular(os.fsencode(path))
    try:
        with open(path, "ab") as fh:
            fh.write(b"b" * 50)
        src = _MemberSource(fd, st.st_size, StreamingSha256(), _Throttle(None))
        assert src.read(-1) == b"a" * 400
        assert src.grew()
    finally:
        os.close(fd)


# -- live writers -------------------------------------------------------------------------

WRITER = """
import os, sys, time
from pathlib import Path
from chachaml_ops.demo import ChachamlWriter
w = ChachamlWriter(Path(sys.argv[1]))
run = w.start_run("live", "writer")
i = 0
while not os.path.exists(sys.argv[2]):
    w.log_artifact(run, f"step/{i}.bin", os.urandom(20000 + i))
    i += 1
    print(i, flush=True)
w.close()
"""


def test_backup_during_live_writer_restores_to_a_clean_store(clean_store, tmp_path):
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(clean_store.db), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(30):  # let it get going: rows and in-flight files exist
            writer.stdout.readline()
        res = _backup(clean_store, tmp_path / "out")
        during = int(writer.stdout.readline())
    finally:
        stop.touch()
        writer.communicate(timeout=30)
    assert res.code == 0, res.stdout + res.stderr
    assert res.json()["artifacts"] > len(clean_store.artifacts) + 20
    assert during > 30  # the writer really was writing while the backup ran
    target = tmp_path / "restored"
    restored = run_cli("restore", res.json()["archive"], "--to", target, "--json")
    assert restored.code == 0, restored.stdout + restored.stderr
    doc = restored.json()
    assert doc["verify"]["summary"]["findings"]["error"] == 0
    with Store(target / "chachaml.db") as s:
        assert s.totals()[0] == res.json()["artifacts"]


def test_second_backup_of_the_same_store_exits_3(clean_store, tmp_path):
    state = tmp_path / "state"
    with store_lock(state, clean_store.db):
        res = _backup(clean_store, tmp_path / "out", "--wait", "0.3", state=state)
    assert res.code == 3
    assert "another chachaml-ops job is working on" in res.stderr
    assert not (tmp_path / "out").exists() or _archives(tmp_path / "out") == []


# -- damage -------------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))


def test_one_flipped_byte_fails_verify_backup_and_restore(clean_store, tmp_path):
    res = _backup(clean_store, tmp_path / "out", "--compression", "none")
    archive = Path(res.json()["archive"])
    with tarfile.open(archive) as tar:
        victim = next(m for m in tar.getmembers() if m.name.endswith("model.nippy"))
    _flip(archive, victim.offset_data + victim.size // 2)
    verified = run_cli("verify-backup", archive, "--json")
    assert verified.code == 2
    (finding,) = verified.json()["findings"]
    assert (finding["kind"], finding["path"]) == ("hash_mismatch", victim.name)
    assert "MANIFEST.json and SHA256SUMS" in finding["detail"]
    target = tmp_path / "restored"
    restored = run_cli("restore", archive, "--to", target)
    assert restored.code == 2
    assert "nothing was restored" in restored.stderr
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "restore" in p.name] == []


def test_flipped_byte_in_a_compressed_archive_errors_cleanly(clean_store, tmp_path):
    res = _backup(clean_store, tmp_path / "out", "--compression", "zstd")
    archive = Path(res.json()["archive"])
    _flip(archive, archive.stat().st_size // 2)
    verified = run_cli("verify-backup", archive)
    assert verified.code in (2, 3)
    assert "Traceback" not in verified.stderr
    assert "damaged" in verified.stdout + verified.stderr or "Error:" in verified.stderr


def test_not_an_archive_exits_3(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 100)
    res = run_cli("verify-backup", junk)
    assert res.code == 3
    assert res.stderr.startswith("Error:")


# -- hostile archives ---------------------------------------------------------------------


def _hostile_tar(path: Path, db: Path, evil: tarfile.TarInfo, first: bool = False) -> None:
    data = b"evil\n"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        if not first:
            tar.add(db, "chachaml.db")
        if evil.isreg():
            evil.size = len(data)
            tar.addfile(evil, io.BytesIO(data))
        else:
            tar.addfile(evil)


def _evil(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "make",
    [
        lambda root: _evil("chachaml-artifacts/../../evil.txt"),
        lambda root: _evil("../evil.txt"),
        lambda root: _evil(str(root / "abs-evil.txt")),
        lambda root: _evil("chachaml-artifacts/run/link", tarfile.SYMTYPE, str(root)),
        lambda root: _evil("chachaml-artifacts/run/hard", tarfile.LNKTYPE, "/etc/passwd"),
        lambda root: _evil("chachaml-artifacts/run/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot-inside", "dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_hostile_member_is_refused_and_nothing_is_written(clean_store, tmp_path, make):
    root = tmp_path / "victim"
    root.mkdir()
    archive = tmp_path / "hostile.tar"
    _hostile_tar(archive, clean_store.db, make(root))
    before = sorted(p for p in tmp_path.rglob("*"))
    target = tmp_path / "restore-here" / "t"
    res = run_cli("restore", archive, "--to", target, "--json")
    assert res.code == 2, res.stdout + res.stderr
    assert any(f["kind"] == "unsafe_path" for f in res.json()["findings"])
    assert not target.exists()
    after = sorted(p for p in tmp_path.rglob("*") if "restore-here" not in p.parts)
    assert after == before
    assert not (tmp_path / "restore-here").exists()  # folders it created are removed again


def test_hostile_first_member_is_not_our_archive(clean_store, tmp_path):
    archive = tmp_path / "hostile.tar"
    _hostile_tar(archive, clean_store.db, _evil("../evil.txt"), first=True)
    res = run_cli("restore", archive, "--to", tmp_path / "t")
    assert res.code == 3
    assert "not a chachaml-ops archive" in res.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path.parent / "evil.txt").exists()


# -- restore ------------------------------------------------------------------------------


def test_restore_refuses_a_non_empty_target_unless_forced(clean_store, tmp_path):
    res = _backup(clean_store, tmp_path / "out")
    archive = res.json()["archive"]
    target = tmp_path / "t"
    target.mkdir()
    (target / "chachaml.db").write_bytes(b"old db")
    (target / "notes.txt").write_text("keep me")
    refused = run_cli("restore", archive, "--to", target)
    assert refused.code == 3 and "not empty" in refused.stderr
    assert (target / "chachaml.db").read_bytes() == b"old db"
    forced = run_cli("restore", archive, "--to", target, "--force")
    assert forced.code == 0, forced.stdout + forced.stderr
    (aside,) = target.glob(".chachaml-ops-replaced-*")
    assert (aside / "chachaml.db").read_bytes() == b"old db"
    assert (target / "notes.txt").read_text() == "keep me"
    restored = type(clean_store)(target / "chachaml.db", target / "chachaml-artifacts")
    assert check(restored).findings == []


# -- crashes and full disks ---------------------------------------------------------------


def test_kill_9_mid_backup_leaves_no_finished_archive_and_next_run_cleans_up(
    store_factory, tmp_path
):
    store = store_factory(scale=0.05)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chachaml_ops", "backup", "--db", store.db, "--out", out,
         "--state-dir", tmp_path / "state", "--bwlimit", "100K", "--compression", "none"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (out.exists() and list(out.glob("*.tar.partial"))):
            if time.monotonic() > deadline:
                pytest.fail("the backup never got going")
            time.sleep(0.05)
        time.sleep(0.5)  # well into the DB and artifacts: ~1.3 MB at 100 KB/s takes 13 s
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = sorted(p.name for p in out.iterdir())
    assert left and all(PARTIAL_RE.match(n) for n in left)
    assert _archives(out) == []
    res = _backup(store, out, "--compression", "none")
    assert res.code == 0, res.stderr
    assert sorted(res.json()["removed_partials"]) == left
    assert [p.name for p in out.iterdir()] == [Path(res.json()["archive"]).name]
    assert run_cli("verify-backup", res.json()["archive"]).code == 0


def test_a_live_partial_is_never_removed(clean_store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = out / "chachaml-chachaml-0a1b2c3d-20261203T000000Z-0123abcd.tar.zst.partial"
    stale = out / "chachaml-chachaml-0a1b2c3d-20261203T000000Z-4567abcd.tar.partial"
    foreign = out / "something-else.partial"
    for p in (live, stale, foreign):
        p.write_bytes(b"x")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'rb');"
         " fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(live)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = _backup(clean_store, out)
    finally:
        holder.kill()
        holder.wait()
    assert res.code == 0
    assert res.json()["removed_partials"] == [stale.name]
    assert live.exists() and foreign.exists() and not stale.exists()


def _tmpfs(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_full_disk_gives_a_clear_error_and_no_archive(store_factory, tmp_path, compression):
    store = store_factory(scale=0.2)  # ~5 MB of incompressible artifacts
    small = tmp_path / "small"
    if not _tmpfs(small):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        res = _backup(store, small, "--compression", compression)
        assert res.code == 3, res.stdout + res.stderr
        assert "no space left on the device" in res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("Error:")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_odd_names_round_trip_and_pass_sha256sum(tmp_path):
    (tmp_path / "s").mkdir()
    w = ChachamlWriter(tmp_path / "s" / "chachaml.db")
    run = w.start_run("e", "r")
    w.log_artifact(run, "sp ace\\back\nslash.txt", b"x" * 10)
    raw = b"caf\xe9.bin"  # not UTF-8: stored byte-for-byte, as chachaml would
    (w.artifact_dir / run).joinpath(os.fsdecode(raw)).write_bytes(b"data")
    w.conn.execute(
        "INSERT INTO artifacts (id, run_id, name, path, size, hash, created_at)"
        " VALUES ('odd', ?, CAST(? AS TEXT), CAST(? AS TEXT), 4, ?, 0)",
        (run, raw, run.encode() + b"/" + raw, hashlib.sha256(b"data").hexdigest()),
    )
    w.close()
    res = run_cli(
        "backup", "--db", w.db, "--out", tmp_path / "out", "--state-dir", tmp_path / "st",
        "--compression", "none", "--json",
    )  # fmt: skip
    assert res.code == 0, res.stdout + res.stderr
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", res.json()["archive"], "-C", dest], check=True)
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, check=True)
    restored = run_cli("restore", res.json()["archive"], "--to", tmp_path / "r", "--json")
    assert restored.code == 0, restored.stdout + restored.stderr
    assert restored.json()["verify"]["findings"] == []
    assert (tmp_path / "r" / "chachaml-artifacts" / run / os.fsdecode(raw)).read_bytes() == b"data"
