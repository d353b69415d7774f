"""Regressions from the backup QA review: forged, damaged and hostile archives, restores that
must never lose a store, per-store retention, and local failures that are not the archive's."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import check, run_cli

from chachaml_ops.archive import ARCHIVE_RE, store_id
from chachaml_ops.backup import BackupOptions, run_backup
from chachaml_ops.restore import RestoreOptions, _place, restore_archive, verify_backup
from chachaml_ops.store import Store


@pytest.fixture
def archive(clean_store, tmp_path) -> Path:
    """A real, clean, uncompressed archive of the clean store."""
    with Store(clean_store.db) as store:
        report, result = run_backup(
            store, clean_store.artifact_dir, tmp_path / "out", BackupOptions("none")
        )
    assert report.findings == []
    return result.archive


def _read(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar.getmembers()]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _reseal(members, edit_manifest=lambda doc: None):
    """Recompute MANIFEST.json member hashes and SHA256SUMS for `members` (a forger's work)."""
    body = [(i, d) for i, d in members if i.name not in ("MANIFEST.json", "SHA256SUMS")]
    (manifest,) = [d for i, d in members if i.name == "MANIFEST.json"]
    doc = json.loads(manifest)
    sha = {i.name: hashlib.sha256(d).hexdigest() for i, d in body}
    for m in doc["members"]:
        m["sha256"], m["size"] = sha[m["path"]], len(dict((i.name, d) for i, d in body)[m["path"]])
    edit_manifest(doc)
    data = json.dumps(doc).encode()
    sums = b"".join(f"{sha[n]}  {n}\n".encode() for n in sha)
    sums += f"{hashlib.sha256(data).hexdigest()}  MANIFEST.json\n".encode()
    return [*body, _reg("MANIFEST.json", data), _reg("SHA256SUMS", sums)]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _mount_tmpfs(path: Path, opts: str = "size=2m") -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)])
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


# -- 1: forced restores never lose the old store ---------------------------------------------


def test_two_forced_restores_in_one_second_keep_every_old_store(archive, tmp_path):
    target = tmp_path / "t"
    assert restore_archive(archive, target, RestoreOptions()).restored
    firsts = []
    for _ in range(2):
        (target / "chachaml.db").write_bytes(b"old db %d" % len(firsts))
        firsts.append((target / "chachaml.db").read_bytes())
        assert restore_archive(archive, target, RestoreOptions(force=True)).restored
    asides = sorted(target.glob(".chachaml-ops-replaced-*"))
    assert len(asides) == 2  # unique names, even within one second
    assert sorted((a / "chachaml.db").read_bytes() for a in asides) == sorted(firsts)
    assert all((a / "chachaml-artifacts").is_dir() for a in asides)
    assert check(type_of_store(target)).findings == []


def type_of_store(target: Path):
    from chachaml_ops.demo import DemoStore

    return DemoStore(target / "chachaml.db", target / "chachaml-artifacts")


def test_a_failed_swap_puts_the_old_store_back(tmp_path):
    target = tmp_path / "t"
    (target / "chachaml-artifacts" / "run").mkdir(parents=True)
    (target / "chachaml.db").write_bytes(b"old")
    staging = target / ".chachaml-ops-restore-abcdefgh"
    staging.mkdir()
    (staging / "chachaml.db").write_bytes(b"new")  # no chachaml-artifacts: the rename fails
    with pytest.raises(Exception, match="left as it was"):
        _place(staging, target, exists=True)
    assert (target / "chachaml.db").read_bytes() == b"old"
    assert (target / "chachaml-artifacts" / "run").is_dir()
    assert (staging / "chachaml.db").read_bytes() == b"new"
    assert list(target.glob(".chachaml-ops-replaced-*")) == []


# -- 2 and 8: mount points and read-only folders ----------------------------------------------


