"""Rows + files -> findings: the integrity check, as a generator that never stops early.

Phases run cheapest first (bagit's order): each row's path is validated and its file is
stat'ed; files whose size matches are hashed on a bounded thread pool; registry entries are
cross-checked; finally the tree is walked and anti-joined against the rows in SQLite.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import stat
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

from chachaml_ops.errors import ArtifactDirMissing, Interrupted, UsageError
from chachaml_ops.hashing import (
    Digest,
    NotRegularFile,
    OutsideTree,
    RateLimit,
    open_regular,
    sha256_fd,
    sha256_file,
)
from chachaml_ops.layout import (
    ArtifactTree,
    UnsafePath,
    confined,
    file_type,
    is_object_key,
    prefixes,
    resolve_stored_path,
    run_folder_of,
)
from chachaml_ops.report import Finding, Report, human_duration, iso_time
from chachaml_ops.scan import ScanProblem, scan_unnamed
from chachaml_ops.state import MarkReader, StateDB, VerifyMark, default_state_dir, store_key
from chachaml_ops.store import ArtifactRow, RunAggregate, Store

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
    # Incremental verification (marks kept in the state dir, never in the chachaml DB).
    max_age: float | None = None  # skip files verified good this recently and unchanged since
    max_duration: float | None = None  # hashing budget (s); least recently verified first
    state_dir: Path | None = None  # where marks live; default_state_dir() if max_* is set
    max_rate: float | None = None  # bytes/s ceiling on hashing reads, across all workers
    processes: bool = True  # fork worker processes when that is faster (many small files)
    fast_path: bool = True  # plain runs checked per run (False: every row one by one)

    @property
    def incremental(self) -> bool:
        """Whether this check reads and records verify marks."""
        return self.hash and (
            self.state_dir is not None or self.max_age is not None or self.max_duration is not None
        )


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
    # incremental verification
    files_skipped: int = 0  # verified good within max_age and unchanged
    bytes_skipped: int = 0
    files_deferred: int = 0  # left for a later run by max_duration
    bytes_deferred: int = 0
    budget_exhausted: bool = False
    oldest_verified: float | None = None  # over the rows that can be hashed
    files_never_verified: int = 0
    bytes_never_verified: int = 0
    workers: str = "threads"

    def merge(self, other: CheckStats) -> None:
        """Add a batch's counters (from a worker) to these."""
        for name in (
            "rows",
            "files_hashed",
            "bytes_hashed",
            "files_seen",
            "files_skipped",
            "bytes_skipped",
            "files_deferred",
            "bytes_deferred",
            "files_never_verified",
            "bytes_never_verified",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.budget_exhausted |= other.budget_exhausted
        if other.oldest_verified is not None:
            self.oldest_verified = min(self.oldest_verified or math.inf, other.oldest_verified)

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
            "workers": self.workers,
        }
        if opts.subset:
            doc["subset"] = str(opts.subset)
        if opts.run_ids:
            doc["runs"] = list(opts.run_ids)
        if opts.incremental:
            doc.update(
                files_skipped=self.files_skipped,
                bytes_skipped=self.bytes_skipped,
                files_deferred=self.files_deferred,
                bytes_deferred=self.bytes_deferred,
                budget_exhausted=self.budget_exhausted,
                oldest_verified=(
                    None if self.oldest_verified is None else iso_time(self.oldest_verified)
                ),
                files_never_verified=self.files_never_verified,
                bytes_never_verified=self.bytes_never_verified,
            )
        if self.interrupted:
            doc["interrupted"] = True
        return doc


ProgressFn = Callable[[CheckStats], None]
StopFn = Callable[[], bool]


@dataclass(slots=True)
class _Pending:
    row: ArtifactRow
    relpath: str
    st: os.stat_result
    abspath: bytes
    future: Future[Digest] | None = None
    result: Digest | BaseException | None = None


@dataclass(frozen=True)
class _Batch:
    """A unit of work: the rows of some runs, and the top-level folders to scan for orphans.

    Folder names come only from the directory listing, never from the DB, so a run id such as
    `..` is never turned into a path to walk."""

    runs: tuple[str, ...]
    folders: tuple[str, ...]


@dataclass
class _BatchResult:
    findings: list[Finding]
    stats: CheckStats
    candidates: list[tuple[str, str]]  # (relpath, type) on disk that no row of the batch names
    good: list[VerifyMark]
    bad: list[str]  # artifact ids whose marks no longer hold


