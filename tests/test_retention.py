"""Retention: restic-style keep rules on archive names' timestamps, and prune on real files."""

from __future__ import annotations

import calendar
import shutil
import time
from pathlib import Path

import pytest
from conftest import NOW, run_cli

from chachaml_ops.archive import ARCHIVE_RE, archive_time
from chachaml_ops.backup import BackupOptions, run_backup
from chachaml_ops.retention import ArchiveFile, RetentionPolicy, plan_retention
from chachaml_ops.store import Store

DAY = 86400.0


def _name(t: float, tag: int = 0, store: str = "chachaml-0a1b2c3d") -> str:
    return f"chachaml-{store}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}-{tag:08x}.tar.zst"


def _at(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


def _archives(times: list[float]) -> list[ArchiveFile]:
    return [ArchiveFile(_name(t, i), t) for i, t in enumerate(times)]


def _kept(archives: list[ArchiveFile], policy: RetentionPolicy) -> set[float]:
    return {d.archive.time for d in plan_retention(archives, policy) if d.keep}


# Four backups a day (00, 06, 12, 18 UTC) for 60 days ending 2026-11-30 18:00.
END = _at("2026-11-30 18:00")
EVERY_6H = [END - i * DAY / 4 for i in range(60 * 4)]


def test_name_carries_its_utc_time():
    assert archive_time(_name(NOW)) == NOW
    assert archive_time("chachaml-x-0a1b2c3d-20261130T180000Z-0000000g.tar.zst") is None
    assert archive_time("chachaml-x-0a1b2c3d-20261130T180000Z-00000000.tar.zst.partial") is None
    assert archive_time("chachaml-20261130T180000Z-00000000.tar.zst") is None  # no store id


def test_keep_last_keeps_the_n_newest():
    assert _kept(_archives(EVERY_6H), RetentionPolicy(last=3)) == set(EVERY_6H[:3])


def test_keep_daily_keeps_the_last_backup_of_each_recent_day():
    kept = _kept(_archives(EVERY_6H), RetentionPolicy(daily=7))
    assert kept == {END - d * DAY for d in range(7)}  # the 18:00 backup of each day


def test_keep_daily_counts_only_days_that_have_backups():
    # Nothing on Nov 28 and 29: the 3 kept days reach back to Nov 26.
    times = [t for t in EVERY_6H if not _at("2026-11-28 00:00") <= t < _at("2026-11-30 00:00")]
    kept = _kept(_archives(times), RetentionPolicy(daily=3))
    assert kept == {END, END - 3 * DAY, END - 4 * DAY}


def test_keep_weekly_uses_iso_weeks_and_keeps_the_newest_of_each():
    # 2026-11-30 is a Monday: ISO week 49 holds only Nov 30, week 48 ends Sunday Nov 29.
    kept = _kept(_archives(EVERY_6H), RetentionPolicy(weekly=3))
    assert kept == {END, _at("2026-11-29 18:00"), _at("2026-11-22 18:00")}


def test_keep_monthly_keeps_the_newest_of_each_month_that_has_one():
    # 60 days back from Nov 30 reach Oct 2: only two months have backups.
    kept = _kept(_archives(EVERY_6H), RetentionPolicy(monthly=3))
    assert kept == {END, _at("2026-10-31 18:00")}


def test_policies_are_a_union_with_reasons():
    decisions = plan_retention(_archives(EVERY_6H), RetentionPolicy(last=2, daily=2, monthly=2))
    reasons = {d.archive.time: d.reasons for d in decisions if d.keep}
    assert reasons == {
        END: ("last 1", "daily 1", "monthly 1"),
        END - DAY / 4: ("last 2",),
        END - DAY: ("daily 2",),
        _at("2026-10-31 18:00"): ("monthly 2",),
    }


def test_two_backups_in_one_second_are_both_considered():
    archives = [ArchiveFile(_name(END, 1), END), ArchiveFile(_name(END, 2), END)]
    kept = [d.archive.name for d in plan_retention(archives, RetentionPolicy(daily=1)) if d.keep]
    assert kept == [_name(END, 2)]


# -- prune on real files ------------------------------------------------------------------


@pytest.fixture
def real_archive(clean_store, tmp_path) -> Path:
    with Store(clean_store.db) as store:
        report, result = run_backup(
            store, clean_store.artifact_dir, tmp_path / "first", BackupOptions("none")
        )
    assert report.findings == []
    return result.archive


def _fill(out: Path, source: Path, times: list[float]) -> list[str]:
    out.mkdir(exist_ok=True)
    names = [_name(t, i) for i, t in enumerate(times)]
    for name in names:
        shutil.copyfile(source, out / name)
    return names


def test_prune_deletes_exactly_what_the_policy_drops_and_nothing_else(real_archive, tmp_path):
    out = tmp_path / "out"
    times = EVERY_6H[:12]  # three days, four a day
    names = _fill(out, real_archive, times)
    bystanders = ["notes.txt", "chachaml-backup.tar", names[5] + ".partial", "x" + names[6]]
    for name in bystanders:
        (out / name).write_bytes(b"not ours")
    (out / ("chachaml-20200101T000000Z-0000abcd.tar")).symlink_to(out / names[0])
    policy = ["--keep-last", "2", "--keep-daily", "3"]
    dry = run_cli("prune", "--out", out, *policy, "--dry-run", "--json")
    assert dry.code == 0, dry.stderr
    expected_kept = {names[0], names[1], names[4], names[8]}  # 2 newest + 18:00 of each day
    would = {a["path"] for a in dry.json()["actions"] if a["action"] == "would delete"}
    assert would == set(names) - expected_kept
    assert len(list(out.iterdir())) == len(names) + len(bystanders) + 1
    res = run_cli("prune", "--out", out, *policy, "--json")
    assert res.code == 0
    assert {a["path"] for a in res.json()["actions"] if a["action"] == "deleted"} == would
    left = {p.name for p in out.iterdir()}
    assert left == expected_kept | set(bystanders) | {"chachaml-20200101T000000Z-0000abcd.tar"}


def test_the_newest_intact_archive_survives_a_damaged_newest(real_archive, tmp_path):
    out = tmp_path / "out"
    names = _fill(out, real_archive, EVERY_6H[:4])
    newest = out / names[0]
    newest.write_bytes(newest.read_bytes()[:2048])  # cut short: damaged
    res = run_cli("prune", "--out", out, "--keep-last", "1", "--json")
    assert res.code == 1  # a warning: a damaged archive was seen
    actions = {a["path"]: a for a in res.json()["actions"]}
    assert actions[names[0]]["action"] == "kept"
    assert actions[names[1]] == {**actions[names[1]], "action": "kept"}
    assert actions[names[1]]["reason"] == "newest intact archive"
    assert sorted(p.name for p in out.iterdir()) == sorted(names[:2])
    assert [f["path"] for f in res.json()["findings"]] == [names[0]]


def test_prune_needs_a_policy(tmp_path):
    res = run_cli("prune", "--out", tmp_path)
    assert res.code == 3 and "needs a policy" in res.stderr


def test_backup_with_keep_last_prunes_after_publishing(clean_store, tmp_path):
    out = tmp_path / "out"
    docs = [
        run_cli(
            "backup", "--db", clean_store.db, "--out", out, "--state-dir", tmp_path / "s",
            "--keep-last", "2", "--json",
        ).json()
        for _ in range(3)
    ]  # fmt: skip
    left = sorted(p.name for p in out.iterdir() if ARCHIVE_RE.match(p.name))
    assert left == sorted(Path(d["archive"]).name for d in docs[1:])
    assert [a["action"] for a in docs[2]["pruned"]] == ["deleted"]