def test_restore_into_an_empty_mount_point_and_refuse_a_mounted_artifact_dir(archive, tmp_path):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=16m")
    try:
        res = run_cli("restore", archive, "--to", mnt, "--json")
        assert res.code == 0, res.stdout + res.stderr
        assert (mnt / "chachaml.db").is_file()
        arts = mnt / "chachaml-artifacts"
        _remove_contents(arts)
        _mount_tmpfs(arts)
        try:
            before = _tree(mnt)
            refused = run_cli("restore", archive, "--to", mnt, "--force")
            assert refused.code == 3
            assert "is a mount point" in refused.stderr and "Traceback" not in refused.stderr
            assert _tree(mnt) == before
        finally:
            _umount(arts)
    finally:
        _umount(mnt)


def _remove_contents(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()


def test_read_only_parent_is_one_line_exit_3(archive, tmp_path):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")
    try:
        res = run_cli("restore", archive, "--to", ro / "sub")
        assert res.code == 3, res.stdout + res.stderr
        assert res.stderr.startswith("Error:") and res.stderr.count("\n") == 1
        assert "Read-only file system" in res.stderr
    finally:
        _umount(ro)


# -- 5: local write errors are not damage -----------------------------------------------------


def test_full_disk_during_restore_is_exit_3_not_damaged(store_factory, tmp_path):
    store = store_factory(scale=0.2)  # ~5 MB of artifacts
    with Store(store.db) as s:
        _, result = run_backup(s, store.artifact_dir, tmp_path / "out", BackupOptions("zstd"))
    small = tmp_path / "small"
    _mount_tmpfs(small, "size=2m")
    try:
        res = run_cli("restore", result.archive, "--to", small / "t")
        assert res.code == 3, res.stdout + res.stderr
        assert "no space left on the device" in res.stderr and "damaged" not in res.stderr
        assert res.stderr.count("\n") == 1
        assert list(small.iterdir()) == []
    finally:
        _umount(small)


# -- 3 and 16: several stores in one --out ----------------------------------------------------


def test_retention_only_touches_the_current_store(store_factory, tmp_path):
    a, b = store_factory(), store_factory()
    out = tmp_path / "out"

    def backup(store, *extra):
        res = run_cli(
            "backup", "--db", store.db, "--out", out, "--state-dir", tmp_path / "st",
            "--compression", "none", "--json", *extra,
        )  # fmt: skip
        assert res.code == 0, res.stderr
        return res.json()

    b_doc = backup(b)
    backup(a)
    last = backup(a, "--keep-last", "1")
    assert Path(b_doc["archive"]).exists()
    link = tmp_path / "link.db"
    link.symlink_to(a.db)
    assert store_id(link) == store_id(a.db)  # one store, one id, however it is reached
    assert store_id(a.db) in Path(last["archive"]).name
    (deleted,) = last["pruned"]
    assert deleted["action"] == "deleted" and deleted["reason"] == "not kept by the policy"
    backup(b)
    res = run_cli("prune", "--out", out, "--keep-last", "1", "--json")
    assert res.code == 0, res.stderr
    left = sorted(p.name for p in out.iterdir() if ARCHIVE_RE.match(p.name))
    assert len(left) == 2 and {ARCHIVE_RE.match(n).group("key") for n in left} == {
        store_id(a.db)[-8:],
        store_id(b.db)[-8:],
    }


# -- 4, 13, 19: forged and conflicting members ------------------------------------------------


def test_a_forged_first_db_copy_is_refused_by_both(archive, tmp_path, store_factory):
    other = store_factory(scale=0.01)
    forged = [_reg("chachaml.db", other.db.read_bytes()), *_read(archive)]
    bad = _write(tmp_path / "forged.tar", forged)
    ver = run_cli("verify-backup", bad, "--json")
    assert ver.code == 2
    assert any(
        f["kind"] == "unsafe_path" and f["path"] == "chachaml.db" for f in ver.json()["findings"]
    )
    res = run_cli("restore", bad, "--to", tmp_path / "t")
    assert res.code == 2 and not (tmp_path / "t").exists()


@pytest.mark.parametrize("extra", ["abs", "dup", "file-then-folder"])
def test_verify_backup_and_restore_agree(archive, tmp_path, extra):
    members = _read(archive)
    art = next(i for i, _ in members if i.name.startswith("chachaml-artifacts/"))
    more = {
        "abs": [_reg("chachaml-artifacts//tmp/x", b"x")],
        "dup": [_reg(art.name, b"second copy")],
        "file-then-folder": [
            _reg("chachaml-artifacts/r/a", b"1"),
            _reg("chachaml-artifacts/r/a/b", b"2"),
        ],
    }[extra]
    bad = _write(tmp_path / "bad.tar", [*members[:-2], *more, *members[-2:]])
    ver = run_cli("verify-backup", bad, "--json")
    res = run_cli("restore", bad, "--to", tmp_path / "t", "--json")
    assert ver.code == res.code == 2, ver.stdout + res.stdout + res.stderr
    assert {f["kind"] for f in ver.json()["findings"]} >= {"unsafe_path"}
    assert _kinds(ver.json()) == _kinds(res.json())
    assert not (tmp_path / "t").exists()


def _kinds(doc) -> list[tuple[str, str]]:
    return sorted((f["kind"], f["path"] or "") for f in doc["findings"])


def test_a_recorded_finding_never_excuses_bytes_it_does_not_describe(archive, tmp_path):
    members = _read(archive)
    i = next(n for n, (m, _) in enumerate(members) if m.name.startswith("chachaml-artifacts/"))
    info, data = members[i]
    members[i] = (info, b"tampered" + data)
    rel = info.name[len("chachaml-artifacts/") :]

    def forge(doc):
        doc["findings"].append(
            {"kind": "hash_mismatch", "severity": "error", "path": rel, "detail": "",
             "actual_sha256": "0" * 64}
        )  # fmt: skip

    bad = _write(tmp_path / "b.tar", _reseal(members, forge))
    doc = verify_backup(bad).to_json()
    (finding,) = [f for f in doc["findings"] if f["path"] == rel]
    assert finding["kind"] == "hash_mismatch" and "at_backup" not in finding
    assert doc["summary"]["intact"] is False


# -- 6, 10, 11, 12, 17, 23: inputs that are not (quite) archives -------------------------------


def test_a_huge_sha256sums_is_refused_without_reading_it_into_memory(archive, tmp_path):
    members = _read(archive)
    bad = tmp_path / "huge.tar"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members[:-1]:
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("SHA256SUMS")
        info.size = (64 << 20) + 1
        tar.addfile(info, _Zeros(info.size))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = run_cli("verify-backup", bad, "--json")
    assert res.code == 2
    assert any("over the" in f["detail"] for f in res.json()["findings"])
    assert max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) < 200_000  # KiB


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


