"""File events under an artifact dir -> hints -> quick checks of single files (watchdog glue).

Events are only hints: a file is re-checked against its row when the events settle, and lost
events (queue overflow, no inotify watches left) fall back to a full rescan of the store.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from chachaml_ops.config import StoreConfig, WatchConfig
from chachaml_ops.errors import OpsError
from chachaml_ops.layout import ArtifactTree, prefixes
from chachaml_ops.logs import get_logger
from chachaml_ops.report import Finding
from chachaml_ops.store import Store
from chachaml_ops.verify import check_row, classify_unreferenced

FindingFn = Callable[[str, Finding], None]
RescanFn = Callable[[str, str], None]
# File systems where inotify sees only local changes (or nothing): poll them instead.
NO_INOTIFY = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs")
_QUEUE_LIMIT = 100_000
# How often the root is checked while watched, and the longest wait between retries while gone.
SUPERVISE_S = 1.0
MAX_RETRY_S = 60.0
_OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


@dataclass
class _Pending:
    first_seen: float
    due: float
    deleted: bool


class _Hints(FileSystemEventHandler):
    """watchdog callback thread -> a bounded queue of (relpath, deleted?) hints."""

    def __init__(self, root: str, sink: queue.Queue, overflow: Callable[[str], None]) -> None:
        self.root = root.rstrip("/") + "/"
        self.sink = sink
        self.overflow = overflow

    def _put(self, path: str | bytes, deleted: bool) -> None:
        path = os.fsdecode(path)
        if not path.startswith(self.root):
            return
        try:
            self.sink.put_nowait((path[len(self.root) :], deleted))
        except queue.Full:
            self.overflow("hint queue full")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirMovedEvent):
            self.overflow("a folder was moved")  # many paths changed at once: rescan
        elif isinstance(event, FileMovedEvent):
            self._put(event.src_path, True)
            self._put(event.dest_path, False)
        elif isinstance(event, FileDeletedEvent):
            self._put(event.src_path, True)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileClosedEvent)):
            self._put(event.src_path, False)


class _OverflowSpotter(logging.Handler):
    """watchdog repairs its watches after IN_Q_OVERFLOW but only logs that events were lost;
    this turns that log line into a rescan."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.callback("inotify queue overflow")


