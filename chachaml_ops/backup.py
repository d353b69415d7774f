"""Consistent backups: an online DB snapshot, then exactly the bytes it references, in one tar.

The archive is written as NAME.partial (flocked by its writer), fsynced, renamed and the folder
fsynced, so a crash or a full disk never leaves a file that looks finished.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import io
import os
import sqlite3
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from chachaml_ops import __version__
from chachaml_ops.archive import (
    CHUNK,
    DB_MEMBER,
    MANIFEST,
    ORPHAN_PREFIX,
    PARTIAL_RE,
    SUMS,
    Member,
    artifact_member,
    build_manifest,
    new_archive_name,
    store_id,
    sums_line,
)
from chachaml_ops.errors import Interrupted, OpsError, UsageError
from chachaml_ops.hashing import NotRegularFile, StreamingSha256, open_regular
from chachaml_ops.layout import (
    ArtifactTree,
    UnsafePath,
    file_type,
    is_inside,
    is_object_key,
    resolve_stored_path,
)
from chachaml_ops.report import Finding, Report, iso_time
from chachaml_ops.scan import ScanEntry, scan_tree
from chachaml_ops.store import ArtifactRow, Store

if TYPE_CHECKING:
    from chachaml_ops.retention import RetentionPolicy

COMPRESSIONS = ("none", "gzip", "zstd")
ZSTD_JOB_SIZE = 2 << 20
ZSTD_MAX_AUTO_WORKERS = 4  # keeps peak RSS under 100 MB whatever the machine


class BackupFailed(OpsError):
    """The archive could not be written (full disk, unwritable folder); nothing was left."""


@dataclass(frozen=True)
class BackupOptions:
    compression: str = "zstd"
    include_orphans: bool = False
    bwlimit: int | None = None  # bytes per second read from the store; None: no limit
    zstd_level: int = 3
    zstd_threads: int | None = None  # None: auto (see zstd_workers); -1: one per CPU; 0: inline
    gzip_level: int = 6


@dataclass(frozen=True)
class BackupResult:
    archive: Path
    bytes: int
    artifacts: int
    orphans: int
    rows: int
    db_bytes: int
    artifact_bytes: int
    duration_s: float
    removed_partials: tuple[str, ...]

    def stats(self) -> dict[str, Any]:
        return {
            "archive": str(self.archive),
            "bytes": self.bytes,
            "rows": self.rows,
            "artifacts": self.artifacts,
            "orphans": self.orphans,
            "db_bytes": self.db_bytes,
            "artifact_bytes": self.artifact_bytes,
            "duration_s": round(self.duration_s, 3),
        }


# -- stale partials -----------------------------------------------------------------------


def remove_stale_partials(out_dir: Path) -> list[str]:
    """Delete our own `.partial` files that no live backup holds (their flock is free).

    Only names matching our pattern are touched. A writer holds an flock on each partial for
    its whole life and the kernel drops it when the writer dies, so a free lock means stale.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return removed
    sidecars = [e for e in entries if PARTIAL_RE.match(e.name) and e.name.endswith(_SIDECARS)]
    for entry in entries:
        if not PARTIAL_RE.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        if entry.name.endswith(_SIDECARS):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live backup is writing it
            if os.path.samestat(os.fstat(fd), os.lstat(entry.path)):
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
    # SQLite's -wal/-shm/-journal beside a snapshot partial: a live backup creates and locks
    # its snapshot before SQLite can create these, so one whose snapshot is gone is stale.
    for entry in sidecars:
        base = entry.name.rsplit("-", 1)[0]
        if entry.is_file(follow_symlinks=False) and not os.path.lexists(
            os.path.join(out_dir, base)
        ):
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


_SIDECARS = ("-wal", "-shm", "-journal")