@pytest.mark.parametrize("value", ['"notadict"', "[]", '{"db": 3, "artifact_dir": "x"}'])
def test_a_malformed_manifest_is_a_finding_not_a_traceback(archive, tmp_path, value):
    def edit(doc):
        doc["source"] = json.loads(value)

    bad = _write(tmp_path / "m.tar", _reseal(_read(archive), edit))
    res = run_cli("verify-backup", bad, "--json")
    assert res.code == 2 and "Traceback" not in res.stderr
    assert any(
        f["path"] == "MANIFEST.json" and "source" in f["detail"] for f in res.json()["findings"]
    )


@pytest.mark.parametrize("offset", [10, 100, 1100])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_one_flipped_byte_near_the_start_is_damage(clean_store, tmp_path, offset, compression):
    with Store(clean_store.db) as s:
        _, result = run_backup(
            s, clean_store.artifact_dir, tmp_path / "out", BackupOptions(compression)
        )
    with open(result.archive, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x40]))
    res = run_cli("verify-backup", result.archive)
    assert res.code == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_things_that_are_not_archives_exit_3(clean_store, tmp_path):
    empty = _write(tmp_path / "empty.tar", [])
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    folder_db = tmp_path / "dir.tar"
    info = tarfile.TarInfo("chachaml.db")
    info.type = tarfile.DIRTYPE
    _write(folder_db, [(info, b"")])
    for path, words in [
        (empty, "no members"),
        (Path("/dev/zero"), "not a regular file"),
        (fifo, "not a regular file"),
        (folder_db, "is a directory"),
    ]:
        for cmd in (["verify-backup", path], ["restore", path, "--to", tmp_path / "a" / "t"]):
            res = run_cli(*cmd, timeout=10)
            assert res.code == 3, (path, res.stdout, res.stderr)
            assert words in res.stderr and res.stderr.count("\n") == 1
    missing = run_cli("restore", tmp_path / "nope.tar", "--to", tmp_path / "a" / "t")
    assert missing.code == 3 and not (tmp_path / "a").exists()


