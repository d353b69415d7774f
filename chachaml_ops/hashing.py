"""The one hashing routine: SHA-256 of a file, streamed, never following links or blocking.

Files are opened with O_NOFOLLOW|O_NONBLOCK and checked with fstat before any read, so a
symlink or FIFO swapped in after the stat is refused instead of followed or waited on.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

CHUNK = 1 << 20
_SMALL = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    pass


@dataclass(frozen=True, slots=True)
class Digest:
    sha256: str
    size: int


def sha256_file(
    path: bytes | str, *, expected_size: int | None = None, drop_cache: bool = False
) -> Digest:
    """Hash a regular file. Raises OSError (incl. NotRegularFile) when it cannot be read."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(0, "not a regular file")
        h = hashlib.sha256()
        total = 0
        if st.st_size <= _SMALL and (expected_size is None or expected_size <= _SMALL):
            # One read (plus one to see EOF) beats a buffer loop for small files.
            data = os.read(fd, max(st.st_size, 1) + 1)
            while data:
                h.update(data)
                total += len(data)
                data = os.read(fd, CHUNK)
        else:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := os.readv(fd, [buf]):
                h.update(view[:n])
                total += n
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return Digest(h.hexdigest(), total)
    finally:
        os.close(fd)