def _create_locked(path: Path) -> int:
    """Create `path` (never an existing one) and flock it; fails if a cleaner took it first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        same = os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise BackupFailed(f"{path} was removed while it was being created; retry")
    return fd


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading members ----------------------------------------------------------------------


class _Throttle:
    """--bwlimit: sleep so the bytes read stay under a rate (be gentle to a busy store)."""

    def __init__(self, rate: int | None, should_stop: Callable[[], bool] | None = None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0
        self.should_stop = should_stop

    def __call__(self, n: int) -> None:
        # Called per chunk read: also where a stopping daemon aborts (the partial is removed).
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("backup stopped part way; the partial archive was removed")
        if not self.rate:
            return
        self.done += n
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


class _MemberSource:
    """A file-like over an open fd that yields exactly `size` bytes, hashing them as they go.

    tar writes the size in the header before the data, so a file that shrinks while read is
    padded with zeros and one that grows is cut at `size`; either is noted for a finding.
    """

    def __init__(self, fd: int, size: int, hasher: StreamingSha256, throttle: _Throttle) -> None:
        self.fd = fd
        self.left = size
        self.hasher = hasher
        self.throttle = throttle
        self.read_bytes = 0
        self.padded = 0
        self.error: str | None = None

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        if want <= 0:
            return b""
        parts: list[bytes] = []
        got = 0
        while got < want and not self.padded:
            try:
                data = os.read(self.fd, want - got)
            except OSError as exc:
                # The header is out already: pad the member and report, never tear the tar.
                self.error = exc.strerror or str(exc)
                break
            if not data:
                break
            parts.append(data)
            got += len(data)
        self.read_bytes += got
        if got < want:
            parts.append(bytes(want - got))
            self.padded += want - got
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.left -= want
        self.hasher.update(data)
        self.throttle(want)
        return data

    def grew(self) -> bool:
        return bool(os.read(self.fd, 1))


def zstd_workers(requested: int | None, cpus: int | None = None) -> int:
    """zstd worker threads. Auto: one per CPU but one (left to hashing and I/O), at most 4.

    Measured on 2 CPUs (bench/backup_bench.py): python-zstandard's multi-threaded mode spends
    about twice the CPU of its inline mode, and the hash thread already needs a core, so on
    two CPUs or fewer compressing inline is faster than threads=-1.
    """
    if requested is not None:
        return requested
    cpus = cpus or os.cpu_count() or 1
    return 0 if cpus <= 2 else min(cpus - 1, ZSTD_MAX_AUTO_WORKERS)


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


# -- the archive writer -------------------------------------------------------------------


class _ArchiveWriter:
    """A PAX tar streamed through the chosen compressor into an open file."""

    def __init__(self, raw: BinaryIO, opts: BackupOptions, executor: ThreadPoolExecutor) -> None:
        self.raw = raw
        self.stream: Any
        if opts.compression == "zstd":
            workers = zstd_workers(opts.zstd_threads)
            params = zstandard.ZstdCompressionParameters.from_level(
                opts.zstd_level,
                threads=workers,
                write_checksum=True,
                # Small jobs bound memory: ~7 MiB per worker instead of ~25 (measured).
                **({"job_size": ZSTD_JOB_SIZE} if workers else {}),
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
            self.stream = cctx.stream_writer(raw, closefd=False, write_size=CHUNK)
        elif opts.compression == "gzip":
            self.stream = gzip.GzipFile(
                fileobj=raw, mode="wb", compresslevel=opts.gzip_level, mtime=0, filename=""
            )
        else:
            self.stream = raw
        self.tar = tarfile.TarFile(
            fileobj=self.stream,
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )
        self.tar.copybufsize = CHUNK
        self.executor = executor
        self.members: list[Member] = []

    def add_bytes(self, name: str, data: bytes, role: str, mtime: float) -> Member:
        hasher = StreamingSha256()
        hasher.update(data)
        self.tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
        self.tar.members.clear()  # tarfile keeps every header otherwise
        return Member(name, len(data), hasher.hexdigest(), role)

    def add_fd(
        self, name: str, fd: int, st: os.stat_result, role: str, throttle: _Throttle
    ) -> tuple[Member, _MemberSource]:
        source = _MemberSource(fd, st.st_size, StreamingSha256(self.executor), throttle)
        self.tar.addfile(_tarinfo(name, st.st_size, st.st_mtime), source)
        self.tar.members.clear()
        member = Member(name, st.st_size, source.hasher.hexdigest(), role)
        self.members.append(member)
        return member, source

    def finish(self) -> None:
        self.tar.close()
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.flush()


# -- the backup ---------------------------------------------------------------------------


def run_backup(
    store: Store,
    artifact_dir: Path,
    out_dir: Path,
    opts: BackupOptions,
    *,
    clock: Callable[[], float] = time.time,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Report, BackupResult]:
    """Snapshot, archive and publish atomically. The caller holds the store lock.

    `should_stop()` is asked per chunk; when true, errors.Interrupted is raised and the
    partial archive is removed (nothing finished-looking is left)."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    if is_inside(out_dir, artifact_dir):
        raise UsageError(
            f"backup folder {out_dir} is inside the artifact dir",
            "choose a folder outside it, or the archives would look like orphans",
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupFailed(f"cannot create {out_dir}: {exc.strerror}") from None
    # A missing artifact dir does not stop the backup: the DB alone is better than nothing,
    # and each row that needs local bytes is reported `missing` (S3-only stores need none).
    removed = tuple(remove_stale_partials(out_dir))
    now = clock()
    name = new_archive_name(now, opts.compression, store_id(store.db))
    final = out_dir / name
    partial = out_dir / (name + ".partial")
    snapshot = out_dir / (name.split(".tar")[0] + ".db.partial")
    report = Report(
        "backup",
        {**store.describe(), "artifact_dir": str(artifact_dir)},
    )
    with ExitStack() as stack:
        try:
            fd = _create_locked(partial)
        except OSError as exc:
            raise _failed(exc, partial) from None
        stack.callback(_discard, partial, fd)
        try:
            snap_fd = _create_locked(snapshot)
            stack.callback(_discard, snapshot, snap_fd)
            store.snapshot_to(snapshot)
        except (OSError, sqlite3.Error) as exc:
            raise _failed(exc, snapshot, what="DB snapshot") from None
        executor = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sha256"))
        raw = os.fdopen(os.dup(fd), "wb", buffering=CHUNK)
        stack.callback(_close_quietly, raw)
        writer = _ArchiveWriter(raw, opts, executor)
        try:
            counts = _write_members(
                writer, store, snapshot, artifact_dir, opts, report, should_stop
            )
            manifest = build_manifest(
                tool_version=__version__,
                created=iso_time(now),
                db=store.db,
                artifact_dir=artifact_dir,
                sqlite_version=sqlite3.sqlite_version,
                rows=counts["rows"],
                compression=opts.compression,
                members=writer.members,
                findings=report.findings,
            )
            writer.members.append(writer.add_bytes(MANIFEST, manifest, "meta", now))
            sums = b"".join(sums_line(m.sha256, m.path) for m in writer.members)
            writer.add_bytes(SUMS, sums, "meta", now)
            writer.finish()
            os.fsync(fd)
            os.rename(partial, final)
            fsync_dir(out_dir)
        except (OSError, zstandard.ZstdError) as exc:
            raise _failed(exc, partial) from None
        size = os.fstat(fd).st_size
    result = BackupResult(
        archive=final,
        bytes=size,
        artifacts=counts["artifacts"],
        orphans=counts["orphans"],
        rows=counts["rows"],
        db_bytes=counts["db_bytes"],
        artifact_bytes=counts["artifact_bytes"],
        duration_s=time.monotonic() - started,
        removed_partials=removed,
    )
    report.stats = {"compression": opts.compression, **result.stats()}
    return report, result


def _close_quietly(raw: BinaryIO) -> None:
    """On success it is flushed already; on failure (a full disk) its buffer is dropped."""
    with suppress(OSError):
        raw.close()


def _discard(path: Path, fd: int) -> None:
    """Remove our partial unless it was published; then drop its flock."""
    try:
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _failed(exc: BaseException, path: Path, what: str = "archive") -> BackupFailed:
    errnum = getattr(exc, "errno", None)
    text = str(exc)
    if errnum == errno.ENOSPC or "disk is full" in text or "No space left" in text:
        return BackupFailed(
            f"no space left on the device while writing the {what} {path}; nothing was kept",
            "free space or choose another --out",
        )
    detail = getattr(exc, "strerror", None) or text
    return BackupFailed(f"cannot write the {what} {path}: {detail}; nothing was kept")


def _write_members(
    writer: _ArchiveWriter,
    store: Store,
    snapshot: Path,
    artifact_dir: Path,
    opts: BackupOptions,
    report: Report,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, int]:
    throttle = _Throttle(opts.bwlimit, should_stop)
    counts = {"rows": 0, "artifacts": 0, "orphans": 0, "db_bytes": 0, "artifact_bytes": 0}
    fd, st = open_regular(snapshot)
    try:
        writer.add_fd(DB_MEMBER, fd, st, "db", throttle)
    finally:
        os.close(fd)
    counts["db_bytes"] = st.st_size
    tree = ArtifactTree(Path(artifact_dir))
    archived: dict[str, Member] = {}
    with Store(snapshot) as snap:
        refs: list[str] = []
        for row in snap.iter_artifacts():
            counts["rows"] += 1
            relpath = _archive_row(writer, tree, row, archived, throttle, report)
            if relpath is not None:
                refs.append(relpath)
                if len(refs) >= 5000:
                    snap.add_refs(refs)
                    refs.clear()
        snap.add_refs(refs)
        counts["artifacts"] = len(archived)
        counts["artifact_bytes"] = sum(m.size for m in archived.values())
        if opts.include_orphans and os.path.isdir(artifact_dir):
            counts["orphans"] = _archive_orphans(writer, tree, snap, throttle, report)
    return counts


def _archive_row(
    writer: _ArchiveWriter,
    tree: ArtifactTree,
    row: ArtifactRow,
    archived: dict[str, Member],
    throttle: _Throttle,
    report: Report,
) -> str | None:
    """Archive one row's bytes as found; returns its relpath when it names a local file."""

    def finding(kind: str, detail: str, path: str | None = None, **extra: Any) -> None:
        report.findings.append(Finding(kind, path or row.path, detail, row.id, row.run_id, extra))

    if is_object_key(row.path, row.run_id, row.name):
        finding("unverifiable", "path is an object-store key (S3 backend); bytes not archived")
        return None
    try:
        relpath = resolve_stored_path(row.path)
    except UnsafePath as exc:
        finding("unsafe_path", f"{exc}; never opened, not archived", stored_path=row.path)
        return None
    name = artifact_member(relpath)
    member = archived.get(relpath)
    if member is None:
        parents = tree.parent_state(relpath)
        if parents != "ok":
            kind = "missing" if parents == "missing" else "not_a_file"
            detail = (
                "no file (its folder is missing); not archived"
                if parents == "missing"
                else "a parent folder is a symlink or not a folder; not followed, not archived"
            )
            finding(kind, detail, relpath)
            return relpath
        try:
            fd, st = open_regular(tree.abspath(relpath))
        except (FileNotFoundError, NotADirectoryError):
            finding("missing", "no file at the recorded path; not archived", relpath)
            return relpath
        except NotRegularFile:
            kind = _lstat_type(tree.abspath(relpath))
            finding("not_a_file", f"found a {kind}, not a regular file; not archived", relpath)
            return relpath
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                finding("not_a_file", "found a symlink, not a regular file; not archived", relpath)
            else:
                finding("unreadable", f"cannot open: {exc.strerror}; not archived", relpath)
            return relpath
        try:
            member, source = writer.add_fd(name, fd, st, "artifact", throttle)
            changed = _changed_while_read(source, st.st_size)
        finally:
            os.close(fd)
        archived[relpath] = member
        if source.error is not None:
            finding("unreadable", f"read failed: {source.error}; {changed}", relpath)
            return relpath
        if changed:
            finding("size_mismatch", changed, relpath, changed_while_read=True)
            return relpath
    if row.size is not None and member.size != row.size:
        finding(
            "size_mismatch",
            f"recorded {row.size} bytes, file has {member.size}; archived as found",
            relpath,
            expected_size=row.size,
            actual_size=member.size,
        )
    elif row.hash is None:
        finding("unverifiable", "row records no hash; archived unchecked", relpath)
    elif member.sha256 != row.hash:
        finding(
            "hash_mismatch",
            "content differs from the recorded SHA-256; archived as found",
            relpath,
            expected_sha256=row.hash,
            actual_sha256=member.sha256,
        )
    return relpath


def _changed_while_read(source: _MemberSource, size: int) -> str | None:
    if source.error is not None:
        return f"padded with zeros from byte {source.read_bytes}"
    if source.padded:
        return (
            f"file shrank from {size} to {source.read_bytes} bytes while it was archived;"
            " padded with zeros to the size in the tar header"
        )
    if source.grew():
        return f"file grew while it was archived; only its first {size} bytes are in the archive"
    return None


def _lstat_type(path: bytes) -> str:
    try:
        return file_type(os.lstat(path).st_mode)
    except OSError:
        return "file that vanished"


def _archive_orphans(
    writer: _ArchiveWriter, tree: ArtifactTree, snap: Store, throttle: _Throttle, report: Report
) -> int:
    """Files no row of the snapshot references, under orphans/ (regular files only)."""
    batch: list[tuple[str, str]] = []
    for item in scan_tree(tree.root):
        if isinstance(item, ScanEntry):
            batch.append((item.relpath, item.type))
            if len(batch) >= 5000:
                snap.add_seen(batch)
                batch.clear()
    snap.add_seen(batch)
    count = 0
    for relpath, kind in snap.iter_unreferenced():
        if kind != "file" or tree.parent_state(relpath) != "ok":
            continue
        try:
            fd, st = open_regular(tree.abspath(relpath))
        except OSError:
            continue  # gone or replaced since the scan: orphans are best effort
        try:
            _, source = writer.add_fd(ORPHAN_PREFIX + relpath, fd, st, "orphan", throttle)
            changed = _changed_while_read(source, st.st_size)
        finally:
            os.close(fd)
        count += 1
        if changed:
            # An unreferenced file changing is most likely one being written right now.
            report.findings.append(
                Finding("in_flight", ORPHAN_PREFIX + relpath, "unreferenced file " + changed)
            )
    return count


def backup_and_prune(
    store: Store,
    artifact_dir: Path,
    out_dir: Path,
    opts: BackupOptions,
    policy: RetentionPolicy | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Report, BackupResult, list[dict]]:
    """One backup, then retention by `policy`: what both `chachaml-ops backup` and the
    daemon's backup job do. The caller holds the store lock. Returns the pruned actions."""
    from chachaml_ops.restore import archive_is_intact
    from chachaml_ops.retention import prune

    report, result = run_backup(store, artifact_dir, out_dir, opts, should_stop=should_stop)
    pruned: list[dict] = []
    if policy is not None and not policy.is_empty():
        outcome = prune(
            out_dir,
            policy,
            dry_run=False,
            is_intact=archive_is_intact,
            known_intact=frozenset({result.archive.name}),
            store=store_id(store.db),
        )
        pruned = [a for a in outcome.actions if a["action"] != "kept"]
        report.actions = pruned
        report.add(outcome.findings)
    return report, result, pruned
