"""Retention of backup archives: restic/borg keep-last/daily/weekly/monthly, then prune.

Times and the store come from the archive names (UTC time, `<stem>-<key8>` store id), never
from mtimes; only files named exactly like our archives are considered, the policy applies per
store, and each store's newest intact archive is always kept whatever the policy says.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chachaml_ops.archive import ARCHIVE_RE, archive_store, archive_time
from chachaml_ops.backup import fsync_dir
from chachaml_ops.report import Finding, iso_time


@dataclass(frozen=True)
class RetentionPolicy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def is_empty(self) -> bool:
        return not (self.last or self.daily or self.weekly or self.monthly)

    def describe(self) -> dict[str, int]:
        return {"keep_last": self.last, "keep_daily": self.daily, "keep_weekly": self.weekly,
                "keep_monthly": self.monthly}  # fmt: skip


@dataclass(frozen=True)
class ArchiveFile:
    name: str
    time: float  # UTC seconds, from the name
    tiebreak: int = 0  # mtime in ns: orders archives taken within the same second

    @property
    def store(self) -> str:
        return archive_store(self.name) or ""


@dataclass(frozen=True)
class Decision:
    archive: ArchiveFile
    keep: bool
    reasons: tuple[str, ...]


def _day(t: float) -> tuple[int, ...]:
    g = time.gmtime(t)
    return (g.tm_year, g.tm_mon, g.tm_mday)


def _week(t: float) -> tuple[int, ...]:
    iso = time.strftime("%G %V", time.gmtime(t)).split()
    return (int(iso[0]), int(iso[1]))


def _month(t: float) -> tuple[int, ...]:
    g = time.gmtime(t)
    return (g.tm_year, g.tm_mon)


def plan_retention(archives: list[ArchiveFile], policy: RetentionPolicy) -> list[Decision]:
    """Newest first. keep-daily N keeps the newest archive of each of the N most recent days
    that have one (restic's rule); weekly uses ISO weeks; all buckets are UTC."""
    ordered = sorted(archives, key=lambda a: (a.time, a.tiebreak, a.name), reverse=True)
    reasons: dict[str, list[str]] = {a.name: [] for a in ordered}
    for i, a in enumerate(ordered[: policy.last]):
        reasons[a.name].append(f"last {i + 1}")
    for label, count, bucket in (
        ("daily", policy.daily, _day),
        ("weekly", policy.weekly, _week),
        ("monthly", policy.monthly, _month),
    ):
        seen: list[tuple[int, ...]] = []
        for a in ordered:
            if len(seen) >= count:
                break
            b = bucket(a.time)
            if b not in seen:
                seen.append(b)
                reasons[a.name].append(f"{label} {len(seen)}")
    return [Decision(a, bool(reasons[a.name]), tuple(reasons[a.name])) for a in ordered]


def list_archives(out_dir: Path, store: str | None = None) -> list[ArchiveFile]:
    """Our finished archives in `out_dir` (regular files named like ours; no partials),
    only those of `store` (a `<stem>-<key8>` id) when given."""
    found: list[ArchiveFile] = []
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        t = archive_time(entry.name)
        if store is not None and archive_store(entry.name) != store:
            continue
        if t is not None and entry.is_file(follow_symlinks=False):
            found.append(ArchiveFile(entry.name, t, entry.stat(follow_symlinks=False).st_mtime_ns))
    return found


@dataclass
class PruneResult:
    decisions: list[Decision]
    actions: list[dict[str, Any]]
    findings: list[Finding]


def prune(
    out_dir: Path,
    policy: RetentionPolicy,
    *,
    dry_run: bool,
    is_intact: Callable[[Path], bool],
    known_intact: frozenset[str] = frozenset(),
    store: str | None = None,
) -> PruneResult:
    """Apply the policy to `out_dir`, separately for each store's archives (only `store`'s
    when given): archives of other stores sharing the folder are never touched."""
    out_dir = Path(out_dir)
    groups: dict[str, list[ArchiveFile]] = {}
    for a in list_archives(out_dir, store):
        groups.setdefault(a.store, []).append(a)
    result = PruneResult([], [], [])
    for key in sorted(groups):
        _prune_group(out_dir, groups[key], policy, dry_run, is_intact, known_intact, result)
    if not dry_run and any(a["action"] == "deleted" for a in result.actions):
        fsync_dir(out_dir)
    return result


def _prune_group(
    out_dir: Path,
    archives: list[ArchiveFile],
    policy: RetentionPolicy,
    dry_run: bool,
    is_intact: Callable[[Path], bool],
    known_intact: frozenset[str],
    result: PruneResult,
) -> None:
    """One store's archives. The newest intact one survives even if the policy would drop
    it; archives are checked newest first and only until one proves intact."""
    decisions = [
        Decision(d.archive, True, (*d.reasons, "just written"))
        if d.archive.name in known_intact and not d.keep
        else d
        for d in plan_retention(archives, policy)
    ]
    decisions_to_check = [] if all(d.keep for d in decisions) else decisions
    for i, d in enumerate(decisions_to_check):
        intact = d.archive.name in known_intact or is_intact(out_dir / d.archive.name)
        if intact:
            if not d.keep:
                decisions[i] = Decision(d.archive, True, ("newest intact archive",))
            break
        result.findings.append(
            Finding(
                "unverifiable",
                d.archive.name,
                "archive is damaged or unreadable (run verify-backup on it)",
            )
        )
    result.decisions.extend(decisions)
    for d in decisions:
        entry = {"path": d.archive.name, "time": iso_time(d.archive.time), "store": d.archive.store}
        if d.keep:
            result.actions.append({**entry, "action": "kept", "reason": ", ".join(d.reasons)})
            continue
        why = "not kept by the policy"
        if dry_run:
            result.actions.append({**entry, "action": "would delete", "reason": why})
            continue
        result.actions.append({**entry, "reason": why, **_delete(out_dir, d.archive.name)})


def _delete(out_dir: Path, name: str) -> dict[str, Any]:
    # Re-checked right before acting: still our naming, still a regular file.
    if not ARCHIVE_RE.match(name):
        return {"action": "skipped", "reason": "not one of our archive names"}
    path = out_dir / name
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return {"action": "skipped", "reason": "not a regular file"}
        os.unlink(path)
    except FileNotFoundError:
        return {"action": "skipped", "reason": "gone already"}
    except OSError as exc:
        return {"action": "failed", "reason": exc.strerror or str(exc)}
    return {"action": "deleted"}
