"""Walk the artifact tree without following links or opening special files.

Yields every non-folder entry with its type taken from the directory listing (no stat, no
open), and a `ScanProblem` for each folder that cannot be listed; a walk never aborts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ScanEntry:
    relpath: str  # relative to the root, '/'-separated, surrogate-escaped if not UTF-8
    type: str  # 'file', 'symlink' or 'special' (FIFO, socket, device)


@dataclass(frozen=True, slots=True)
class ScanProblem:
    relpath: str
    error: str


def scan_tree(root: Path, only: Iterable[str] = ()) -> Iterator[ScanEntry | ScanProblem]:
    """Every non-folder entry under `root`; with `only`, just those top-level folders."""
    root_s = os.fspath(root)
    stack: list[str] = [name for name in only] if only else [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root_s, rel) if rel else root_s
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except FileNotFoundError:
            continue  # vanished while we walked: nothing under it to report
        except NotADirectoryError:
            if only and rel in only:
                continue
            yield ScanProblem(rel, "not a folder")
            continue
        except OSError as exc:
            yield ScanProblem(rel, exc.strerror or str(exc))
            continue
        prefix = rel + "/" if rel else ""
        for entry in entries:
            child = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
                elif entry.is_file(follow_symlinks=False):
                    yield ScanEntry(child, "file")
                elif entry.is_symlink():
                    yield ScanEntry(child, "symlink")
                else:
                    yield ScanEntry(child, "special")
            except OSError as exc:  # d_type unknown and the lstat failed: it is gone
                if not isinstance(exc, FileNotFoundError):
                    yield ScanProblem(child, exc.strerror or str(exc))


def scan_unnamed(
    root: Path, folders: Iterable[str], named: set[str]
) -> tuple[int, list[ScanEntry | ScanProblem]]:
    """scan_tree over top-level `folders`, keeping only entries whose relpath is not in
    `named`: (how many non-folder entries were seen, the unnamed ones and the problems).

    The same walk as scan_tree without a generator or an object per file: at a million
    files, per-entry overhead is what the orphan pass costs."""
    root_s = os.fspath(root)
    top = set(folders)
    stack = list(top)
    seen = 0
    out: list[ScanEntry | ScanProblem] = []
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root_s, rel))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            if rel not in top:
                out.append(ScanProblem(rel, "not a folder"))
            continue
        except OSError as exc:
            out.append(ScanProblem(rel, exc.strerror or str(exc)))
            continue
        prefix = rel + "/"
        with it:
            for entry in it:
                child = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(child)
                        continue
                    seen += 1
                    if child in named:
                        continue
                    if entry.is_file(follow_symlinks=False):
                        out.append(ScanEntry(child, "file"))
                    elif entry.is_symlink():
                        out.append(ScanEntry(child, "symlink"))
                    else:
                        out.append(ScanEntry(child, "special"))
                except OSError as exc:
                    if not isinstance(exc, FileNotFoundError):
                        out.append(ScanProblem(child, exc.strerror or str(exc)))
    return seen, out