def test_restore_follows_a_symlink_to_a_folder(archive, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    res = run_cli("restore", archive, "--to", link)
    assert res.code == 0, res.stdout + res.stderr
    assert (real / "chachaml.db").is_file()


# -- 14, 15: leftovers of killed runs ---------------------------------------------------------


def test_snapshot_sidecars_of_a_killed_backup_are_cleaned(clean_store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    base = f"chachaml-{store_id(clean_store.db)}-20261203T000000Z-0123abcd.db.partial"
    left = [base + s for s in ("", "-wal", "-shm", "-journal")]
    left.append("chachaml-20261203T000000Z-4567abcd.tar.zst.partial")  # first release's naming
    for name in left:
        (out / name).write_bytes(b"x")
    res = run_cli(
        "backup", "--db", clean_store.db, "--out", out, "--state-dir", tmp_path / "s", "--json"
    )
    assert res.code == 0
    assert sorted(res.json()["removed_partials"]) == sorted(left)
    assert [p.name for p in out.iterdir()] == [Path(res.json()["archive"]).name]


def test_stale_staging_is_cleaned_and_a_live_one_is_left_alone(archive, tmp_path):
    target = tmp_path / "t"
    stale = target / ".chachaml-ops-restore-aaaaaaaa"
    live = target / ".chachaml-ops-restore-bbbbbbbb"
    for folder in (stale, live):
        (folder / "chachaml-artifacts").mkdir(parents=True)
        (folder / ".lock").write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'rb');"
         " fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(live / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_cli("restore", archive, "--to", target)
    finally:
        holder.kill()
        holder.wait()
    assert res.code == 0, res.stdout + res.stderr
    assert not stale.exists() and live.exists()
    assert (target / "chachaml.db").is_file()


def test_sigterm_during_verify_backup_removes_its_temp_files(archive, tmp_path):
    big = tmp_path / "big.tar"
    members = _read(archive)
    with tarfile.open(big, "w", format=tarfile.PAX_FORMAT) as tar:
        db_info, db_data = members[0]
        tar.addfile(db_info, io.BytesIO(db_data))
        info = tarfile.TarInfo("chachaml-artifacts/run/big")
        info.size = 256 << 20
        tar.addfile(info, _Zeros(info.size))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chachaml_ops", "verify-backup", str(big)],
        env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp.iterdir()), "verify-backup never made its spool folder"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert list(tmp.iterdir()) == []


# -- 18, 20, 21, 22 ---------------------------------------------------------------------------


def test_a_manifest_less_member_bomb_is_refused_before_writing(archive, tmp_path):
    members = _read(archive)[:1] + [_reg(f"chachaml-artifacts/r/{i}", b"") for i in range(20000)]
    bomb = _write(tmp_path / "bomb.tar", members)
    started = time.monotonic()
    res = run_cli("restore", bomb, "--to", tmp_path / "t")
    assert res.code == 2 and "nothing was restored" in res.stderr
    assert time.monotonic() - started < 15
    assert not (tmp_path / "t").exists()


def test_restore_of_a_store_with_errors_at_backup_is_exit_1_with_a_note(store_factory, tmp_path):
    store = store_factory(["bit_rot"])
    with Store(store.db) as s:
        report, result = run_backup(s, store.artifact_dir, tmp_path / "out", BackupOptions())
    assert report.exit_code() == 2
    target = tmp_path / "t"
    res = run_cli("restore", result.archive, "--to", target, "--json")
    assert res.code == 1, res.stdout + res.stderr
    assert res.json()["restored"] is True and res.json()["exit_code"] == 1
    assert "already had" in res.stderr
    # 21: modes are private whatever the umask said
    assert stat.S_IMODE((target / "chachaml.db").stat().st_mode) == 0o600
    files = [p for p in (target / "chachaml-artifacts").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}