@dataclass
class _Context:
    """Everything a batch needs; inherited by forked workers, which open their own store."""

    db: Path
    busy_timeout_ms: int
    tree: ArtifactTree
    opts: CheckOptions
    clock: Callable[[], float]
    deadline: float | None
    throttle: RateLimit | None
    marks_key: str | None
    state_dir: Path | None
    store: Store | None = None
    marks: MarkReader | None = None
    pid: int = 0
    progress: ProgressFn | None = None  # inline only: workers report per batch
    root_problem: str | None = None  # the artifact dir itself could not be listed
    stop: StopFn | None = None  # asked per chunk inside a file too (a 20 GiB file is minutes)
    bytes_total: int = 0  # recorded sizes of the rows to check

    def open(self) -> _Context:
        """Per-process connections: SQLite handles must never cross a fork."""
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.store = Store(self.db, busy_timeout_ms=self.busy_timeout_ms)
            if self.marks_key is not None and self.state_dir is not None:
                self.marks = MarkReader(self.state_dir, self.marks_key)
        return self


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
    counts = dict(store.run_row_counts(opts.run_ids))  # from the index alone
    stats.rows_total = sum(counts.values())
    if opts.hash and opts.rows:  # bytes to hash: reads every row, so only when hashing
        stats.bytes_total = store.totals(opts.run_ids)[1]
    if not os.path.isdir(artifact_dir):
        if stats.rows_total == 0 and not os.path.lexists(artifact_dir):
            return
        what = "is not a folder" if os.path.lexists(artifact_dir) else "does not exist"
        raise ArtifactDirMissing(
            f"artifact dir {artifact_dir} {what}",
            "set the artifact dir (--artifact-dir, or artifact_dir in the config);"
            " chachaml derives it from the DB name",
        )
    tree = ArtifactTree(Path(artifact_dir))
    store.reset_scratch()
    state = None
    marks_key = None
    state_dir = None
    if opts.incremental:
        state_dir = Path(opts.state_dir or default_state_dir())
        state = StateDB(state_dir)  # creates the marks table before any worker reads it
        marks_key = store_key(store.db)
    try:
        ctx = _Context(
            db=store.db,
            busy_timeout_ms=store.busy_timeout_ms,
            tree=tree,
            opts=opts,
            clock=clock,
            deadline=None if opts.max_duration is None else clock() + opts.max_duration,
            throttle=RateLimit(opts.max_rate) if opts.max_rate else None,
            marks_key=marks_key,
            state_dir=state_dir,
            stop=should_stop,
            bytes_total=stats.bytes_total,
        )
        strays, batches = _plan(counts, tree, opts, ctx)
        if ctx.root_problem is not None:
            yield Finding("unreadable", "", f"cannot list folder: {ctx.root_problem}")
        store.add_seen(strays)
        stats.files_seen += len(strays)
        ctx.progress = progress
        for result in _run_batches(ctx, batches, stats, stop):
            yield from result.findings
            if result.stats is not stats:
                stats.merge(result.stats)
            if state is not None and marks_key is not None:
                state.put_marks(marks_key, result.good)
                state.drop_marks(marks_key, result.bad)
            if result.candidates:
                store.add_seen(result.candidates)
            if progress:
                progress(stats)
    finally:
        if state is not None:
            state.close()
    if stats.interrupted or stop():
        stats.interrupted = True
        return
    if opts.cross_refs and not opts.run_ids:
        yield from _check_registry(store)
    if opts.orphans:
        yield from _check_unreferenced(store, tree, opts, stats, clock, stop)


# -- planning -----------------------------------------------------------------------------


