"""Where artifact bytes live, and the one safe resolver for paths read from metadata.

A stored path is data from a database that an HTTP API fills with user-supplied names, so it
is validated before it is ever joined to a directory: no absolute paths, no `..`, no NULs.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path


class UnsafePath(ValueError):
    """A stored path that would resolve outside the artifact dir (or is not a path at all)."""


def derive_artifact_dir(db: Path) -> Path:
    """chachaml's rule: drop a trailing `.db`, then append `-artifacts`."""
    name = db.name
    base = name[: -len(".db")] if name.endswith(".db") and len(name) > 3 else name
    return db.with_name(base + "-artifacts")


def resolve_stored_path(stored: str) -> str:
    """Normalise a stored relative path to `a/b/c`, or raise UnsafePath saying why."""
    parts = stored.split("/")
    # Fast path for what chachaml writes (`run/name`): nothing to normalise or refuse.
    if "" not in parts and "." not in parts and ".." not in parts and "\x00" not in stored:
        return stored
    if not stored:
        raise UnsafePath("empty path")
    if "\x00" in stored:
        raise UnsafePath("path contains a NUL byte")
    if stored.startswith("/"):
        raise UnsafePath("absolute path")
    parts = [p for p in parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath("path has a '..' segment")
    if not parts:
        raise UnsafePath("path names the artifact dir itself")
    return "/".join(parts)


def is_object_key(stored: str, run_id: str, name: str) -> bool:
    """True for S3-backend rows: `<prefix><run_id>/<name>` with a non-empty prefix."""
    tail = f"{run_id}/{name}"
    return stored != tail and stored.endswith("/" + tail)


def run_folder_of(relpath: str) -> str | None:
    """The run id a file sits under (its first component), or None for a top-level file."""
    head, sep, _ = relpath.partition("/")
    return head if sep else None


def split_run_name(relpath: str) -> tuple[str, str] | None:
    head, sep, rest = relpath.partition("/")
    return (head, rest) if sep else None


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "unknown"


def is_inside(path: Path, artifact_dir: Path) -> bool:
    """Whether `path` is the artifact dir or below it, links resolved on both sides."""
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(artifact_dir))
    return real == root or root in real.parents


def check_run_id(run_id: str) -> str:
    """A --run value must name one folder directly under the artifact dir."""
    if run_id in ("", ".", "..") or "/" in run_id or "\x00" in run_id:
        raise UnsafePath(f"{run_id!r} is not a run id (one folder name, no '/', not '.' or '..')")
    return run_id


def prefixes(relpath: str) -> list[tuple[str, str]]:
    """Every (run_id, name) split of a relative path, shortest run id first.

    Run ids are UUIDs in practice, but a run id containing '/' must still be matched.
    """
    parts = relpath.split("/")
    return [("/".join(parts[:i]), "/".join(parts[i:])) for i in range(1, len(parts))]


@dataclass
class ArtifactTree:
    """The artifact dir, resolved once, with a cache of parent folders checked to be real.

    The root itself may be a symlink (operators relocate artifact dirs); nothing below it may.
    Files are opened with O_NOFOLLOW and then confined: `confined()` asks the kernel where an
    open descriptor really is, so a run folder swapped for a symlink mid-run is caught.
    """

    root: Path
    _checked: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root_b = os.fsencode(os.path.realpath(self.root))

    def abspath(self, relpath: str) -> bytes:
        return self.root_b + b"/" + os.fsencode(relpath)

    def parent_state(self, relpath: str) -> str:
        """'ok', 'missing', 'not_plain' or 'unreadable' for the folders above the file."""
        parent, _, _ = relpath.rpartition("/")
        if not parent:
            return "ok"
        state = self._checked.get(parent)
        if state is None:
            state = self._check_parent(parent)
            if len(self._checked) > 4096:
                self._checked.clear()
            self._checked[parent] = state
        return state

    def forget(self) -> None:
        """Drop the parent-folder cache (after a rescan hint: folders may have changed)."""
        self._checked.clear()

    def _check_parent(self, parent: str) -> str:
        current = self.root_b
        for part in parent.split("/"):
            current = current + b"/" + os.fsencode(part)
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return "missing"
            except OSError:
                return "unreadable"
            if not stat.S_ISDIR(st.st_mode):
                return "not_plain"
        return "ok"


def confined(fd: int, expected: bytes) -> bool:
    """Whether an open descriptor is the file at `expected` (a real path with no links).

    Uses /proc/self/fd; where /proc is missing, the O_NOFOLLOW open is all we have.
    """
    try:
        return os.readlink(b"/proc/self/fd/%d" % fd) == expected
    except OSError:
        return True