def test_a_missing_artifact_dir_still_backs_up_the_db(clean_store, tmp_path):
    moved = tmp_path / "elsewhere"
    clean_store.artifact_dir.rename(moved)
    res = run_cli(
        "backup", "--db", clean_store.db, "--out", tmp_path / "out", "--state-dir",
        tmp_path / "s", "--json",
    )  # fmt: skip
    assert res.code == 2, res.stderr
    doc = res.json()
    assert Path(doc["archive"]).is_file() and doc["artifacts"] == 0
    assert {f["kind"] for f in doc["findings"]} == {"missing"}
    assert len(doc["findings"]) == len(clean_store.artifacts)
    assert re.search(r"chachaml-\w+-[0-9a-f]{8}-\d{8}T", Path(doc["archive"]).name)


def test_a_full_temp_dir_during_verify_backup_is_exit_3_not_damaged(archive, tmp_path):
    tiny = tmp_path / "tiny"
    _mount_tmpfs(tiny, "size=16k")
    try:
        res = run_cli("verify-backup", archive, env={**os.environ, "TMPDIR": str(tiny)})
        assert res.code == 3, res.stdout + res.stderr
        assert res.stderr.startswith("Error:") and "no space left on the device" in res.stderr
        assert list(tiny.iterdir()) == []
    finally:
        _umount(tiny)


def _slow_archive(archive: Path, path: Path) -> Path:
    """Our DB first, then 256 MiB of zeros: long enough to signal a reader mid-way."""
    db_info, db_data = _read(archive)[0]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(db_info, io.BytesIO(db_data))
        info = tarfile.TarInfo("chachaml-artifacts/run/big")
        info.size = 256 << 20
        tar.addfile(info, _Zeros(info.size))
    return path


def _start_restore(archive: Path, target: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chachaml_ops", "restore", str(archive), "--to", str(target)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not list(target.glob(".chachaml-ops-restore-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(target.glob(".chachaml-ops-restore-*")), "restore never made its staging folder"
    return proc


def test_signals_during_restore_leave_nothing_behind(archive, tmp_path):
    slow = _slow_archive(archive, tmp_path / "slow.tar")
    target = tmp_path / "new" / "t"
    proc = _start_restore(slow, target)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert not (tmp_path / "new").exists()  # staging and the folders it made are gone
    target.mkdir(parents=True)
    proc = _start_restore(slow, target)
    proc.kill()  # kill -9: no cleanup can run
    proc.wait()
    (stale,) = target.glob(".chachaml-ops-restore-*")
    res = run_cli("restore", archive, "--to", target)
    assert res.code == 0, res.stdout + res.stderr
    assert not stale.exists() and (target / "chachaml.db").is_file()


def test_a_garbage_sha256sums_is_a_few_findings_not_millions(archive, tmp_path):
    members = _read(archive)
    bad = _write(tmp_path / "g.tar", [*members[:-1], _reg("SHA256SUMS", b"x\n" * 200_000)])
    doc = verify_backup(bad).to_json()
    lines = [f for f in doc["findings"] if f["path"] == "SHA256SUMS"]
    assert len(lines) == 21 and "199980 more" in lines[-1]["detail"]


def test_members_the_manifest_does_not_list_are_reported_and_never_written(archive, tmp_path):
    members = _read(archive)
    extra = [_reg(f"chachaml-artifacts/extra/{i}", b"x") for i in range(3)]
    bad = _write(tmp_path / "x.tar", [*members[:-2], *extra, *members[-2:]])
    ver = run_cli("verify-backup", bad, "--json")
    res = run_cli("restore", bad, "--to", tmp_path / "t", "--json")
    assert ver.code == res.code == 1, res.stdout + res.stderr
    assert _kinds(ver.json()) == _kinds(res.json())
    assert {f["kind"] for f in res.json()["findings"]} == {"unverifiable"}
    assert not (tmp_path / "t" / "chachaml-artifacts" / "extra").exists()
    assert (tmp_path / "t" / "chachaml.db").is_file()
