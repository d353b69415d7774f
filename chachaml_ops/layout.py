"""Where artifact bytes live, and the one safe resolver for paths read from metadata.

A stored path is data from a database that an HTTP API fills with user-supplied names, so it
is validated before it is ever joined to a directory: no absolute paths, no `..`, no NULs.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
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


class NotPlainParent(Exception):
    """A parent folder of an artifact is a symlink or not a folder."""


@dataclass
class ArtifactTree:
    """The artifact dir, with a cache of parent folders already checked to be real folders.

    Artifacts are read with O_NOFOLLOW on the last component; this cache covers the parents,
    so a run folder replaced by a symlink is never followed out of the tree.
    """

    root: Path
    _checked: dict[str, bool | None] | None = None

    def __post_init__(self) -> None:
        self.root_b = os.fsencode(self.root)
        self._checked = {}

    def abspath(self, relpath: str) -> bytes:
        return self.root_b + b"/" + os.fsencode(relpath)

    def parent_state(self, relpath: str) -> str:
        """'ok', 'missing', or 'not_plain' for the folders between the root and the file."""
        parent, _, _ = relpath.rpartition("/")
        if not parent:
            return "ok"
        cache = self._checked
        assert cache is not None
        known = cache.get(parent)
        if known is None and parent not in cache:
            known = self._check_parent(parent)
            if len(cache) > 4096:
                cache.clear()
            cache[parent] = known
        if known is None:
            return "missing"
        return "ok" if known else "not_plain"

    def _check_parent(self, parent: str) -> bool | None:
        current = self.root_b
        for part in parent.split("/"):
            current = current + b"/" + os.fsencode(part)
            try:
                st = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def forget(self) -> None:
        assert self._checked is not None
        self._checked.clear()
