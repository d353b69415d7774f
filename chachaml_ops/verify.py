"""Rows + files -> findings: the integrity check, as a generator that never stops early.

Phases run cheapest first (bagit's order): each row's path is validated and its file is
stat'ed; files whose size matches are hashed on a bounded thread pool; registry entries are
cross-checked; finally the tree is walked and anti-joined against the rows in SQLite.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chachaml_ops.errors import ArtifactDirMissing, UsageError
from chachaml_ops.hashing import Digest, NotRegularFile, OutsideTree, sha256_file
from chachaml_ops.layout import (
    ArtifactTree,
    UnsafePath,
    file_type,
    is_object_key,
    prefixes,
    resolve_stored_path,
)
from chachaml_ops.report import Finding, Report, human_duration, iso_time
from chachaml_ops.scan import ScanProblem, scan_tree
from chachaml_ops.store import ArtifactRow, Store

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A file written more than this long after its row is the duplicate-log signature.
_MTIME_SLACK_MS = 1000


@dataclass(frozen=True, slots=True)
class Subset:
    """`n/t`: a deterministic slice of the rows by artifact id; 1/t ... t/t cover each once."""

    n: int
    t: int

    @classmethod
    def parse(cls, text: str) -> Subset:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise UsageError(f"bad subset {text!r}", "write it as n/t, e.g. 1/7")
        n, t = int(m.group(1)), int(m.group(2))
        if not 1 <= n <= t:
            raise UsageError(f"bad subset {text!r}", "n must be between 1 and t, e.g. 3/7")
        return cls(n, t)

    def contains(self, artifact_id: str) -> bool:
        return zlib.crc32(artifact_id.encode("utf-8", "surrogateescape")) % self.t == self.n - 1

    def __str__(self) -> str:
        return f"{self.n}/{self.t}"


@dataclass(frozen=True)
class CheckOptions:
    hash: bool = True  # False is --quick: presence and size only
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    run_ids: tuple[str, ...] = ()
    subset: Subset | None = None  # limits hashing; presence and size stay complete
    min_age: float = 3600.0  # seconds: younger unreferenced files are in flight
    rows: bool = True  # False: only collect row paths (what `orphans` needs)
    orphans: bool = True
    cross_refs: bool = True
    drop_cache: bool = False


@dataclass
class CheckStats:
    rows: int = 0
    rows_total: int = 0
    bytes_total: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    files_seen: int = 0
    orphan_bytes: int = 0
    in_flight_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False

    def as_dict(self, opts: CheckOptions) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        doc: dict[str, Any] = {
            "rows": self.rows,
            "files_seen": self.files_seen,
            "files_hashed": self.files_hashed,
            "bytes_hashed": self.bytes_hashed,
            "orphan_bytes": self.orphan_bytes,
            "duration_s": round(elapsed, 3),
            "hash_rate_mib_s": round(self.bytes_hashed / elapsed / 2**20, 1) if elapsed else 0,
            "mode": "quick" if not opts.hash else "full",
        }
        if opts.subset:
            doc["subset"] = str(opts.subset)
        if opts.run_ids:
            doc["runs"] = list(opts.run_ids)
        if self.interrupted:
            doc["interrupted"] = True
        return doc


ProgressFn = Callable[[CheckStats], None]
StopFn = Callable[[], bool]


@dataclass
class _Pending:
    row: ArtifactRow
    relpath: str
    st: os.stat_result
    future: Future[Digest] | None = None
    result: Digest | BaseException | None = None


def check_store(
    store: Store,
    artifact_dir: Path,
    opts: CheckOptions,
    stats: CheckStats,
    *,
    clock: Callable[[], float] = time.time,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Iterator[Finding]:
    """Every finding for the store, streamed. Counters accumulate in `stats`."""
    stop = should_stop or (lambda: False)
    stats.rows_total, stats.bytes_total = store.totals(opts.run_ids)
    if not os.path.isdir(artifact_dir):
        if stats.rows_total == 0 and not os.path.lexists(artifact_dir):
            return
        what = "is not a folder" if os.path.lexists(artifact_dir) else "does not exist"
        raise ArtifactDirMissing(
            f"artifact dir {artifact_dir} {what}",
            "pass --artifact-dir DIR (chachaml derives it from the DB name)",
        )
    tree = ArtifactTree(Path(artifact_dir))
    store.reset_scratch()
    yield from _check_rows(store, tree, opts, stats, progress, stop)
    if stop():
        stats.interrupted = True
        return
    if opts.cross_refs and not opts.run_ids:
        yield from _check_registry(store)
    if opts.orphans:
        yield from _check_unreferenced(store, tree, opts, stats, clock, stop)


# -- rows ---------------------------------------------------------------------------------


def _check_rows(store, tree, opts, stats, progress, stop) -> Iterator[Finding]:
    refs: list[str] = []
    window: deque[_Pending] = deque()
    pool = ThreadPoolExecutor(opts.jobs) if opts.hash and opts.jobs > 1 else None
    depth = max(4, opts.jobs * 4)
    try:
        for row in store.iter_artifacts(opts.run_ids):
            if stop():
                stats.interrupted = True
                break
            stats.rows += 1
            relpath, findings, pending = _inspect_row(row, tree, opts)
            yield from findings
            if relpath is not None:
                refs.append(relpath)
                if len(refs) >= 5000:
                    store.add_refs(refs)
                    refs.clear()
            if pending is None:
                continue
            if pool is None:
                pending.result = _hash(tree, pending, opts)
            else:
                pending.future = pool.submit(_hash, tree, pending, opts)
            window.append(pending)
            while window and (len(window) > depth or _ready(window[0])):
                yield from _finish(window.popleft(), stats, progress)
        while window:
            yield from _finish(window.popleft(), stats, progress)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    store.add_refs(refs)


def _inspect_row(
    row: ArtifactRow, tree: ArtifactTree, opts: CheckOptions
) -> tuple[str | None, list[Finding], _Pending | None]:
    """Cheap checks of one row: path safety, presence, type, size. No file is opened."""
    out: list[Finding] = []

    def finding(kind: str, detail: str, path: str | None = None, **extra: Any) -> None:
        out.append(
            Finding(kind, path if path is not None else row.path, detail, row.id, row.run_id, extra)
        )

    if not row.run_id:
        finding("run_missing", "row has no run id")
    elif row.run_known is False:
        finding("run_missing", f"run {row.run_id} is in no runs row")
    try:
        relpath = resolve_stored_path(row.path)
    except UnsafePath as exc:
        finding("unsafe_path", f"{exc}; never opened", stored_path=row.path)
        return None, out, None
    if is_object_key(row.path, row.run_id, row.name):
        finding("unverifiable", "path is an object-store key (S3 backend); bytes not on disk")
        return None, out, None
    if not opts.rows:
        return relpath, out, None

    parents = tree.parent_state(relpath)
    if parents == "missing":
        finding("missing", "no file (its folder is missing)", relpath)
        return relpath, out, None
    if parents == "not_plain":
        finding(
            "not_a_file",
            "a parent folder is a symlink or not a folder; not followed",
            relpath,
            file_type="symlink",
        )
        return relpath, out, None
    if parents == "unreadable":
        finding("unreadable", "cannot enter a parent folder", relpath)
        return relpath, out, None
    try:
        st = os.lstat(tree.abspath(relpath))
    except (FileNotFoundError, NotADirectoryError):
        finding("missing", "no file at the recorded path", relpath)
        return relpath, out, None
    except OSError as exc:
        finding("unreadable", f"cannot stat: {exc.strerror}", relpath)
        return relpath, out, None
    if not stat.S_ISREG(st.st_mode):
        kind = file_type(st.st_mode)
        finding(
            "not_a_file", f"found a {kind}, not a regular file; not opened", relpath, file_type=kind
        )
        return relpath, out, None

    missing_meta = [name for name, v in (("size", row.size), ("hash", row.hash)) if v is None]
    if missing_meta:
        finding("unverifiable", f"row records no {' or '.join(missing_meta)}", relpath)
    elif not _SHA256_HEX.match(row.hash or ""):
        finding(
            "unverifiable",
            "recorded hash is not a SHA-256 hex digest",
            relpath,
            expected_sha256=row.hash,
        )
    if row.size is not None and st.st_size != row.size:
        late = _modified_after_log(row, st)
        finding(
            "size_mismatch",
            f"recorded {row.size} bytes, file has {st.st_size}" + _late_note(late),
            relpath,
            expected_size=row.size,
            actual_size=st.st_size,
            modified_after_log=late,
            mtime=iso_time(st.st_mtime),
        )
        return relpath, out, None
    if (
        opts.hash
        and row.hash is not None
        and _SHA256_HEX.match(row.hash)
        and (opts.subset is None or opts.subset.contains(row.id))
    ):
        return relpath, out, _Pending(row, relpath, st)
    return relpath, out, None


def _ready(pending: _Pending) -> bool:
    if pending.future is None:
        return pending.result is not None
    return pending.future.done()


def _hash(tree: ArtifactTree, pending: _Pending, opts: CheckOptions) -> Digest | BaseException:
    try:
        return sha256_file(
            tree.abspath(pending.relpath),
            expected_size=pending.row.size,
            drop_cache=opts.drop_cache,
            confine=True,
        )
    except OSError as exc:
        return exc


def _finish(pending: _Pending, stats: CheckStats, progress) -> Iterator[Finding]:
    result = pending.result if pending.future is None else pending.future.result()
    row, relpath = pending.row, pending.relpath

    def finding(kind: str, detail: str, **extra: Any) -> Finding:
        return Finding(kind, relpath, detail, row.id, row.run_id, extra)

    if isinstance(result, Digest):
        stats.files_hashed += 1
        stats.bytes_hashed += result.size
        if progress:
            progress(stats)
        if row.size is not None and result.size != row.size:
            yield finding(
                "size_mismatch",
                f"recorded {row.size} bytes, read {result.size} (changed during check)",
                expected_size=row.size,
                actual_size=result.size,
            )
        elif result.sha256 != row.hash:
            late = _modified_after_log(row, pending.st)
            yield finding(
                "hash_mismatch",
                "content differs from the recorded SHA-256" + _late_note(late),
                expected_sha256=row.hash,
                actual_sha256=result.sha256,
                modified_after_log=late,
                mtime=iso_time(pending.st.st_mtime),
            )
    elif isinstance(result, FileNotFoundError):
        yield finding("missing", "file vanished during the check")
    elif isinstance(result, OutsideTree):
        yield finding(
            "not_a_file",
            "a parent folder became a symlink during the check; not read",
            file_type="symlink",
        )
    elif isinstance(result, NotRegularFile) or getattr(result, "errno", None) == errno.ELOOP:
        yield finding("not_a_file", "replaced by a symlink or special file during the check")
    elif isinstance(result, OSError):
        yield finding("unreadable", f"read failed: {result.strerror or result}")


def _modified_after_log(row: ArtifactRow, st: os.stat_result) -> bool:
    return row.created_at is not None and st.st_mtime * 1000 > row.created_at + _MTIME_SLACK_MS


def _late_note(late: bool) -> str:
    if not late:
        return ""
    return "; file modified after the row was logged (the same name logged twice?)"


# -- registry -----------------------------------------------------------------------------


def _check_registry(store: Store) -> Iterator[Finding]:
    for mv in store.iter_dangling_model_versions():
        yield Finding(
            "dangling_model_version",
            None,
            f"model {mv.model_name} version {mv.version} (stage {mv.stage}) points at "
            f"artifact {mv.artifact_id}, which has no row",
            mv.artifact_id,
            mv.run_id,
            {"model_name": mv.model_name, "version": mv.version, "stage": mv.stage},
        )


# -- unreferenced files -------------------------------------------------------------------


def _check_unreferenced(store, tree, opts, stats, clock, stop) -> Iterator[Finding]:
    batch: list[tuple[str, str]] = []
    for item in scan_tree(tree.root, opts.run_ids):
        if isinstance(item, ScanProblem):
            yield Finding("unreadable", item.relpath, f"cannot list folder: {item.error}")
            continue
        stats.files_seen += 1
        batch.append((item.relpath, item.type))
        if len(batch) >= 5000:
            store.add_seen(batch)
            batch.clear()
    store.add_seen(batch)

    now = clock()
    runs: dict[str, tuple[bool, str | None]] = {}
    for relpath, _ in store.iter_unreferenced():
        if stop():
            stats.interrupted = True
            return
        finding = classify_unreferenced(store, tree, relpath, now, opts.min_age, runs)
        if finding is None:
            continue
        if finding.kind == "orphan_file":
            stats.orphan_bytes += finding.extra.get("size", 0)
        else:
            stats.in_flight_bytes += finding.extra.get("size", 0)
        yield finding


def classify_unreferenced(
    store: Store,
    tree: ArtifactTree,
    relpath: str,
    now: float,
    min_age: float,
    runs: dict[str, tuple[bool, str | None]] | None = None,
) -> Finding | None:
    """An orphan_file or in_flight finding for a file no row references; None if it is gone
    or a row for it has appeared since (the row was in flight)."""
    try:
        st = os.lstat(tree.abspath(relpath))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Finding("unreadable", relpath, f"cannot stat: {exc.strerror}")
    if row_claims(store, relpath):
        return None
    run_id, known, status = owning_run(store, relpath, runs if runs is not None else {})
    cause = "stray" if run_id is None else "crash_leftover" if known else "deleted_run"
    age = max(0.0, now - st.st_mtime)
    kind = file_type(st.st_mode)
    extra: dict[str, Any] = {
        "size": st.st_size if kind == "file" else 0,
        "mtime": iso_time(st.st_mtime),
        "age_s": round(age, 1),
        "run_status": status,
        "file_type": kind,
    }
    if age < min_age:
        return Finding(
            "in_flight",
            relpath,
            f"no row yet, younger than the grace period ({human_duration(min_age)}); left alone",
            None,
            run_id,
            extra,
        )
    extra["cause"] = cause
    detail = {
        "crash_leftover": "bytes with no row in a known run (a crash between write and insert?)",
        "deleted_run": "its run id is in no table (left behind by retention?)",
        "stray": "not under a run folder",
    }[cause]
    if kind != "file":
        detail += f"; a {kind}"
    return Finding("orphan_file", relpath, detail, None, run_id, extra)


def row_claims(store: Store, relpath: str) -> bool:
    """Live re-check: does any row claim this file now? (Indexed lookups, one per split.)"""
    return any(store.has_row_for(run_id, name) for run_id, name in prefixes(relpath))


def owning_run(
    store: Store, relpath: str, cache: dict[str, tuple[bool, str | None]]
) -> tuple[str | None, bool, str | None]:
    """(run id, known to the store, status) of the run folder a file sits in.

    The shortest known prefix wins; an unknown run is named by the top folder.
    """
    splits = prefixes(relpath)
    for run_id, _ in splits:
        if run_id not in cache:
            cache[run_id] = store.run_status(run_id)
        known, status = cache[run_id]
        if known:
            return run_id, True, status
    return (splits[0][0], False, None) if splits else (None, False, None)


def run_check(
    store: Store,
    artifact_dir: Path,
    opts: CheckOptions,
    *,
    command: str = "verify",
    clock: Callable[[], float] = time.time,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Report:
    """Run the whole check and collect it into a Report."""
    stats = CheckStats()
    report = Report(command, {**store.describe(), "artifact_dir": str(artifact_dir)})
    report.add(
        check_store(
            store,
            artifact_dir,
            opts,
            stats,
            clock=clock,
            progress=progress,
            should_stop=should_stop,
        )
    )
    report.stats = stats.as_dict(opts)
    return report
