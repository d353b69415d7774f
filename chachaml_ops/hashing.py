"""The one hashing routine: SHA-256 of a file, streamed, never following links or blocking.

Files are opened with O_NOFOLLOW|O_NONBLOCK and checked with fstat before any read, so a
symlink or FIFO swapped in after the stat is refused instead of followed or waited on.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from chachaml_ops.errors import Interrupted
from chachaml_ops.layout import confined

# 128 KiB: with two files hashed at once, the read copy and the hash both stay in cache.
# Measured on 4 x 512 MiB (bench/run.py --only large): 256 KiB spent 0.57 s of system time
# copying where 128 KiB spends 0.19 s, and the whole run took 1.11 s instead of 0.97 s.
CHUNK = 1 << 17
_SMALL = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    pass


class OutsideTree(OSError):
    """The open descriptor is not where the path said: a folder on the way was a symlink."""


@dataclass(frozen=True, slots=True)
class Digest:
    sha256: str
    size: int


class RateLimit:
    """A byte-rate ceiling shared by every thread and forked worker process (token bucket).

    The bucket is one shared double, "the time the next byte may be read"; each reader books
    its bytes under a process-shared lock and sleeps outside it. Create it before forking.
    """

    def __init__(self, bytes_per_s: float, burst_s: float = 0.25) -> None:
        if bytes_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(bytes_per_s)
        self.burst = burst_s
        import multiprocessing  # only a throttled run needs it

        self._next = multiprocessing.get_context("fork").Value("d", 0.0)

    def __call__(self, nbytes: int) -> None:
        with self._next.get_lock():
            now = time.monotonic()
            # A reader idle for a while may not bank more than `burst` seconds of credit.
            start = max(self._next.value, now - self.burst)
            self._next.value = start + nbytes / self.rate
            wait = self._next.value - now
        if wait > 0:
            time.sleep(wait)


def open_regular(path: bytes | str, *, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file without following a link or waiting on a FIFO: (fd, fstat).

    With `dir_fd`, `path` is one name in that open folder (the fast path's way to stay inside
    a run folder without resolving the folder again per file)."""
    fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(0, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def sha256_file(
    path: bytes,
    *,
    expected_size: int | None = None,
    drop_cache: bool = False,
    confine: bool = False,
    throttle: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Digest:
    """Hash a regular file. Raises OSError (NotRegularFile, OutsideTree, ...) when it cannot.

    With `confine`, `path` must be a real path (no symlinks anywhere) and the opened file must
    be exactly there, so nothing outside the artifact tree is ever read.
    """
    fd, st = open_regular(path)
    try:
        if confine and not confined(fd, path):
            raise OutsideTree(0, "reached through a symlinked folder")
        return sha256_fd(
            fd,
            st,
            expected_size=expected_size,
            drop_cache=drop_cache,
            throttle=throttle,
            should_stop=should_stop,
            name=path,
        )
    finally:
        os.close(fd)


def sha256_fd(
    fd: int,
    st: os.stat_result,
    *,
    expected_size: int | None = None,
    drop_cache: bool = False,
    throttle: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    name: bytes | str = b"",
) -> Digest:
    """The one SHA-256 routine: hash an open regular file (`st` its fstat) from the start.

    `throttle(n)` is called before each n bytes are read (see RateLimit). `should_stop()` is
    asked before each chunk and raises errors.Interrupted when true, so one huge file never
    delays a shutdown.
    """
    h = hashlib.sha256()
    total = 0
    if st.st_size <= _SMALL and (expected_size is None or expected_size <= _SMALL):
        # One read (plus one to see EOF) beats a buffer loop for small files.
        if throttle is not None:
            throttle(st.st_size)
        want = st.st_size + 1
        data = os.read(fd, want)
        h.update(data)
        total = len(data)
        # A short read of a regular file is its end; only a file that grew reads on.
        while len(data) == want:
            data = os.read(fd, CHUNK)
            want = CHUNK
            h.update(data)
            total += len(data)
    else:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped while hashing {os.fsdecode(name)}")
            if throttle is not None:
                throttle(CHUNK)
            n = os.readv(fd, [buf])
            if not n:
                break
            h.update(view[:n])
            total += n
    if drop_cache:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return Digest(h.hexdigest(), total)


class StreamingSha256:
    """SHA-256 of bytes streamed through a copy, updated on a helper thread.

    hashlib releases the GIL on large buffers, so with an executor the digest of chunk n is
    computed while chunk n+1 is read and written: a copy costs max(I/O, hash), not the sum.
    At most `depth` chunks wait, so memory stays bounded.
    """

    def __init__(self, executor: Executor | None = None, depth: int = 4) -> None:
        self._h = hashlib.sha256()
        self._executor = executor
        self._depth = depth
        self._pending: deque[Future[None]] = deque()

    def update(self, data: bytes) -> None:
        if self._executor is None or len(data) < _SMALL // 4:
            self._drain(0)
            self._h.update(data)
            return
        # One worker thread per executor keeps the updates in order.
        self._pending.append(self._executor.submit(self._h.update, data))
        self._drain(self._depth)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        self._drain(0)
        return self._h.hexdigest()
