"""verify-backup and restore: judge an archive in one streaming pass, or extract it safely.

Restore first verifies the whole archive (writing nothing), then extracts into a staging folder
inside the target (one filesystem), judges that pass again, and only then renames into place.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import tarfile
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chachaml_ops.archive import (
    ARTIFACT_PREFIX,
    DB_MEMBER,
    ORPHAN_PREFIX,
    ArchiveScan,
    FileSink,
    Judgement,
    LocalWriteFailed,
    NotOurArchive,
    SinkFactory,
    judge,
    manifest_member_name,
    open_archive,
    scan_archive,
)
from chachaml_ops.backup import fsync_dir
from chachaml_ops.errors import OpsError, UsageError
from chachaml_ops.hashing import sha256_file
from chachaml_ops.report import Finding, Report
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, run_check

RESTORED_DB = DB_MEMBER
RESTORED_ARTIFACTS = "chachaml-artifacts"
# What a restore replaces in a non-empty target with --force (moved aside, never deleted).
_REPLACED = (
    RESTORED_DB,
    RESTORED_DB + "-wal",
    RESTORED_DB + "-shm",
    RESTORED_DB + "-journal",
    RESTORED_ARTIFACTS,
)


def _archive_report(command: str, scan: ArchiveScan, judgement: Judgement) -> Report:
    manifest = judgement.manifest or {}
    report = Report(
        command,
        {
            "db": f"{scan.archive}:{DB_MEMBER}",
            "artifact_dir": f"{scan.archive}:{ARTIFACT_PREFIX}",
            "archive": str(scan.archive),
        },
    )
    report.add(judgement.findings)
    report.stats = {
        "archive": str(scan.archive),
        "compression": scan.compression,
        "members": len(scan.order),
        "rows": judgement.rows,
        "bytes_read": scan.bytes_read,
        "created": manifest.get("created"),
        "source_db": (manifest.get("source") or {}).get("db"),
        "intact": not judgement.damaged,
    }
    return report


def _spool_dir() -> tempfile.TemporaryDirectory:
    """A private temp folder for the DB spool; removed on exit, SIGTERM included (cli)."""
    try:
        return tempfile.TemporaryDirectory(prefix="chachaml-ops-verify-")
    except OSError as exc:
        raise LocalWriteFailed(
            f"cannot create a temp folder in {tempfile.gettempdir()}: {exc.strerror}",
            "set TMPDIR to a writable folder with room for the DB",
        ) from None


def verify_backup(archive: Path) -> Report:
    """Read the archive once and report every problem (NotOurArchive when it is not ours)."""
    started = time.monotonic()
    with _spool_dir() as spool:
        scan = scan_archive(Path(archive), Path(spool))
        judgement = judge(scan)
    report = _archive_report("verify-backup", scan, judgement)
    report.stats["duration_s"] = round(time.monotonic() - started, 3)
    return report


def archive_is_intact(archive: Path) -> bool:
    """No damage (problems the source store already had at backup time do not count)."""
    with _spool_dir() as spool:
        try:
            return not judge(scan_archive(Path(archive), Path(spool))).damaged
        except NotOurArchive:
            return False


# -- restore ------------------------------------------------------------------------------

STAGING_PREFIX = ".chachaml-ops-restore-"
REPLACED_PREFIX = ".chachaml-ops-replaced-"
_STAGING_LOCK = ".lock"
_STAGING_RE = re.compile(r"^\.chachaml-ops-restore-[A-Za-z0-9_]{8}$")
# A staging folder without its lock file (killed between mkdtemp and the lock) is stale
# once it is this old; one with a lock is stale as soon as nobody holds the lock.
_UNLOCKED_STAGING_AGE = 3600.0


class RestoreFailed(OpsError):
    """The restore could not be completed on this machine (exit 3); the target is as it was."""


@dataclass(frozen=True)
class RestoreOptions:
    force: bool = False
    include_orphans: bool = False
    jobs: int = 1
    min_age: float = 3600.0


@dataclass(frozen=True)
class RestoreResult:
    report: Report  # what the archive held, and whether it was restored
    verify: Report | None  # verify of the restored store; None when nothing was restored
    restored: bool


def _resolve_target(target: Path) -> tuple[Path, bool]:
    """(the folder to restore into, whether it exists). A symlink to a folder is followed."""
    target = Path(os.path.abspath(target))
    if os.path.islink(target):
        real = Path(os.path.realpath(target))
        if not real.is_dir():
            raise UsageError(
                f"restore target {target} is a symlink to {real}, which is not a folder",
                "pass a folder (or a symlink to one)",
            )
        target = real
    if not os.path.lexists(target):
        return target, False
    if not target.is_dir():
        raise UsageError(
            f"restore target {target} exists and is not a folder",
            "pass a folder path; chachaml.db and chachaml-artifacts/ are created inside it",
        )
    return target, True


def _has_content(target: Path) -> bool:
    return any(not _STAGING_RE.match(e.name) for e in os.scandir(target))


def _check_replaceable(target: Path) -> None:
    """Everything a restore renames must be on the target's own filesystem: a mount point
    (chachaml-artifacts mounted on its own) cannot be renamed, so refuse before any change."""
    dev = os.stat(target).st_dev
    for name in _REPLACED:
        path = target / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_dev != dev or os.path.ismount(path):
            raise UsageError(
                f"{path} is a mount point (another filesystem); a restore cannot replace it",
                "restore into another folder and copy the files in, or unmount it first",
            )


def _make_folders(target: Path) -> list[Path]:
    """Create the target and missing parents; returns what was created (outermost first)."""
    missing: list[Path] = []
    here = target
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
    except OSError as exc:
        _remove_folders(made)
        raise RestoreFailed(f"cannot create {exc.filename or target}: {exc.strerror}") from None
    return made


def _remove_folders(made: list[Path]) -> None:
    for folder in reversed(made):
        with suppress(OSError):
            folder.rmdir()


class _Staging:
    """DIR/.chachaml-ops-restore-XXXXXXXX/, on the target's filesystem, flocked while alive."""

    def __init__(self, target: Path) -> None:
        try:
            self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
        except OSError as exc:
            raise RestoreFailed(f"cannot write in {target}: {exc.strerror}") from None
        try:
            self.lock = os.open(
                self.path / _STAGING_LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
            )  # fmt: skip
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        except OSError as exc:
            _remove_tree(self.path)
            raise RestoreFailed(f"cannot write in {target}: {exc.strerror}") from None

    def close(self) -> None:
        try:
            if os.path.isdir(self.path):
                _remove_tree(self.path)
        finally:
            os.close(self.lock)