def _plan(
    counts: dict[str, int], tree: ArtifactTree, opts: CheckOptions, ctx: _Context
) -> tuple[list[tuple[str, str]], list[_Batch]]:
    """Top-level strays, and the runs/folders (`counts`: rows per run) cut into batches of
    roughly equal row counts."""
    folders: set[str] = set()
    strays: list[tuple[str, str]] = []
    if opts.orphans:
        wanted = set(opts.run_ids)
        try:
            it = os.scandir(tree.root)
        except OSError as exc:
            ctx.root_problem = exc.strerror or str(exc)
            it = None
        with it or contextlib.nullcontext(()) as entries:
            for entry in entries:
                if wanted and entry.name not in wanted:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.add(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        strays.append((entry.name, "file"))
                    elif entry.is_symlink():
                        strays.append((entry.name, "symlink"))
                    else:
                        strays.append((entry.name, "special"))
                except FileNotFoundError:
                    continue
    units = sorted(set(counts) | folders)
    if opts.max_duration is not None and ctx.marks_key is not None and ctx.state_dir is not None:
        # Least recently verified first: runs with never-verified rows, then by oldest mark.
        reader = MarkReader(ctx.state_dir, ctx.marks_key)
        try:
            summary = reader.run_summary()
        finally:
            reader.close()

        def priority(unit: str) -> float:
            held, oldest = summary.get(unit, (0, 0.0))
            return 0.0 if held < counts.get(unit, 0) else oldest

        units.sort(key=priority)
    total = sum(counts.values())
    if _hashes_on_threads(opts, ctx.bytes_total, total):
        # One process: batches only bound memory, and each ends by waiting for its hashes,
        # so fewer, larger batches keep the threads busy while rows are being stat'ed.
        target = _MAX_BATCH_ROWS
    else:  # enough batches to keep every worker process busy to the end
        target = min(_MAX_BATCH_ROWS, max(_MIN_BATCH_ROWS, total // max(1, opts.jobs * 8)))
    batches: list[_Batch] = []
    runs: list[str] = []
    scan: list[str] = []
    size = 0
    for unit in units:
        if unit in counts:
            runs.append(unit)
            size += counts[unit]
        if unit in folders:
            scan.append(unit)
            size += 1
        if size >= target or len(runs) >= 256 or len(scan) >= 256:
            batches.append(_Batch(tuple(runs), tuple(scan)))
            runs, scan, size = [], [], 0
    if runs or scan:
        batches.append(_Batch(tuple(runs), tuple(scan)))
    return strays, batches


def _foreign_refs(store: Store) -> dict[str, set[str]]:
    """Files referenced by rows of other runs (paths not under their own run folder), by the
    top-level folder they sit in ('' for top-level files). Usually empty."""
    out: dict[str, set[str]] = {}
    for run_id, name, path in store.iter_foreign_paths():
        if is_object_key(path, run_id, name):
            continue
        try:
            relpath = resolve_stored_path(path)
        except UnsafePath:
            continue
        out.setdefault(run_folder_of(relpath) or "", set()).add(relpath)
    return out


def _use_processes(ctx: _Context, batches: list[_Batch], stats: CheckStats) -> bool:
    opts = ctx.opts
    if not opts.processes or opts.jobs < 2 or len(batches) < 2:
        return False
    if _hashes_on_threads(opts, stats.bytes_total, stats.rows_total):
        return False
    import multiprocessing  # here, not at the top: most runs never fork (7 ms of start-up)

    return "fork" in multiprocessing.get_all_start_methods()


def _hashes_on_threads(opts: CheckOptions, bytes_total: int, rows_total: int) -> bool:
    """Threads already hash large files in parallel (hashlib drops the GIL); processes pay
    off where Python's per-file work dominates: quick checks and many small files."""
    return opts.hash and opts.rows and bytes_total / max(rows_total, 1) >= _THREADS_FROM_MEAN_SIZE


def _run_batches(
    ctx: _Context, batches: list[_Batch], stats: CheckStats, stop: StopFn
) -> Iterator[_BatchResult]:
    if _use_processes(ctx, batches, stats):
        stats.workers = "processes"
        global _WORKER_CONTEXT
        _WORKER_CONTEXT = ctx
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(ctx.opts.jobs, _worker_init)
        try:
            for result in pool.imap(_worker_batch, batches):
                yield result
                if stop():
                    stats.interrupted = True
                    return
        finally:
            pool.terminate()
            pool.join()
            _WORKER_CONTEXT = None
        return
    threads = ThreadPoolExecutor(ctx.opts.jobs) if ctx.opts.hash and ctx.opts.jobs > 1 else None
    try:
        for batch in batches:
            yield _check_batch(ctx.open(), batch, threads, stop, stats)
            if stop():
                stats.interrupted = True
                return
    finally:
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
        if ctx.store is not None:
            ctx.store.close()
        if ctx.marks is not None:
            ctx.marks.close()


_WORKER_CONTEXT: _Context | None = None
_THREADS_FROM_MEAN_SIZE = 1 << 20
# Big enough that a fork and a result pickle cost little next to the batch's work.
_MIN_BATCH_ROWS = 500
_MAX_BATCH_ROWS = 20_000


def _worker_init() -> None:
    # A host's handlers (the daemon's SIGTERM flag) must not keep a worker alive when the
    # pool terminates it; Ctrl-C goes to the parent, which then terminates the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_batch(batch: _Batch) -> _BatchResult:
    assert _WORKER_CONTEXT is not None
    _WORKER_CONTEXT.progress = None
    _WORKER_CONTEXT.stop = None  # the parent's flag does not reach a forked copy
    return _check_batch(_WORKER_CONTEXT.open(), batch, None, lambda: False, CheckStats())


# -- rows ---------------------------------------------------------------------------------


def _check_batch(
    ctx: _Context,
    batch: _Batch,
    pool: ThreadPoolExecutor | None,
    stop: StopFn,
    stats: CheckStats,
) -> _BatchResult:
    """Check a batch's rows, then list its folders for files none of them names."""
    opts, tree, store = ctx.opts, ctx.tree, ctx.store
    assert store is not None
    res = _BatchResult([], stats, [], [], [])
    refs: set[str] = set()
    marks = ctx.marks.for_runs(batch.runs) if ctx.marks is not None and batch.runs else {}
    slow_runs, folders = batch.runs, batch.folders
    retry: dict[str, set[str]] = {}
    if batch.runs and opts.fast_path and opts.max_duration is None:
        # (A time budget orders rows by their marks, which only the per-row path does.)
        slow_runs, folders, retry = _check_plain_runs(ctx, batch, res, marks, stop, pool)
        if stats.interrupted:
            return res
    rows: Iterable[ArtifactRow] = ()
    if slow_runs and not opts.rows:
        rows = _lean_rows(store, slow_runs, refs, stats)
    elif slow_runs:
        rows = store.iter_artifacts(slow_runs)
        if retry:
            rows = (r for r in rows if r.run_id not in retry or r.name in retry[r.run_id])
    if opts.max_duration is not None and marks:
        # Within the batch too, the least recently verified rows go first.
        rows = sorted(rows, key=lambda r: marks[r.id].verified_at if r.id in marks else 0.0)
    window: deque[_Pending] = deque()
    depth = max(4, opts.jobs * 4)
    now = ctx.clock()
    for row in rows:
        if stop():
            stats.interrupted = True
            break
        stats.rows += 1
        relpath, findings, pending = _inspect_row(row, tree, opts)
        res.findings.extend(findings)
        if relpath is not None:
            refs.add(relpath)
        if pending is None:
            if findings and row.id in marks:
                res.bad.append(row.id)
            continue
        mark = marks.get(row.id)
        if ctx.marks is not None:
            _count_coverage(stats, row, mark)
        if opts.subset is not None and not opts.subset.contains(row.id):
            continue
        if mark is not None and opts.max_age is not None and _still_good(mark, pending, now, opts):
            stats.files_skipped += 1
            stats.bytes_skipped += pending.st.st_size
            continue
        if ctx.deadline is not None and (stats.budget_exhausted or ctx.clock() >= ctx.deadline):
            stats.budget_exhausted = True
            stats.files_deferred += 1
            stats.bytes_deferred += pending.st.st_size
            continue
        if pool is None:  # hashed in order right here: no window to keep
            pending.result = _hash(tree, pending, opts, ctx.throttle, ctx.stop)
            _settle(ctx, pending, marks, res)
            continue
        pending.future = pool.submit(_hash, tree, pending, opts, ctx.throttle, ctx.stop)
        window.append(pending)
        while window and (len(window) > depth or _ready(window[0])):
            _settle(ctx, window.popleft(), marks, res)
    while window:
        _settle(ctx, window.popleft(), marks, res)
    if folders:
        seen, unnamed = scan_unnamed(tree.root, folders, refs)
        stats.files_seen += seen
        for item in unnamed:
            if isinstance(item, ScanProblem):
                res.findings.append(
                    Finding("unreadable", item.relpath, f"cannot list folder: {item.error}")
                )
            else:
                res.candidates.append((item.relpath, item.type))
    return res


# -- plain runs: the fast path ------------------------------------------------------------
#
# Nearly every run chachaml writes is "plain": each row's path is `<run_id>/<name>`, a file
# inside the run folder, with an integer size and a SHA-256 text. Such a run is read from
# SQLite as one aggregate row; its folders are opened with O_NOFOLLOW and listed once each;
# each file is stat'ed or opened by its base name relative to its folder's descriptor, so
# no path is resolved twice and no per-row object is built. The fast path never writes a
# finding about a row: any row whose check is not clean is handed back, by name, to the
# per-row path above, which reports it exactly as it would have. A run that is not plain in
# every way, or whose folders cannot all be listed, goes that path whole.

_NOT_A_NAME = frozenset({"", ".", ".."})
_HEX_LIST = re.compile(r"[0-9a-fA-F]{64}(?:,[0-9a-fA-F]{64})*")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ST_SIZE = attrgetter("st_size")
_ST_MODE = attrgetter("st_mode")
_INLINE_BELOW = 1 << 18  # smaller files are hashed on the calling thread
_PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096


@dataclass(slots=True)
class _PlainRun:
    run_id: str
    ids: list[str]
    names: list[str]  # relative to the run folder; may contain '/'
    sizes: list[int]
    hashes: list[str]  # lowercase hex
    # folder inside the run ('' is the run folder) -> (row indexes, their base names)
    folders: dict[str, tuple[list[int], list[str]]]
    name_set: set[str]  # all names, built once (the uniqueness check needs it anyway)


def _plain_run(
    agg: RunAggregate, known: set[str] | None, detail: bool, hashing: bool, root_len: int = 0
) -> _PlainRun | None:
    """The run's rows as parallel lists when every one of them is plain, else None. Sizes
    and hashes are checked with `detail`; ids and hashes are kept only for `hashing`."""
    run_id, n = agg.run_id, agg.count
    if agg.null_names:  # group_concat skips NULLs: a NUL inside another value could fill in
        return None
    if run_id in _NOT_A_NAME or "/" in run_id or "\x00" in run_id:
        return None
    if known is not None and run_id not in known:
        return None
    names = agg.names.split("\x00")
    name_set = set(names)
    if len(names) != n or len(name_set) != n or not _NOT_A_NAME.isdisjoint(name_set):
        return None
    prefix = run_id + "/"
    if agg.paths != prefix + ("\x00" + prefix).join(names):
        return None
    # Paths past PATH_MAX: the per-row path says it cannot reach them; descriptors could.
    if root_len + 4 * (len(run_id) + max(map(len, names))) + 2 >= _PATH_MAX:
        return None
    folders = _folders_of(names, "/" in agg.names)
    if folders is None:
        return None
    ids: list[str] = []
    if hashing:
        ids = agg.ids.split("\x00") if agg.ids is not None else []
        if len(ids) != n:
            return None
    if not detail:
        return _PlainRun(run_id, ids, names, [], [], folders, name_set)
    if agg.sizes is None or agg.hashes is None or agg.odd_hashes or agg.null_sizes:
        return None
    if len(agg.hashes) != 65 * n - 1 or not _HEX_LIST.fullmatch(agg.hashes):
        return None
    try:
        sizes = list(map(int, agg.sizes.split(",")))
    except ValueError:
        return None
    if len(sizes) != n:
        return None
    hashes = agg.hashes.lower().split(",") if hashing else []
    return _PlainRun(run_id, ids, names, sizes, hashes, folders, name_set)


def _folders_of(names: list[str], nested: bool) -> dict[str, tuple[list[int], list[str]]] | None:
    """Rows grouped by the folder they sit in; None if a name has an empty, '.' or '..'
    segment (the per-row path normalises or refuses those)."""
    if not nested:
        return {"": (list(range(len(names))), names)}
    folders: dict[str, tuple[list[int], list[str]]] = {}
    for i, name in enumerate(names):
        if _NOT_A_NAME.intersection(name.split("/")):  # 'a/', '/a', 'a//b', 'a/.', 'a/..'
            return None
        folder, _, base = name.rpartition("/")
        idx, bases = folders.setdefault(folder, ([], []))
        idx.append(i)
        bases.append(base)
    return folders


@dataclass(slots=True)
class _PlainFile:
    """A file of a plain run handed to the hasher, with what settling its result needs."""

    run_id: str
    aid: str
    name: str
    size: int
    sha: str
    st: os.stat_result
    fresh: bool  # no mark for this hash yet: counted as never verified
    suspects: set[str]  # its run's


def _check_plain_runs(
    ctx: _Context,
    batch: _Batch,
    res: _BatchResult,
    marks: dict[str, VerifyMark],
    stop: StopFn,
    pool: ThreadPoolExecutor | None,
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, set[str]]]:
    """Check the batch's plain runs. Returns what is left for the per-row path: the runs to
    read row by row, the folders to scan, and per run the names of the rows to re-check."""
    opts, store = ctx.opts, ctx.store
    assert store is not None
    known = store.known_runs(batch.runs) if store.has_runs else None
    plain: dict[str, _PlainRun] = {}
    hashing = opts.rows and opts.hash
    aggregates = store.run_aggregates(batch.runs, ids=hashing, detail=opts.rows)
    groups = Counter(agg.run_id for agg in aggregates)
    for agg in aggregates:
        if groups[agg.run_id] > 1:  # the id stored both as TEXT and as a BLOB: per-row path
            continue
        run = _plain_run(agg, known, opts.rows, hashing, len(ctx.tree.root_b))
        if run is not None:
            plain[run.run_id] = run
    folders = set(batch.folders)
    retry: dict[str, set[str]] = {}
    try:
        root_fd = os.open(ctx.tree.root_b, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError:
        return batch.runs, batch.folders, {}
    done: set[str] = set()
    hasher = _PlainHasher(ctx, res, pool)
    try:
        for run in plain.values():
            if stop():
                res.stats.interrupted = True
                break
            suspects = _check_plain_run(
                ctx, run, root_fd, res, marks, run.run_id in folders, hasher
            )
            if suspects is None:
                continue
            done.add(run.run_id)
            folders.discard(run.run_id)
            retry[run.run_id] = suspects  # filled in as hashes settle; empty ones dropped below
            if res.stats.interrupted:
                break
            if ctx.progress is not None:
                ctx.progress(res.stats)
        hasher.drain()
    finally:
        hasher.abandon()
        os.close(root_fd)
    if not hashing:  # (hashing counts each row as it settles, so a stop counts what was done)
        for run_id in done:  # rows handed back are counted when the per-row path checks them
            res.stats.rows += len(plain[run_id].names) - len(retry[run_id])
    retry = {run_id: names for run_id, names in retry.items() if names}
    slow = tuple(r for r in batch.runs if r not in done or r in retry)
    return slow, tuple(f for f in batch.folders if f in folders), retry


# (regular files, other non-folder entries -> 'symlink'/'special', subfolders)
_Listing = tuple[set[str], dict[str, str], set[str]]


def _check_plain_run(
    ctx: _Context,
    run: _PlainRun,
    root_fd: int,
    res: _BatchResult,
    marks: dict[str, VerifyMark],
    scan: bool,
    hasher: _PlainHasher,
) -> set[str] | None:
    """One plain run through its folders' descriptors. Returns the names of rows the per-row
    path must re-check (empty when all is well), or None when the whole run must go that way
    (a folder cannot be opened or listed, or a row names a folder)."""
    try:
        dfd = os.open(run.run_id, _DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        return None
    try:
        wanted = None if scan else set(run.folders)
        room = _PATH_MAX - len(ctx.tree.root_b) - len(os.fsencode(run.run_id)) - 2
        listings = _list_run_tree(dfd, wanted, room)
        if listings is None:
            return None
        if list(run.folders) == [""]:  # all in the run folder itself
            named = {"": run.name_set}
        else:
            named = {folder: set(bases) for folder, (_, bases) in run.folders.items()}
        for folder, bases in named.items():
            listing = listings.get(folder)
            if listing is not None and not listing[2].isdisjoint(bases):
                return None
        opts, stats = ctx.opts, res.stats
        suspects: set[str] = set()
        if opts.rows:
            for folder, (idx, bases) in run.folders.items():
                listing = listings.get(folder)
                # Not listed as a regular file: missing, a symlink, a FIFO (never opened here),
                # or its folder is missing or not a folder. The per-row path says which.
                absent = bases if listing is None else named[folder] - listing[0]
                if absent:
                    prefix = folder + "/" if folder else ""
                    suspects.update(prefix + base for base in absent)
                if listing is None:
                    continue
                gfd = dfd if not folder else _open_below(dfd, folder)
                if gfd is None:
                    suspects.update(run.names[i] for i in idx)
                    continue
                try:
                    if opts.hash:
                        where = ctx.tree.abspath(f"{run.run_id}/{folder}" if folder else run.run_id)
                        _hash_plain_folder(
                            ctx, run, idx, bases, gfd, where, marks, suspects, hasher
                        )
                    else:
                        _stat_plain_folder(run, idx, bases, gfd, suspects)
                finally:
                    if gfd != dfd:
                        os.close(gfd)
        if scan:
            for folder, (files, others, _) in listings.items():
                stats.files_seen += len(files) + len(others)
                prefix = f"{run.run_id}/{folder}/" if folder else run.run_id + "/"
                mine = named.get(folder, set())
                res.candidates.extend((prefix + name, "file") for name in files - mine)
                res.candidates.extend(
                    (prefix + name, kind) for name, kind in others.items() if name not in mine
                )
        return suspects
    finally:
        os.close(dfd)


def _list_run_tree(dfd: int, wanted: set[str] | None, room: int) -> dict[str, _Listing] | None:
    """Listings of the run folder and the folders below it, by path inside the run ('' for
    the run folder); with `wanted`, only those folders and the ones on the way to them.
    Folders are opened with O_NOFOLLOW (a symlink is an entry, not a folder). None if a
    folder cannot be opened or listed, or its path would be longer than `room` bytes (the
    per-row path reports those)."""
    out: dict[str, _Listing] = {}
    try:
        stack: list[tuple[str, int]] = [("", os.dup(dfd))]
    except OSError:
        return None
    try:
        while stack:
            rel, fd = stack.pop()
            try:
                listing = _list_folder(fd)
                if listing is None:
                    return None
                out[rel] = listing
                for sub in listing[2]:
                    child = f"{rel}/{sub}" if rel else sub
                    if wanted is not None and not any(
                        w == child or w.startswith(child + "/") for w in wanted
                    ):
                        continue
                    if len(os.fsencode(child)) + 256 >= room:
                        return None
                    try:
                        stack.append((child, os.open(sub, _DIR_FLAGS, dir_fd=fd)))
                    except FileNotFoundError:
                        continue
                    except OSError:
                        return None
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)
    return out


def _open_below(dfd: int, folder: str) -> int | None:
    """A folder inside the run, opened one segment at a time without following links."""
    fd = dfd
    try:
        for part in folder.split("/"):
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            if fd != dfd:
                os.close(fd)
            fd = nxt
    except OSError:
        if fd != dfd:
            os.close(fd)
        return None
    return fd


def _list_folder(dfd: int) -> _Listing | None:
    """(regular files, other entries -> 'symlink'/'special', subfolders), types from the
    directory listing itself; None if the folder cannot be listed."""
    files: set[str] = set()
    others: dict[str, str] = {}
    subdirs: set[str] = set()
    add_file = files.add  # a million entries: the per-entry lookups are what this costs
    try:
        with os.scandir(dfd) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False):  # the common case first
                        add_file(e.name)
                    elif e.is_dir(follow_symlinks=False):
                        subdirs.add(e.name)
                    else:
                        others[e.name] = "symlink" if e.is_symlink() else "special"
                except FileNotFoundError:
                    continue
    except OSError:
        return None
    return files, others, subdirs


def _stat_plain_folder(
    run: _PlainRun, idx: list[int], bases: list[str], fd: int, suspects: set[str]
) -> None:
    """--quick: presence and size by one lstat per file, relative to its folder; the loop and
    the comparison run in C unless something differs."""
    sizes = run.sizes if len(idx) == len(run.names) else [run.sizes[i] for i in idx]
    lstat = partial(os.lstat, dir_fd=fd)
    if not suspects:
        try:
            sts = list(map(lstat, bases))
            if list(map(_ST_SIZE, sts)) == sizes and all(map(stat.S_ISREG, map(_ST_MODE, sts))):
                return
        except OSError:
            pass
    for i, base, size in zip(idx, bases, sizes, strict=True):
        name = run.names[i]
        if name in suspects:
            continue
        try:
            st = lstat(base)
        except OSError:
            suspects.add(name)
            continue
        if st.st_size != size or not stat.S_ISREG(st.st_mode):
            suspects.add(name)


def _hash_plain_folder(
    ctx: _Context,
    run: _PlainRun,
    idx: list[int],
    bases: list[str],
    fd: int,
    where: bytes,
    marks: dict[str, VerifyMark],
    suspects: set[str],
    hasher: _PlainHasher,
) -> None:
    """Full verify, relative to the file's folder (`fd`, which was at `where`): skip what its
    mark vouches for (one lstat), open and hash the rest (fstat of the open file). Anything
    not clean joins `suspects`. Small files are hashed here and their results held until the
    folder is seen to be still in the tree (one readlink per folder, where the per-row path
    needs one per file); large ones go to the pool, which checks each file."""
    opts, stats = ctx.opts, hasher.res.stats
    subset, max_age, now = opts.subset, opts.max_age, ctx.clock()
    tracking = ctx.marks is not None
    held: list[tuple[_PlainFile, Digest | BaseException]] = []
    try:
        for i, base in zip(idx, bases, strict=True):
            aid, name, size, sha = run.ids[i], run.names[i], run.sizes[i], run.hashes[i]
            if name in suspects:
                continue
            if stats.interrupted or (ctx.stop is not None and ctx.stop()):
                stats.interrupted = True
                return
            mark = marks.get(aid)
            fresh = mark is None or mark.sha256 != sha
            file_fd = -1
            try:
                if fresh or max_age is None:
                    file_fd, st = open_regular(base, dir_fd=fd)
                else:  # its mark may vouch for it: no need to open it yet
                    st = os.lstat(base, dir_fd=fd)
            except OSError:
                suspects.add(name)
                continue
            if st.st_size != size or not stat.S_ISREG(st.st_mode):
                suspects.add(name)
            elif tracking and fresh:
                stats.files_never_verified += 1
                stats.bytes_never_verified += size
            elif tracking and (
                stats.oldest_verified is None or mark.verified_at < stats.oldest_verified
            ):
                stats.oldest_verified = mark.verified_at
            skip = name in suspects or (subset is not None and not subset.contains(aid))
            if (
                not skip
                and not fresh
                and max_age is not None
                and _mark_holds(mark, sha, st, now, max_age)
            ):
                stats.files_skipped += 1
                stats.bytes_skipped += size
                skip = True
            if skip:
                if file_fd >= 0:
                    os.close(file_fd)
                if name not in suspects:  # checked: present, right size (and vouched for)
                    stats.rows += 1
                continue
            if file_fd < 0:
                try:
                    file_fd, st = open_regular(base, dir_fd=fd)
                except OSError:
                    suspects.add(name)
                    continue
                if st.st_size != size:
                    os.close(file_fd)
                    suspects.add(name)
                    continue
            item = _PlainFile(run.run_id, aid, name, size, sha, st, fresh, suspects)
            if hasher.pool is None or size < _INLINE_BELOW:
                # A small file costs less to hash than to hand to a thread (which also needs the
                # GIL back to start); only large reads, where hashlib lets go of the GIL, go there.
                held.append((item, hasher.hash(file_fd, item)))
            else:
                hasher.submit(file_fd, item, where + b"/" + os.fsencode(base))
    finally:
        inside = confined(fd, where)
        for item, result in held:
            hasher.settle(item, result if inside else OutsideTree(0, "folder left the tree"))


class _PlainHasher:
    """Hashes plain-run files inline or on the batch's thread pool (a bounded window), and
    settles each result: counted and marked when clean, a suspect otherwise."""

    def __init__(self, ctx: _Context, res: _BatchResult, pool: ThreadPoolExecutor | None):
        self.ctx, self.res, self.pool = ctx, res, pool
        self.window: deque[tuple[_PlainFile, Future[Digest | BaseException], int]] = deque()
        self.depth = max(4, ctx.opts.jobs * 4)

    def submit(self, fd: int, item: _PlainFile, path: bytes) -> None:
        """Hash on the pool; `path` is where the file must still be when it has been read."""
        assert self.pool is not None
        self.window.append((item, self.pool.submit(self.hash, fd, item, path), fd))
        while self.window and (len(self.window) > self.depth or self.window[0][1].done()):
            done, future, _ = self.window.popleft()
            self.settle(done, future.result())

    def hash(self, fd: int, item: _PlainFile, path: bytes | None = None) -> Digest | BaseException:
        """Hash an open file and close it; with `path`, confined to it like sha256_file."""
        ctx = self.ctx
        try:
            digest = sha256_fd(
                fd,
                item.st,
                expected_size=item.size,
                drop_cache=ctx.opts.drop_cache,
                throttle=ctx.throttle,
                should_stop=ctx.stop,
                name=item.name,
            )
            if path is not None and not confined(fd, path):
                return OutsideTree(0, "reached through a folder that left the tree")
            return digest
        except (OSError, Interrupted) as exc:
            return exc
        finally:
            os.close(fd)

    def settle(self, item: _PlainFile, result: Digest | BaseException) -> None:
        stats, tracking = self.res.stats, self.ctx.marks is not None
        if isinstance(result, Interrupted):
            stats.interrupted = True  # stopped part way: no finding, the mark stays as it was
            return
        if tracking and item.fresh:  # verified now, or re-checked (and counted) row by row
            stats.files_never_verified -= 1
            stats.bytes_never_verified -= item.size
        if not isinstance(result, Digest) or result.size != item.size or result.sha256 != item.sha:
            item.suspects.add(item.name)  # re-hashed and reported by the per-row path
            return
        stats.rows += 1
        stats.files_hashed += 1
        stats.bytes_hashed += item.size
        if tracking:
            st = item.st
            self.res.good.append(
                VerifyMark(
                    item.aid,
                    item.run_id,
                    item.size,
                    st.st_mtime_ns,
                    st.st_ino,
                    st.st_ctime_ns,
                    item.sha,
                    self.ctx.clock(),
                )
            )
        if self.ctx.progress is not None:
            self.ctx.progress(stats)

    def drain(self) -> None:
        while self.window:
            item, future, _ = self.window.popleft()
            self.settle(item, future.result())

    def abandon(self) -> None:
        """On the way out after an error or a stop: cancel every queued job first (closing its
        descriptor), then wait only for those already reading."""
        running = []
        while self.window:
            _, future, fd = self.window.popleft()
            if future.cancel():
                os.close(fd)
            else:
                running.append(future)
        for future in running:
            future.exception()


def _lean_rows(
    store: Store, runs: tuple[str, ...], refs: set[str], stats: CheckStats
) -> Iterator[ArtifactRow]:
    """Orphans only need each row's resolved path: add the plain ones to `refs` directly and
    yield only rows that may produce a finding (unknown run, object key, unsafe path)."""
    known = store.known_runs(runs)
    has_runs = store.has_runs
    for aid, run_id, name, path in store.iter_row_paths(runs):
        run_known = run_id in known
        if run_known and not is_object_key(path, run_id, name):
            try:
                refs.add(resolve_stored_path(path))
                stats.rows += 1
                continue
            except UnsafePath:
                pass
        yield ArtifactRow(
            aid,
            run_id,
            name,
            path,
            None,
            None,
            None,
            run_known if has_runs else None,
            None,
        )


def _count_coverage(stats: CheckStats, row: ArtifactRow, mark: VerifyMark | None) -> None:
    """Coverage as it stands before this run's hashing; _settle moves rows it verifies."""
    if mark is None or mark.sha256 != row.hash:
        stats.files_never_verified += 1
        stats.bytes_never_verified += row.size or 0
    elif stats.oldest_verified is None or mark.verified_at < stats.oldest_verified:
        stats.oldest_verified = mark.verified_at


def _still_good(mark: VerifyMark, pending: _Pending, now: float, opts: CheckOptions) -> bool:
    return opts.max_age is not None and _mark_holds(
        mark, pending.row.hash, pending.st, now, opts.max_age
    )


def _mark_holds(
    mark: VerifyMark, sha: str | None, st: os.stat_result, now: float, max_age: float
) -> bool:
    """Verified good within max_age, for this recorded hash, and the file looks the same."""
    return (
        now - mark.verified_at <= max_age
        and mark.sha256 == sha
        and mark.size == st.st_size
        and mark.mtime_ns == st.st_mtime_ns
        and mark.ctime_ns == st.st_ctime_ns
        and mark.inode == st.st_ino
    )


def _settle(ctx: _Context, pending: _Pending, marks: dict[str, VerifyMark], res) -> None:
    result = pending.result if pending.future is None else pending.future.result()
    if isinstance(result, Interrupted):
        # Stopped part way through this file: no finding, and its mark stays as it was.
        res.stats.interrupted = True
        return
    good = _finish(pending, res.stats, res.findings)
    if ctx.progress is not None:
        ctx.progress(res.stats)
    row = pending.row
    if ctx.marks is None:
        return
    old = marks.get(row.id)
    if good:
        st = pending.st
        res.good.append(
            VerifyMark(
                row.id,
                row.run_id,
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                st.st_ctime_ns,
                row.hash or "",
                ctx.clock(),
            )
        )
        if old is None or old.sha256 != row.hash:  # it was counted as never verified
            res.stats.files_never_verified -= 1
            res.stats.bytes_never_verified -= row.size or 0
    elif old is not None:
        res.bad.append(row.id)


def _inspect_row(
    row: ArtifactRow, tree: ArtifactTree, opts: CheckOptions
) -> tuple[str | None, list[Finding], _Pending | None]:
    """Cheap checks of one row: path safety, presence, type, size. No file is opened.

    Returns a _Pending when the row can be hashed (subset and marks are the caller's call)."""
    out: list[Finding] = []
    finding = _RowFindings(row, out)
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
    abspath = tree.abspath(relpath)
    try:
        st = os.lstat(abspath)
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

    hash_ok = row.hash is not None and _SHA256_HEX.match(row.hash) is not None
    if row.size is None or row.hash is None:
        missing_meta = [n for n, v in (("size", row.size), ("hash", row.hash)) if v is None]
        finding("unverifiable", f"row records no {' or '.join(missing_meta)}", relpath)
    elif not hash_ok:
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
    if opts.hash and hash_ok:
        return relpath, out, _Pending(row, relpath, st, abspath)
    return relpath, out, None


class _RowFindings:
    """Appends findings about one row (a class, not a closure: this runs per row)."""

    __slots__ = ("out", "row")

    def __init__(self, row: ArtifactRow, out: list[Finding]) -> None:
        self.row, self.out = row, out

    def __call__(self, kind: str, detail: str, path: str | None = None, **extra: Any) -> None:
        row = self.row
        self.out.append(
            Finding(kind, path if path is not None else row.path, detail, row.id, row.run_id, extra)
        )


def _ready(pending: _Pending) -> bool:
    if pending.future is None:
        return pending.result is not None
    return pending.future.done()


def _hash(
    tree: ArtifactTree,
    pending: _Pending,
    opts: CheckOptions,
    throttle: Callable[[int], None] | None = None,
    stop: StopFn | None = None,
) -> Digest | BaseException:
    try:
        return sha256_file(
            pending.abspath,
            expected_size=pending.row.size,
            drop_cache=opts.drop_cache,
            confine=True,
            throttle=throttle,
            should_stop=stop,
        )
    except (OSError, Interrupted) as exc:
        return exc


def _finish(pending: _Pending, stats: CheckStats, out: list[Finding]) -> bool:
    """Turn a hash result into findings; True when the file matched its row."""
    result = pending.result if pending.future is None else pending.future.result()
    row, relpath = pending.row, pending.relpath

    def finding(kind: str, detail: str, **extra: Any) -> None:
        out.append(Finding(kind, relpath, detail, row.id, row.run_id, extra))

    if isinstance(result, Digest):
        stats.files_hashed += 1
        stats.bytes_hashed += result.size
        if row.size is not None and result.size != row.size:
            finding(
                "size_mismatch",
                f"recorded {row.size} bytes, read {result.size} (changed during check)",
                expected_size=row.size,
                actual_size=result.size,
            )
        elif result.sha256 != row.hash:
            late = _modified_after_log(row, pending.st)
            finding(
                "hash_mismatch",
                "content differs from the recorded SHA-256" + _late_note(late),
                expected_sha256=row.hash,
                actual_sha256=result.sha256,
                modified_after_log=late,
                mtime=iso_time(pending.st.st_mtime),
            )
        else:
            return True
    elif isinstance(result, FileNotFoundError):
        finding("missing", "file vanished during the check")
    elif isinstance(result, OutsideTree):
        finding(
            "not_a_file",
            "a parent folder became a symlink during the check; not read",
            file_type="symlink",
        )
    elif isinstance(result, NotRegularFile) or getattr(result, "errno", None) == errno.ELOOP:
        finding("not_a_file", "replaced by a symlink or special file during the check")
    elif isinstance(result, OSError):
        finding("unreadable", f"read failed: {result.strerror or result}")
    return False


def check_row(
    row: ArtifactRow, tree: ArtifactTree, opts: CheckOptions | None = None
) -> list[Finding]:
    """Every finding for one row, hashing inline: the same checks verify makes, for callers
    that look at one file at a time (the watcher)."""
    opts = opts or CheckOptions(jobs=1, processes=False)
    _, findings, pending = _inspect_row(row, tree, opts)
    if pending is not None:
        pending.result = _hash(tree, pending, opts)
        _finish(pending, CheckStats(), findings)
    return findings


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
    """Classify the files the batches found unnamed (spooled in the TEMP table `seen`)."""
    now = clock()
    runs: dict[str, tuple[bool, str | None]] = {}
    foreign: dict[str, set[str]] | None = None
    for relpath, _ in store.iter_unreferenced():
        if foreign is None:  # a full scan of the rows, so only once there is a candidate
            foreign = _foreign_refs(store)
        if relpath in foreign.get(run_folder_of(relpath) or "", ()):
            continue
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
