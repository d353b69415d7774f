"""verify-backup and restore: judge an archive in one streaming pass, or extract it safely.

Restore writes only into a temporary sibling of the target, refuses hostile members (our own
checks, then tarfile's `data` filter), verifies everything, and only then renames into place.
"""

from __future__ import annotations

import os
import secrets
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chachaml_ops.archive import (
    ARTIFACT_PREFIX,
    DB_MEMBER,
    ORPHAN_PREFIX,
    ArchiveScan,
    Judgement,
    NotOurArchive,
    judge,
    scan_archive,
)
from chachaml_ops.backup import fsync_dir
from chachaml_ops.errors import UsageError
from chachaml_ops.layout import UnsafePath, resolve_stored_path
from chachaml_ops.report import Finding, Report
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, run_check

RESTORED_DB = "chachaml.db"
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


def verify_backup(archive: Path) -> Report:
    """Read the archive once and report every problem (NotOurArchive when it is not ours)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chachaml-ops-verify-") as spool:
        scan = scan_archive(Path(archive), Path(spool))
        judgement = judge(scan)
    report = _archive_report("verify-backup", scan, judgement)
    report.stats["duration_s"] = round(time.monotonic() - started, 3)
    return report


def archive_is_intact(archive: Path) -> bool:
    """No damage (problems the source store already had at backup time do not count)."""
    with tempfile.TemporaryDirectory(prefix="chachaml-ops-verify-") as spool:
        try:
            return not judge(scan_archive(Path(archive), Path(spool))).damaged
        except NotOurArchive:
            return False


# -- restore ------------------------------------------------------------------------------


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


class _FileSink:
    """One extracted file: written under O_EXCL|O_NOFOLLOW, fsynced, its mtime kept."""

    def __init__(self, path: Path, mtime: float) -> None:
        self.fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        self.mtime = mtime

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        try:
            os.fsync(self.fd)
            os.utime(self.fd, (self.mtime, self.mtime))
        finally:
            os.close(self.fd)


def _check_target(target: Path, force: bool) -> bool:
    """True when the target exists (and may be filled); raises when it must not be touched."""
    if not os.path.lexists(target):
        return False
    if target.is_symlink() or not target.is_dir():
        raise UsageError(f"restore target {target} exists and is not a folder")
    if any(target.iterdir()) and not force:
        raise UsageError(
            f"restore target {target} is not empty",
            "choose an empty folder, or pass --force to replace its chachaml.db and "
            "chachaml-artifacts (the old ones are moved aside, not deleted)",
        )
    return True


def _sink_factory(
    staging: Path, opts: RestoreOptions, refused: list[Finding], dirs: set[Path]
) -> Callable[[str, tarfile.TarInfo], _FileSink | None]:
    artifacts = staging / RESTORED_ARTIFACTS

    def sink_for(name: str, info: tarfile.TarInfo) -> _FileSink | None:
        if name.startswith(ARTIFACT_PREFIX):
            rel = name[len(ARTIFACT_PREFIX) :]
        elif name.startswith(ORPHAN_PREFIX) and opts.include_orphans:
            rel = name[len(ORPHAN_PREFIX) :]
        else:
            return None  # the DB is spooled by the reader; MANIFEST and SUMS are held
        try:
            rel = resolve_stored_path(rel)
            # The second gate: tarfile's own extraction policy for untrusted archives.
            tarfile.data_filter(info, os.fspath(staging))
        except (UnsafePath, tarfile.FilterError) as exc:
            refused.append(Finding("unsafe_path", name, f"refused: {exc}; never written"))
            return None
        target = artifacts / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(target.parent)
            return _FileSink(target, info.mtime)
        except FileExistsError:
            if name.startswith(ORPHAN_PREFIX):
                return None  # an orphan never overwrites a referenced artifact
            refused.append(Finding("unreadable", name, "cannot restore: the path is taken"))
        except OSError as exc:
            refused.append(Finding("unreadable", name, f"cannot restore: {exc.strerror}"))
        return None

    return sink_for


def restore_archive(archive: Path, target: Path, opts: RestoreOptions) -> RestoreResult:
    """Extract into a temporary sibling, judge it, then rename into place and verify."""
    started = time.monotonic()
    target = Path(os.path.abspath(target))
    exists = _check_target(target, opts.force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.restore-{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        refused: list[Finding] = []
        dirs: set[Path] = set()
        scan = scan_archive(Path(archive), staging, _sink_factory(staging, opts, refused, dirs))
        scan.findings.extend(refused)
        judgement = judge(scan)
        report = _archive_report("restore", scan, judgement)
        report.stats["target"] = str(target)
        if judgement.damaged or scan.db_spool is None:
            report.stats["restored"] = False
            report.stats["duration_s"] = round(time.monotonic() - started, 3)
            return RestoreResult(report, None, False)
        os.rename(scan.db_spool, staging / RESTORED_DB)
        (staging / RESTORED_ARTIFACTS).mkdir(exist_ok=True)
        for folder in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)
        fsync_dir(staging / RESTORED_ARTIFACTS)
        fsync_dir(staging)
        report.actions = _place(staging, target, exists)
    finally:
        if staging.exists():
            _remove_staging(staging)
    report.stats["restored"] = True
    report.stats["duration_s"] = round(time.monotonic() - started, 3)
    with Store(target / RESTORED_DB) as store:
        verified = run_check(
            store,
            target / RESTORED_ARTIFACTS,
            CheckOptions(jobs=opts.jobs, min_age=opts.min_age),
            command="verify",
        )
    return RestoreResult(report, verified, True)


def _place(staging: Path, target: Path, exists: bool) -> list[dict[str, Any]]:
    """Rename the verified staging folder (or its two entries) into place, fsyncing folders."""
    if not exists:
        os.rename(staging, target)
        fsync_dir(target.parent)
        return [{"action": "restored", "path": str(target)}]
    actions: list[dict[str, Any]] = []
    aside = target / f".chachaml-ops-replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for name in _REPLACED:
        old = target / name
        if os.path.lexists(old):
            aside.mkdir(exist_ok=True)
            os.rename(old, aside / name)
            actions.append({"action": "moved aside", "path": str(old), "to": str(aside / name)})
    for name in (RESTORED_DB, RESTORED_ARTIFACTS):
        os.rename(staging / name, target / name)
        actions.append({"action": "restored", "path": str(target / name)})
    staging.rmdir()
    fsync_dir(target)
    return actions


def _remove_staging(staging: Path) -> None:
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
