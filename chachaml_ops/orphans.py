"""Orphan files: classify (via verify's scan), plan, and apply a quarantine or deletion.

Dry-run is the default. Applying re-checks each file right before acting (no row now, same
type and size, still past the grace period) and works through folder descriptors opened with
O_NOFOLLOW, so a folder swapped for a symlink is never followed out of the tree.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chachaml_ops.errors import OpsError, UsageError
from chachaml_ops.layout import file_type, is_inside, run_folder_of
from chachaml_ops.logs import get_logger
from chachaml_ops.report import Finding, Report, iso_time
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, row_claims, run_check

ORPHAN_ONLY = dict(hash=False, rows=False, cross_refs=False, orphans=True)
QUARANTINE_LOG = "quarantine-log.jsonl"
ORPHAN_KINDS = frozenset({"orphan_file", "in_flight", "unreadable"})


@dataclass(frozen=True)
class PlannedRemoval:
    relpath: str
    size: int
    file_type: str
    cause: str
    run_id: str | None


def orphan_options(
    min_age: float, run_ids: tuple[str, ...] = (), *, processes: bool = True
) -> CheckOptions:
    return CheckOptions(min_age=min_age, run_ids=run_ids, processes=processes, **ORPHAN_ONLY)


def find_orphans(
    store: Store,
    artifact_dir: Path,
    min_age: float,
    run_ids: tuple[str, ...] = (),
    clock: Callable[[], float] = time.time,
    *,
    processes: bool = True,
) -> Report:
    """Every unreferenced file, classified. `processes=False` in a process that runs threads
    of its own (the daemon): forked workers would inherit their locks."""
    opts = orphan_options(min_age, run_ids, processes=processes)
    report = run_check(store, artifact_dir, opts, command="orphans", clock=clock)
    # Row problems are verify's business; a folder that could not be listed stays, since it
    # means the orphan list is incomplete.
    report.findings = [f for f in report.findings if f.kind in ORPHAN_KINDS]
    sizes = [f.extra.get("size", 0) for f in report.findings if f.kind == "orphan_file"]
    report.stats = {
        "files_seen": report.stats["files_seen"],
        "orphans": len(sizes),
        "reclaimable_bytes": sum(sizes),
        "in_flight": sum(1 for f in report.findings if f.kind == "in_flight"),
        "min_age_s": min_age,
        "duration_s": report.stats["duration_s"],
    }
    return report


def plan_removal(
    findings: Iterable[Finding], *, include_running: bool = False
) -> tuple[list[PlannedRemoval], list[dict[str, Any]]]:
    """Which orphans may go: never in-flight files, not files of running runs by default."""
    plan: list[PlannedRemoval] = []
    spared: list[dict[str, Any]] = []
    for f in findings:
        if f.kind != "orphan_file" or f.path is None:
            continue
        if f.extra.get("file_type", "file") != "file":
            spared.append(
                {
                    "action": "spared",
                    "path": f.path,
                    "reason": f"a {f.extra.get('file_type')}, not a file chachaml wrote; "
                    "left for a person to look at",
                }
            )
            continue
        if f.extra.get("run_status") == "running" and not include_running:
            spared.append(
                {
                    "action": "spared",
                    "path": f.path,
                    "reason": "its run is still running (use --include-running)",
                }
            )
            continue
        plan.append(
            PlannedRemoval(
                f.path,
                f.extra.get("size", 0),
                f.extra.get("file_type", ""),
                f.extra.get("cause", ""),
                f.run_id,
            )
        )
    return plan, spared


def check_quarantine_dir(dest: Path, artifact_dir: Path) -> Path:
    """Create the quarantine dir if needed; refuse one inside the artifact dir (links resolved)."""
    dest = Path(os.path.abspath(dest))
    if is_inside(dest, artifact_dir):
        raise UsageError(
            f"quarantine dir {dest} is inside the artifact dir",
            "choose a folder outside it, or its files will look like orphans",
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot use quarantine dir {dest}: {exc.strerror}", "choose a writable folder"
        ) from exc
    if not os.access(dest, os.W_OK | os.X_OK):
        raise UsageError(f"quarantine dir {dest} is not writable", "choose a writable folder")
    return dest


@contextmanager
def _parent_fd(root: Path, relpath: str) -> Iterator[int]:
    """A descriptor for the file's folder, opened one component at a time without links."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in relpath.split("/")[:-1]:
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def apply_removal(
    store: Store,
    artifact_dir: Path,
    plan: list[PlannedRemoval],
    *,
    quarantine: Path | None,
    min_age: float,
    clock: Callable[[], float] = time.time,
) -> list[dict[str, Any]]:
    """Move (quarantine) or delete each planned orphan after re-checking it. Returns actions."""
    log = get_logger(store=str(store.db), job="orphans")
    actions: list[dict[str, Any]] = []
    emptied_runs: set[str] = set()
    with ExitStack() as stack:
        journal = None
        if quarantine is not None:
            quarantine.mkdir(parents=True, exist_ok=True)
            journal = stack.enter_context(open(quarantine / QUARANTINE_LOG, "a", encoding="utf-8"))
        for index, item in enumerate(plan):
            try:
                action = _apply_one(store, artifact_dir, item, quarantine, min_age, clock)
            except OpsError as exc:
                # The DB cannot be re-checked (locked, gone): touch nothing more.
                reason = f"not re-checked, nothing moved: {exc}"
                actions.extend(
                    {
                        "path": rest.relpath,
                        "size": rest.size,
                        "cause": rest.cause,
                        "action": "failed",
                        "reason": reason,
                    }
                    for rest in plan[index:]
                )
                log.error("orphans_stopped", reason=reason, remaining=len(plan) - index)
                break
            actions.append(action)
            log.info(
                "orphan_" + action["action"],
                path=action["path"],
                reason=action.get("reason"),
                to=action.get("to"),
            )
            if action["action"] in ("moved", "deleted") and item.cause == "deleted_run":
                emptied_runs.add(run_folder_of(item.relpath) or "")
            if journal is not None and action["action"] == "moved":
                journal.write(json.dumps({**action, "time": iso_time(clock())}) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
    for run in sorted(r for r in emptied_runs if r):
        actions.extend(_remove_empty_folders(artifact_dir, run))
    return actions


def _apply_one(
    store, artifact_dir, item: PlannedRemoval, quarantine, min_age, clock
) -> dict[str, Any]:
    rel = item.relpath
    base = {"path": rel, "size": item.size, "cause": item.cause}

    def skipped(reason: str) -> dict[str, Any]:
        return {**base, "action": "skipped", "reason": reason}

    if row_claims(store, rel):
        return skipped("a row references it now")
    name = rel.rsplit("/", 1)[-1]
    try:
        with _parent_fd(artifact_dir, rel) as pfd:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return skipped("gone since the scan")
            if file_type(st.st_mode) != item.file_type or (
                stat.S_ISREG(st.st_mode) and st.st_size != item.size
            ):
                return skipped("changed since the scan")
            if clock() - st.st_mtime < min_age:
                return skipped("modified within the grace period since the scan")
            if quarantine is None:
                os.unlink(name, dir_fd=pfd)
                return {**base, "action": "deleted"}
            target = quarantine / rel
            if os.path.lexists(target):
                return skipped(f"{target} already exists")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # link + unlink never replaces an existing file (rename would)
                os.link(name, target, src_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                return skipped(f"{target} already exists")
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                if not _copy_then_unlink(pfd, name, target, lambda: not row_claims(store, rel)):
                    return skipped("a row appeared while it was being copied; left in place")
            else:
                # Both names exist now: one last look for a row before the original goes.
                if row_claims(store, rel):
                    os.unlink(target)
                    return skipped("a row appeared while it was being moved; left in place")
                os.unlink(name, dir_fd=pfd)
            return {**base, "action": "moved", "to": str(target)}
    except OSError as exc:
        return {**base, "action": "failed", "reason": exc.strerror or str(exc)}


def _copy_then_unlink(pfd: int, name: str, target: Path, still_orphan: Callable[[], bool]) -> bool:
    """Across file systems: copy to a private temp name, fsync, link into place (never over
    an existing file), and only then unlink the source. A failed copy leaves nothing behind."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
    tmp_fd, tmp = tempfile.mkstemp(prefix=".chachaml-ops-", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(src, "rb", closefd=False) as fin, os.fdopen(tmp_fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.link(tmp, target)
    except FileExistsError:
        raise OSError(errno.EEXIST, f"{target} appeared during the copy") from None
    finally:
        os.close(src)
        os.unlink(tmp)
    if not still_orphan():
        os.unlink(target)
        return False
    os.unlink(name, dir_fd=pfd)
    return True


def _remove_empty_folders(artifact_dir: Path, run: str) -> list[dict[str, Any]]:
    """Remove folders under a deleted run's folder that are now empty, deepest first."""
    removed: list[dict[str, Any]] = []
    top = Path(artifact_dir) / run
    if top.is_symlink() or not top.is_dir():
        return removed
    for here, dirs, _files in os.walk(top, topdown=False):
        del dirs
        try:
            os.rmdir(here)
            removed.append(
                {"action": "removed_folder", "path": os.path.relpath(here, artifact_dir)}
            )
        except OSError:
            pass  # not empty: something else still lives there
    return removed