def remove_stale_staging(target: Path) -> list[str]:
    """Remove staging folders of killed restores in `target` (our naming, lock free)."""
    removed: list[str] = []
    for entry in os.scandir(target):
        if not _STAGING_RE.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(
                os.path.join(entry.path, _STAGING_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except FileNotFoundError:
            with suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > _UNLOCKED_STAGING_AGE:
                    _remove_tree(Path(entry.path))
                    removed.append(entry.name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live restore owns it
        try:
            _remove_tree(Path(entry.path))
            removed.append(entry.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _sink_factory(staging: Path, opts: RestoreOptions, listed: frozenset[str]) -> SinkFactory:
    artifacts = staging / RESTORED_ARTIFACTS

    def sink_for(name: str, rel: str, info: tarfile.TarInfo) -> FileSink | None:
        # `rel` was judged by the scanner (restorable_relpath; no file/folder conflicts).
        orphan = name.startswith(ORPHAN_PREFIX)
        if (orphan and not opts.include_orphans) or name not in listed:
            return None  # a member the manifest does not list is reported, never written
        path = artifacts / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return FileSink(path, 0o640, info.mtime)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            if orphan:
                return None  # an orphan never overwrites or blocks a referenced artifact
            raise

    return sink_for


def restore_archive(archive: Path, target: Path, opts: RestoreOptions) -> RestoreResult:
    """Verify the archive fully, extract it into a staging folder inside the target, judge
    that pass again, then rename into place and verify the restored store."""
    started = time.monotonic()
    fd = open_archive(Path(archive))  # a missing archive creates nothing
    try:
        target, exists = _resolve_target(target)
        made: list[Path] = []
        if exists:
            try:
                remove_stale_staging(target)
                has_content = _has_content(target)
            except OSError as exc:
                raise RestoreFailed(f"cannot list {target}: {exc.strerror}") from None
            if has_content and not opts.force:
                raise UsageError(
                    f"restore target {target} is not empty",
                    "choose an empty folder, or pass --force to replace its chachaml.db and "
                    "chachaml-artifacts (the old ones are moved aside, not deleted)",
                )
            _check_replaceable(target)
        else:
            made = _make_folders(target)
        restored = False
        try:
            staging = _Staging(target)
            try:
                report, restored = _extract(Path(archive), fd, staging.path, target, exists, opts)
            finally:
                staging.close()
        finally:
            if not restored:
                _remove_folders(made)
    finally:
        os.close(fd)
    report.stats["restored"] = restored
    report.stats["duration_s"] = round(time.monotonic() - started, 3)
    if not restored:
        return RestoreResult(report, None, False)
    with Store(target / RESTORED_DB) as store:
        verified = run_check(
            store,
            target / RESTORED_ARTIFACTS,
            CheckOptions(jobs=opts.jobs, min_age=opts.min_age),
            command="verify",
        )
    return RestoreResult(report, verified, True)


def _extract(
    archive: Path, fd: int, staging: Path, target: Path, exists: bool, opts: RestoreOptions
) -> tuple[Report, bool]:
    # Pass 1 writes nothing but the DB spool: an archive verify-backup rejects (a forged
    # member, a 100k-member bomb without a manifest) is refused before any file is written.
    first = scan_archive(archive, staging, fd=fd)
    judgement = judge(first)
    if first.db_spool is not None:
        os.unlink(first.db_spool)
    report = _archive_report("restore", first, judgement)
    report.stats["target"] = str(target)
    if judgement.damaged or first.db_spool is None:
        return report, False
    # Pass 2 extracts, hashing again: the bytes written must be the bytes judged.
    manifest = judgement.manifest or {}
    listed = frozenset(manifest_member_name(m) for m in manifest.get("members", []))
    scan = scan_archive(archive, staging, _sink_factory(staging, opts, listed), fd=fd)
    again = judge(scan)
    report = _archive_report("restore", scan, again)
    report.stats["target"] = str(target)
    if {n: m.sha256 for n, m in scan.seen.items()} != {n: m.sha256 for n, m in first.seen.items()}:
        report.add([Finding("unreadable", None, "archive changed while it was restored")])
        return report, False
    if again.damaged or scan.db_spool is None:
        return report, False
    spool = scan.db_spool
    listed = {m.get("path"): m for m in (again.manifest or {}).get("members", [])}
    try:
        digest = sha256_file(os.fsencode(spool)).sha256
    except OSError as exc:
        raise RestoreFailed(f"cannot read back {spool}: {exc.strerror}") from None
    expected = (listed.get(DB_MEMBER) or {}).get("sha256")
    if digest != expected:
        detail = "restored DB differs from the manifest's entry; nothing restored"
        extra = {"expected_sha256": expected, "actual_sha256": digest}
        report.add([Finding("hash_mismatch", DB_MEMBER, detail, extra=extra)])
        return report, False
    try:
        os.rename(spool, staging / RESTORED_DB)
        (staging / RESTORED_ARTIFACTS).mkdir(exist_ok=True)
        for here, _dirs, _files in os.walk(staging / RESTORED_ARTIFACTS):
            fsync_dir(Path(here))
        fsync_dir(staging)
    except OSError as exc:
        raise RestoreFailed(f"cannot finish the staging folder {staging}: {exc.strerror}") from None
    report.actions = _place(staging, target, exists)
    return report, True


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that never replaces an existing `dst` (renameat2 RENAME_NOREPLACE)."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), os.fspath(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)


_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _place(staging: Path, target: Path, exists: bool) -> list[dict[str, Any]]:
    """Swap the verified store in: old entries into a fresh aside folder, new ones from the
    staging folder (same filesystem: all renames, none replacing). Any failure, a SIGTERM
    included, renames everything back, so the target always holds one complete store."""
    actions: list[dict[str, Any]] = []
    moved: list[tuple[Path, Path]] = []
    aside: Path | None = None
    try:
        old = [n for n in _REPLACED if os.path.lexists(target / n)] if exists else []
        if old:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = Path(tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{stamp}-", dir=target))
            for name in old:
                _rename_noreplace(target / name, aside / name)
                moved.append((target / name, aside / name))
                actions.append(
                    {"action": "moved aside", "path": str(target / name), "to": str(aside / name)}
                )
        for name in (RESTORED_DB, RESTORED_ARTIFACTS):
            _rename_noreplace(staging / name, target / name)
            moved.append((staging / name, target / name))
            actions.append({"action": "restored", "path": str(target / name)})
        fsync_dir(target)
    except BaseException as exc:
        for src, dst in reversed(moved):
            with suppress(OSError):
                os.rename(dst, src)
        if aside is not None:
            with suppress(OSError):
                aside.rmdir()
        if isinstance(exc, OSError):
            raise RestoreFailed(
                f"cannot put the restored store in place in {target}: "
                f"{exc.strerror or exc} ({exc.filename}); {target} was left as it was"
            ) from None
        raise
    return actions


def _remove_tree(staging: Path) -> None:
    # Only our own staging folder, which holds nothing but what we wrote; never follow links.
    for here, dirs, files in os.walk(staging, topdown=False):
        for name in files:
            os.unlink(os.path.join(here, name))
        for name in dirs:
            path = os.path.join(here, name)
            if os.path.islink(path):
                os.unlink(path)
            else:
                os.rmdir(path)
    os.rmdir(staging)