def filesystem_type(path: Path) -> str:
    """The mount's file system type for `path`, from /proc/self/mountinfo ('' if unknown)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                mount = fields[4].replace("\\040", " ") if len(fields) > 4 else ""
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, right.split()[0] if right else ""
    except OSError:
        return ""
    return fstype


class StoreWatcher:
    """Watches one store's artifact dir and checks the files its events point at."""

    def __init__(
        self,
        store: StoreConfig,
        config: WatchConfig,
        on_finding: FindingFn,
        on_rescan: RescanFn,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.on_finding = on_finding
        self.on_rescan = on_rescan
        self.clock = clock
        self.log = get_logger("chachaml_ops.watcher", store=store.name)
        self.hints: queue.Queue[tuple[str, bool]] = queue.Queue(_QUEUE_LIMIT)
        self.pending: dict[str, _Pending] = {}
        self.reported: dict[str, str] = {}  # relpath -> kind already logged
        self.stopping = threading.Event()
        self.observer = None
        self.mode = ""
        self._rescan_asked = 0.0
        self._spotter = _OverflowSpotter(self._lost_events)
        self._worker = threading.Thread(target=self._work, name=f"watch-{store.name}", daemon=True)
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"watch-root-{store.name}", daemon=True
        )
        self._root: tuple[int, int] | None = None

    # -- starting and stopping --------------------------------------------------------------

    def start(self) -> None:
        """Start watching; a missing artifact dir is retried (with backoff) until it appears."""
        root = self.store.artifact_dir
        # watchdog does not say which watch overflowed, so every watched store rescans; the
        # level is pinned so a quiet log_level cannot swallow the signal.
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
            logging.getLogger(name).addHandler(self._spotter)
        if root.is_dir():
            try:
                self._watch()
            except OSError as exc:
                self.log.error("watch_failed", error=str(exc), action="retrying")
        else:
            self.log.warning(
                "watch_root_gone", path=str(root), reason="missing at start", action="retrying"
            )
        self._worker.start()
        self._supervisor.start()

    def _root_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.store.artifact_dir)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def _watch(self) -> None:
        """Start an observer on the root as it is now (raises OSError when it cannot)."""
        root = self.store.artifact_dir
        self._root = self._root_identity()
        fstype = filesystem_type(root)
        polling = self.config.polling or fstype in NO_INOTIFY or fstype.startswith("fuse")
        handler = _Hints(os.fspath(root), self.hints, self._lost_events)
        if not polling:
            try:
                self.observer = self._start(Observer(), handler)
                self.mode = "inotify"
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENOSYS):
                    raise
                # Out of inotify watches or instances: poll instead, and rescan what we missed.
                self.log.warning(
                    "watch_fallback", reason=str(exc), hint="raise fs.inotify.max_user_watches"
                )
                self._lost_events(f"inotify unavailable: {exc}")
                polling = True
        if polling:
            self.observer = self._start(PollingObserver(timeout=self.config.poll_interval), handler)
            self.mode = "polling"
        self.log.info("watch_started", path=str(root), mode=self.mode, fs=fstype or "unknown")

    def _unwatch(self) -> None:
        if self.observer is not None:
            with contextlib.suppress(Exception):  # an observer whose root vanished may be dead
                self.observer.stop()
                self.observer.join(timeout=5)
            self.observer = None

    def _supervise(self) -> None:
        """Notice the root vanishing or being replaced (rm -rf, mv): log it, retry with backoff
        until it is back, then watch again and rescan what happened meanwhile."""
        wait = SUPERVISE_S
        while not self.stopping.wait(wait):
            ident = self._root_identity()
            if self.observer is not None:
                if ident == self._root:
                    wait = SUPERVISE_S
                    continue
                self.log.warning(
                    "watch_root_gone",
                    path=str(self.store.artifact_dir),
                    reason="removed" if ident is None else "replaced (moved)",
                    action="retrying",
                )
                self._unwatch()
                self._lost_events("the artifact dir was moved or removed")
                wait = SUPERVISE_S
                if ident is None:
                    continue
            if ident is None:
                wait = min(wait * 2, MAX_RETRY_S)  # still gone: back off
                continue
            try:
                self._watch()
            except OSError as exc:
                self.log.warning("watch_retry_failed", error=str(exc))
                wait = min(wait * 2, MAX_RETRY_S)
                continue
            self._rescan_asked = 0.0  # the rescan after a return must not be swallowed
            self._lost_events("the artifact dir is back")
            wait = SUPERVISE_S

    def _start(self, observer, handler):
        observer.schedule(handler, os.fspath(self.store.artifact_dir), recursive=True)
        observer.start()
        return observer

    def stop(self) -> None:
        self.stopping.set()
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).removeHandler(self._spotter)
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        self._unwatch()
        if self._worker.is_alive():
            self._worker.join(timeout=5)

    def _lost_events(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._rescan_asked < 5:
            return  # one rescan covers a burst of overflow signals
        self._rescan_asked = now
        self.log.warning("watch_events_lost", reason=reason, action="rescan")
        self.on_rescan(self.store.name, reason)

    # -- the worker -------------------------------------------------------------------------

    def _work(self) -> None:
        store: Store | None = None
        failing = False  # in a failure episode (e.g. the DB locked): logged once
        tree = ArtifactTree(self.store.artifact_dir)
        try:
            while not self.stopping.is_set():
                self._drain(timeout=self._next_wait())
                due = [p for p, item in self.pending.items() if item.due <= self.clock()]
                if not due:
                    continue
                try:
                    if store is None:
                        store = Store(self.store.db)
                    tree.forget()
                    for relpath in due:
                        self._check(store, tree, relpath)
                    if failing:
                        self.log.info("watch_check_recovered")
                        failing = False
                except Exception as exc:
                    # The DB is locked or gone for a moment (or a bug): keep the hints, retry
                    # soon, and keep watching; the scheduled full scan stays the safety net.
                    if isinstance(exc, OpsError):
                        if not failing:  # once per episode, not once per retry
                            self.log.warning("watch_check_failed", error=exc.one_line())
                        failing = True
                    else:
                        self.log.exception("watch_check_crashed")
                    for relpath in due:
                        if relpath in self.pending:
                            self.pending[relpath].due = self.clock() + max(self.config.debounce, 1)
                    if store is not None:
                        store.close()
                        store = None
        finally:
            if store is not None:
                store.close()

    def _next_wait(self) -> float:
        if not self.pending:
            return 0.5
        soonest = min(item.due for item in self.pending.values())
        return min(0.5, max(0.0, soonest - self.clock()))

    def _drain(self, timeout: float) -> None:
        try:
            relpath, deleted = self.hints.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            now = self.clock()
            item = self.pending.get(relpath)
            # Deletions are checked at once; writes wait until the events settle (debounce).
            due = now if deleted else now + self.config.debounce
            if item is None:
                self.pending[relpath] = _Pending(now, due, deleted)
            else:
                item.due, item.deleted = due, deleted
            try:
                relpath, deleted = self.hints.get_nowait()
            except queue.Empty:
                return

    def _check(self, store: Store, tree: ArtifactTree, relpath: str) -> None:
        item = self.pending[relpath]
        now = self.clock()
        finding, settled = check_file(store, tree, relpath, item.first_seen, now, self.config.grace)
        if not settled:
            # No row yet: bytes come before the row, so look again until the grace period ends.
            item.due = now + max(self.config.debounce, min(self.config.grace / 4, 5.0))
            return
        del self.pending[relpath]
        if finding is None:
            self.reported.pop(relpath, None)
            return
        if self.reported.get(relpath) == finding.kind:
            return
        self.reported[relpath] = finding.kind
        self.on_finding(self.store.name, finding)


def check_file(
    store: Store, tree: ArtifactTree, relpath: str, first_seen: float, now: float, grace: float
) -> tuple[Finding | None, bool]:
    """Check one file an event pointed at: (finding or None, settled?).

    A file with a row gets exactly verify's checks (`verify.check_row`). Not settled means
    "no row yet and still within the grace period": look again later.
    """
    row = next(
        (r for run_id, name in prefixes(relpath) if (r := store.artifact_row(run_id, name))),
        None,
    )
    if row is not None:
        findings = check_row(row, tree)
        return (findings[0] if findings else None), True
    try:
        os.lstat(tree.abspath(relpath))
    except (FileNotFoundError, NotADirectoryError):
        return None, True  # a file with no row came and went (a temp file?)
    except OSError as exc:
        return Finding("unreadable", relpath, f"cannot stat: {exc.strerror}"), True
    if now - first_seen < grace:
        return None, False
    finding = classify_unreferenced(store, tree, relpath, now, grace)
    if finding is not None and finding.kind == "in_flight":
        return None, False  # modified again lately: still being written
    return finding, True
