"""The click commands: parse options, call one core function, render, exit.

The only module that imports click. Project exceptions become one `Error: ...` line and
their exit code; click's usage errors exit 3 too ("could not check").
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import click

from chachaml_ops import __version__, logs
from chachaml_ops.errors import (
    EXIT_CANNOT_CHECK,
    EXIT_ERRORS,
    EXIT_WARNINGS,
    OpsError,
    UsageError,
)
from chachaml_ops.layout import UnsafePath, check_run_id, derive_artifact_dir
from chachaml_ops.report import (
    Report,
    human_bytes,
    render_json,
    render_text,
    utf8_safe,
    write_json,
)
from chachaml_ops.state import default_state_dir, locked_job
from chachaml_ops.store import DEFAULT_BUSY_TIMEOUT_MS, Store
from chachaml_ops.units import parse_duration, parse_size
from chachaml_ops.verify import CheckOptions, CheckStats, Subset, run_check


class DurationType(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SubsetType(click.ParamType):
    name = "n/t"

    def convert(self, value, param, ctx):
        if isinstance(value, Subset):
            return value
        try:
            return Subset.parse(value)
        except UsageError as exc:
            self.fail(exc.one_line(), param, ctx)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            rate = parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if rate <= 0:
            self.fail(f"{value!r} must be more than 0", param, ctx)
        return rate


DURATION = DurationType()
SIZE = SizeType()


def store_options(fn):
    """--db, --artifact-dir and --busy-timeout, shared by every command that reads a store."""

    @click.option(
        "--db",
        "db",
        type=click.Path(path_type=Path, readable=False),
        default=Path("chachaml.db"),
        show_default=True,
        help="The chachaml metadata DB (opened read-only).",
    )
    @click.option(
        "--artifact-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Artifact folder. Default: derived from --db as chachaml does "
        "(foo.db -> foo-artifacts).",
    )
    @click.option(
        "--busy-timeout",
        type=click.IntRange(0),
        default=DEFAULT_BUSY_TIMEOUT_MS,
        show_default=True,
        help="Milliseconds to wait for a locked DB.",
    )
    @functools.wraps(fn)
    def wrapper(db: Path, artifact_dir: Path | None, busy_timeout: int, **kwargs):
        if not db.name:
            raise UsageError(f"--db {str(db)!r} names no file", "pass --db PATH to a chachaml.db")
        return fn(
            db=db,
            artifact_dir=artifact_dir or derive_artifact_dir(db),
            busy_timeout=busy_timeout,
            **kwargs,
        )

    return wrapper


def lock_options(fn):
    """--wait and --state-dir: one job per store at a time, CLI and daemon alike."""

    @click.option(
        "--wait",
        type=DURATION,
        default="0",
        show_default=True,
        help="How long to wait when another chachaml-ops job holds this store's lock.",
    )
    @click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Locks and job history (share it with the daemon). Default: $STATE_DIRECTORY, "
        "else the daemon config's state_dir, else /var/lib/chachaml-ops if writable, "
        "else ~/.local/state/chachaml-ops.",
    )
    @functools.wraps(fn)
    def wrapper(wait: float, state_dir: Path | None, **kwargs):
        return fn(wait=wait, state_dir=state_dir or default_state_dir(), **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chachaml-ops")
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Structured logs go to stderr: JSON lines, or readable on a terminal.",
)
def cli(log_level: str) -> None:
    """Integrity checks, orphan reports and consistent backups for chachaml stores.

    \b
    Example:
      chachaml-ops verify --db /srv/ml/chachaml.db
    """
    logs.configure(log_level, lazy=True)


class _Progress:
    """Files, bytes, rate and ETA on one stderr line, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stats: CheckStats) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - stats.started, 1e-6)
        rate = stats.bytes_hashed / elapsed
        left = max(stats.bytes_total - stats.bytes_hashed, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        sys.stderr.write(
            f"\r{stats.rows}/{stats.rows_total} rows  "
            f"{human_bytes(stats.bytes_hashed)}/{human_bytes(stats.bytes_total)}  "
            f"{human_bytes(rate)}/s  ETA {eta}   "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _emit(report: Report, as_json: bool, **text_opts) -> None:
    if as_json:
        out = click.get_text_stream("stdout")
        write_json(report, out)
        out.flush()
    else:
        click.echo(render_text(report, colour=_colour(), **text_opts), nl=False)


def _verify_job_name(quick: bool, runs: tuple[str, ...]) -> str:
    """History name of a CLI verify: only a full check of every run counts as 'verify', so a
    quick or partial run never stands in for the daemon's full one (catch-up, metrics)."""
    if quick:
        return "verify-quick"
    return "verify-runs" if runs else "verify"


def _check_runs(store: Store, artifact_dir: Path, runs: tuple[str, ...]) -> None:
    """A mistyped --run must not look like a clean store, nor name a folder outside a run."""
    for run_id in runs:
        try:
            check_run_id(run_id)
        except UnsafePath as exc:
            raise UsageError(f"--run {exc}", "pass a run id, e.g. the folder name") from None
        known, _ = store.run_status(run_id)
        if not known and not os.path.lexists(artifact_dir / run_id):
            raise UsageError(
                f"no run {run_id!r} in {store.db} or {artifact_dir}",
                "pass a full run id (run ids are UUIDs: the folder names under the artifact dir)",
            )


@cli.command()
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema 1).")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1),
    default=os.cpu_count() or 1,
    show_default="CPU count",
    help="Files hashed in parallel.",
)
@click.option(
    "--run",
    "runs",
    multiple=True,
    metavar="RUN_ID",
    help="Only these runs (repeatable). Skips registry checks.",
)
@click.option("--quick", is_flag=True, help="Presence, type and size only; no hashing.")
@click.option(
    "--subset",
    type=SubsetType(),
    default=None,
    help="Hash only slice n of t (by artifact id); 1/7..7/7 cover every row once.",
)
@click.option(
    "--min-age",
    type=DURATION,
    default="1h",
    show_default=True,
    help="Unreferenced files younger than this are in flight, not orphans.",
)
@click.option(
    "--drop-cache", is_flag=True, help="Tell the kernel to drop hashed files from the page cache."
)
@lock_options
@click.option(
    "--max-age",
    type=DURATION,
    default=None,
    help="Skip files verified good within this age (e.g. 7d) whose size, mtime, ctime and "
    "inode are unchanged; new or changed files are always hashed. Marks live in --state-dir.",
)
@click.option(
    "--max-duration",
    type=DURATION,
    default=None,
    help="Hashing budget (e.g. 2h): least recently verified first, then stop cleanly. "
    "Presence and size checks still cover every row. Uses --state-dir.",
)
@click.option(
    "--max-rate",
    type=SIZE,
    default=None,
    metavar="BYTES/S",
    help="Cap hashing reads across all workers, e.g. 200M (MiB/s).",
)
@click.option(
    "--no-processes",
    is_flag=True,
    help="Hash on threads only (by default many small files are checked by forked workers).",
)
def verify(
    db,
    artifact_dir,
    busy_timeout,
    as_json,
    jobs,
    runs,
    quick,
    subset,
    min_age,
    drop_cache,
    wait,
    state_dir,
    max_age,
    max_duration,
    max_rate,
    no_processes,
):
    """Re-check every artifact's presence, size and SHA-256 against the DB, and find orphans.

    Exit 0 clean, 1 warnings only, 2 any error finding, 3 could not check.

    \b
    Examples:
      chachaml-ops verify --db /srv/ml/chachaml.db --json > report.json
      chachaml-ops verify --db /srv/ml/chachaml.db --max-age 7d --max-duration 2h
    """
    if max_duration is not None and max_duration <= 0:
        raise UsageError("--max-duration must be more than 0", "e.g. --max-duration 2h")
    if quick and subset:
        raise UsageError(
            "--quick hashes nothing, so --subset has nothing to select", "drop one of them"
        )
    opts = CheckOptions(
        hash=not quick,
        jobs=jobs,
        run_ids=tuple(runs),
        subset=subset,
        min_age=min_age,
        drop_cache=drop_cache,
        max_age=max_age,
        max_duration=max_duration,
        # marks are read and written only by incremental runs: a plain verify stays read-only
        state_dir=state_dir if (max_age is not None or max_duration is not None) else None,
        max_rate=max_rate,
        processes=not no_processes,
    )
    _terminate_cleanly()  # workers are stopped and the lock released on SIGTERM
    progress = _Progress()
    log = logs.get_logger(store=str(db), job="verify")
    with (
        locked_job(state_dir, db, _verify_job_name(quick, runs), wait=wait) as outcome,
        Store(db, busy_timeout_ms=busy_timeout) as store,
    ):
        _check_runs(store, artifact_dir, opts.run_ids)
        log.info(
            "verify_started",
            artifact_dir=str(artifact_dir),
            quick=quick,
            jobs=jobs,
            subset=str(subset) if subset else None,
        )
        try:
            report = run_check(
                store, artifact_dir, opts, progress=progress, should_stop=_STOPPING.is_set
            )
        finally:
            progress.done()
        outcome.exit_code = report.exit_code()
        outcome.summary = {"by_kind": report.counts(), **report.stats}
    log.info("verify_finished", exit_code=report.exit_code(), **report.counts(), **report.stats)
    _emit(report, as_json)
    sys.exit(report.exit_code())


@cli.command()
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema 1).")
@click.option(
    "--min-age",
    type=DURATION,
    default="1h",
    show_default=True,
    help="Grace period: younger files are in flight and never moved.",
)
@click.option(
    "--run", "runs", multiple=True, metavar="RUN_ID", help="Only these run folders (repeatable)."
)
@click.option(
    "--quarantine",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Move orphans past the grace period into DIR, keeping relative paths.",
)
@click.option("--delete", is_flag=True, help="Delete orphans past the grace period (needs --yes).")
@click.option("--yes", is_flag=True, help="Confirm --delete.")
@click.option(
    "--include-running",
    is_flag=True,
    help="Also move or delete orphans of runs whose status is still 'running'.",
)
@lock_options
def orphans(
    db,
    artifact_dir,
    busy_timeout,
    as_json,
    min_age,
    runs,
    quarantine,
    delete,
    yes,
    include_running,
    wait,
    state_dir,
):
    """List files no artifact row references; optionally quarantine or delete them.

    Report only by default. Each file is re-checked right before it is moved.
    Exit 0 none, 1 orphans found, 2 a requested move or delete failed, 3 could not check.

    \b
    Examples:
      chachaml-ops orphans --db /srv/ml/chachaml.db
      chachaml-ops orphans --db /srv/ml/chachaml.db --quarantine /srv/ml/quarantine
      chachaml-ops orphans --db /srv/ml/chachaml.db --delete --yes --min-age 7d
    """
    from chachaml_ops.orphans import (
        apply_removal,
        check_quarantine_dir,
        find_orphans,
        plan_removal,
    )

    if quarantine and delete:
        raise UsageError("--quarantine and --delete exclude each other", "choose one")
    if yes and not delete:
        raise UsageError("--yes only confirms --delete", "add --delete, or drop --yes")
    if delete and not yes:
        raise UsageError("--delete removes files for good", "add --yes to confirm")
    if quarantine:
        quarantine = check_quarantine_dir(quarantine, artifact_dir)
    _terminate_cleanly()
    log = logs.get_logger(store=str(db), job="orphans")
    with (
        locked_job(state_dir, db, "orphans", wait=wait) as outcome,
        Store(db, busy_timeout_ms=busy_timeout) as store,
    ):
        _check_runs(store, artifact_dir, tuple(runs))
        report = find_orphans(store, artifact_dir, min_age, tuple(runs))
        log.info("orphans_found", **report.stats)
        if quarantine or delete:
            plan, spared = plan_removal(report.findings, include_running=include_running)
            report.actions = spared + apply_removal(
                store, artifact_dir, plan, quarantine=quarantine, min_age=min_age
            )
        outcome.exit_code = report.exit_code()
        outcome.summary = {"by_kind": report.counts(), **report.stats}
    _emit(report, as_json)
    sys.exit(report.exit_code())


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("demo"))
@click.option(
    "--scale",
    type=click.FloatRange(0.001, 20),
    default=1.0,
    show_default=True,
    help="Multiply artifact sizes (0.01 for a tiny store).",
)
@click.option(
    "--seed",
    type=int,
    default=7,
    show_default=True,
    help="Random seed: the same seed and scale build the same store.",
)
@click.option("--clean", is_flag=True, help="Plant no faults.")
def demo(directory: Path, scale: float, seed: int, clean: bool):
    """Build a realistic chachaml store in DIRECTORY (default: ./demo) with one of each
    real-world fault.

    \b
    Example:
      chachaml-ops demo /tmp/demo && chachaml-ops verify --db /tmp/demo/chachaml.db
    """
    from chachaml_ops.demo import ALL_FAULTS, make_store

    if (directory / "chachaml.db").exists():
        raise UsageError(
            f"{directory / 'chachaml.db'} already exists", "choose an empty folder or remove it"
        )
    try:
        store = make_store(directory, () if clean else ALL_FAULTS, seed=seed, scale=scale)
    except OSError as exc:
        raise UsageError(
            f"cannot build a store in {directory}: {exc.strerror}",
            "choose a writable, empty folder",
        ) from exc
    total = sum(f.stat().st_size for f in store.artifact_dir.rglob("*") if f.is_file())
    click.echo(
        f"Built {store.db}: {len(store.runs)} runs, {len(store.artifacts)} artifact rows, "
        f"{human_bytes(total)} in {store.artifact_dir}"
    )
    if store.planted:
        click.echo(f"Planted {len(store.planted)} faults, each a finding verify must report:")
        for p in store.planted:
            click.echo(f"  {p.kind:<24} {p.path or '(model registry)'}")
            click.echo(f"  {'':<24} {p.fault}: {p.note}")
    click.echo(f"Next: chachaml-ops verify --db {store.db}")


def _load_config(path: Path | None):
    from chachaml_ops.config import find_config, load_config

    return load_config(find_config(path))


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML config. Default: $CHACHAML_OPS_CONFIG, else /etc/chachaml-ops/config.toml.",
)
def daemon(config_path: Path | None):
    """Run scheduled verify/orphans/backup jobs and watch artifact dirs, until SIGTERM.

    Sends sd_notify READY/STATUS/WATCHDOG/STOPPING under systemd (Type=notify). SIGHUP
    reloads the config (a bad new config keeps the old one). Exit 0 on SIGTERM/SIGINT,
    3 if the config is unusable.

    \b
    Example:
      chachaml-ops daemon --config /etc/chachaml-ops/config.toml
    """
    from chachaml_ops.config import find_config
    from chachaml_ops.daemon import run_daemon

    sys.exit(run_daemon(find_config(config_path)))


@cli.group()
def config():
    """Check the daemon's TOML config."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path), required=False)
def config_check(file: Path | None):
    """Validate FILE without starting anything; list every problem with its key.

    Exit 0 valid, 3 with one line per problem.

    \b
    Example:
      chachaml-ops config check /etc/chachaml-ops/config.toml
    """
    from chachaml_ops.config import describe, require_writable_state_dir

    cfg = _load_config(file)
    require_writable_state_dir(cfg)
    click.echo("\n".join(describe(cfg)))


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML config. Default: $CHACHAML_OPS_CONFIG, else /etc/chachaml-ops/config.toml.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def status(config_path: Path | None, as_json: bool):
    """Each store's last verify / orphans / backup results and when each job runs next.

    Read from the state dir; works whether or not the daemon is running.

    \b
    Example:
      chachaml-ops status --config /etc/chachaml-ops/config.toml
    """
    import json

    from chachaml_ops.daemon import is_due, next_runs
    from chachaml_ops.jobs import read_daemon_status, status_report

    cfg = _load_config(config_path)

    def due_at_start(task: str, last_start: float | None) -> bool:
        spec = cfg.schedule(task)
        return spec is not None and is_due(spec, cfg.timezone, last_start, time.time())

    doc = status_report(cfg, read_daemon_status(cfg.state_dir), next_runs(cfg), due_at_start)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(_render_status(doc))


def _when(ts: float | None) -> str:
    from chachaml_ops.report import iso_time

    return iso_time(ts) if ts else "-"


def _render_status(doc: dict) -> str:
    from chachaml_ops.report import human_duration

    d = doc["daemon"]
    lines = [
        f"config: {doc['config']}",
        f"state dir: {doc['state_dir']}",
        f"daemon: running (pid {d['pid']})" if d["running"] else "daemon: not running",
    ]
    now = time.time()
    for store in doc["stores"]:
        lines.append("")
        lines.append(f"store {store['name']}: {store['db']}")
        for task, info in store["jobs"].items():
            last = info["last_run"]
            if last is None:
                result = "never ran"
            else:
                summary = last["summary"]
                kinds = ", ".join(f"{k} {n}" for k, n in summary.get("by_kind", {}).items())
                result = f"exit {last['exit_code']} at {_when(last['finished'])}"
                if summary.get("error"):
                    result += f" ({summary['error']})"
                elif kinds:
                    result += f" ({kinds})"
            if info["schedule"] is None:
                nxt = "not scheduled"
            elif info.get("catch_up_at_start"):
                nxt = "next: when the daemon starts (catch-up)"
            elif info["next_run"] is None:
                nxt = "next: -"
            elif info["next_run"] <= now:
                nxt = "next: now (due)"
            else:
                nxt = (
                    f"next {_when(info['next_run'])} (in {human_duration(info['next_run'] - now)})"
                )
            lines.append(f"  {task:<8} last: {result}; {nxt}")
    return "\n".join(lines)


# -- backups ------------------------------------------------------------------------------


def retention_options(fn):
    """--keep-last/daily/weekly/monthly, shared by backup and prune."""
    for name, what in (
        ("monthly", "the newest archive of each of the last N months that have one"),
        ("weekly", "the newest archive of each of the last N ISO weeks that have one"),
        ("daily", "the newest archive of each of the last N days that have one (UTC)"),
        ("last", "the N newest archives"),
    ):
        fn = click.option(
            f"--keep-{name}", type=click.IntRange(0), default=0, metavar="N", help=f"Keep {what}."
        )(fn)
    return fn


def _policy(keep_last: int, keep_daily: int, keep_weekly: int, keep_monthly: int):
    from chachaml_ops.retention import RetentionPolicy

    return RetentionPolicy(keep_last, keep_daily, keep_weekly, keep_monthly)


class Terminated(Exception):
    """SIGTERM, raised where the process is so that `finally` blocks remove temp files."""


# Set by SIGTERM and Ctrl-C, for threads the exception cannot reach: a thread hashing a
# 20 GiB file asks it between chunks (verify's should_stop) instead of reading to the end.
_STOPPING = threading.Event()


def _terminate_cleanly() -> None:
    """For commands that hold temp files or staging folders: SIGTERM unwinds like an error
    (cleanup runs, a half-done swap is rolled back), then exits 143; Ctrl-C as before, 130.
    Both also set _STOPPING for the worker threads."""

    def raise_terminated(signum, frame):
        _STOPPING.set()
        raise Terminated()

    def raise_interrupt(signum, frame):
        _STOPPING.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, raise_interrupt)


def _emit_doc(doc: dict) -> None:
    click.echo(json.dumps(utf8_safe(doc), indent=2, ensure_ascii=False))


@cli.command()
@store_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the archives.",
)
@click.option(
    "--compression",
    type=click.Choice(["none", "gzip", "zstd"]),
    default="zstd",
    show_default=True,
    help="zstd is multi-threaded (level 3); gzip is level 6.",
)
@click.option(
    "--zstd-threads",
    type=click.IntRange(-1),
    default=None,
    metavar="N",
    help="zstd worker threads: -1 one per CPU, 0 inline. Default: CPUs - 1, at most 4 "
    "(inline on 2 CPUs or fewer).",
)
@click.option("--include-orphans", is_flag=True, help="Also archive unreferenced files (orphans/).")
@click.option(
    "--bwlimit",
    type=SIZE,
    default=None,
    metavar="SIZE",
    help="Read at most SIZE bytes per second from the store (e.g. 50M).",
)
@lock_options
@retention_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema 1).")
def backup(
    db,
    artifact_dir,
    busy_timeout,
    out_dir,
    compression,
    zstd_threads,
    include_orphans,
    bwlimit,
    wait,
    state_dir,
    keep_last,
    keep_daily,
    keep_weekly,
    keep_monthly,
    as_json,
):
    """Archive a consistent snapshot of the DB and exactly the artifacts it references.

    The DB is copied with SQLite's online backup API while chachaml keeps writing; artifacts
    are hashed as they stream into one PAX tar and checked against their rows. Problems are
    archived as found and reported. With --keep-*, old archives are pruned afterwards.
    Exit 0 clean, 1 warnings only, 2 error findings, 3 no archive written.

    \b
    Examples:
      chachaml-ops backup --db /srv/ml/chachaml.db --out /backups
      chachaml-ops backup --db /srv/ml/chachaml.db --out /backups --keep-daily 7 --keep-weekly 4
    """
    from chachaml_ops.backup import BackupOptions, backup_and_prune

    policy = _policy(keep_last, keep_daily, keep_weekly, keep_monthly)
    opts = BackupOptions(
        compression=compression,
        include_orphans=include_orphans,
        bwlimit=bwlimit,
        zstd_threads=zstd_threads,
    )
    with (
        locked_job(state_dir, db, "backup", wait=wait) as outcome,
        Store(db, busy_timeout_ms=busy_timeout) as store,
    ):
        report, result, pruned = backup_and_prune(store, artifact_dir, out_dir, opts, policy)
        outcome.exit_code, outcome.summary = report.exit_code(), result.stats()
    if as_json:
        doc = report.to_json()
        doc.update(
            archive=str(result.archive),
            bytes=result.bytes,
            artifacts=result.artifacts,
            orphans=result.orphans,
            compression=compression,
            removed_partials=list(result.removed_partials),
        )
        if pruned:
            doc["pruned"] = pruned
        _emit_doc(doc)
    else:
        _emit(report, False)
    sys.exit(report.exit_code())


@cli.command("verify-backup")
@click.argument("archive", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema 1).")
def verify_backup_cmd(archive, as_json):
    """Check an archive in one streaming read: every member against MANIFEST.json and
    SHA256SUMS, the DB snapshot with PRAGMA integrity_check, every artifact row's bytes.

    Exit 0 intact, 1 warnings only, 2 damaged (or the store already had errors when it was
    backed up), 3 not an archive of ours (or not a regular file, unreadable, no space).

    \b
    Example:
      chachaml-ops verify-backup /backups/chachaml-ml-0a1b2c3d-20261203T020000Z-1a2b.tar.zst
    """
    from chachaml_ops.restore import verify_backup

    _terminate_cleanly()
    report = verify_backup(archive)
    _emit(report, as_json)
    sys.exit(report.exit_code())


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--to",
    "target",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder that receives chachaml.db and chachaml-artifacts/.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Restore into a non-empty folder; its chachaml.db and chachaml-artifacts are moved "
    "aside into a new .chachaml-ops-replaced-*/, never deleted.",
)
@click.option(
    "--include-orphans", is_flag=True, help="Also put archived orphans back in the artifact dir."
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1),
    default=os.cpu_count() or 1,
    show_default="CPU count",
    help="Files hashed in parallel by the final verify.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema 1).")
def restore(archive, target, force, include_orphans, jobs, as_json):
    """Restore an archive to DIR/chachaml.db and DIR/chachaml-artifacts/, safely.

    The archive is first verified in full (nothing written); then members are extracted into
    DIR/.chachaml-ops-restore-*/ (absolute paths, '..', links and devices refused), judged
    again, renamed into place, and the restored store is verified. Exit 0 restored and clean,
    1 restored with warnings or with errors the store already had at backup time, 2 damaged
    (nothing restored), 3 could not start or complete (target left as it was).

    \b
    Example:
      chachaml-ops restore /backups/chachaml-ml-0a1b2c3d-20261203T020000Z-1a2b.tar.zst --to /srv/ml2
    """
    from chachaml_ops.restore import RestoreOptions, restore_archive

    _terminate_cleanly()
    opts = RestoreOptions(force=force, include_orphans=include_orphans, jobs=jobs)
    result = restore_archive(archive, target, opts)
    reports = [result.report] + ([result.verify] if result.verify is not None else [])
    # The restored store's own check counts each problem once (the archive's report names the
    # same ones again, as at_backup findings).
    errors = (result.verify or result.report).severity_counts().get("error", 0)
    if not result.restored:
        code = EXIT_ERRORS
    else:
        code = min(max(r.exit_code() for r in reports), EXIT_WARNINGS)
    if as_json:
        doc = result.report.to_json()
        doc["verify"] = result.verify.to_json() if result.verify else None
        doc["restored"] = result.restored
        doc["exit_code"] = code
        doc["summary"]["exit_code"] = code  # the whole command's, like every other report
        _emit_doc(doc)
    else:
        _emit(result.report, False)
        if result.verify is not None:
            click.echo()
            _emit(result.verify, False)
    if not result.restored:
        click.echo(
            f"Error: {archive} is damaged; nothing was restored to {target}; "
            "run verify-backup on it for the details, or restore an older archive",
            err=True,
        )
    elif errors:
        click.echo(
            f"Note: restored to {target}, but the store already had {errors} error finding(s)"
            " when it was backed up (at_backup); exit 1",
            err=True,
        )
    sys.exit(code)


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="Folder holding the archives.",
)
@click.option(
    "--db",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Only this store's archives (default: every store's, the policy applied per store).",
)
@retention_options
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema 1).")
def prune(out_dir, db, keep_last, keep_daily, keep_weekly, keep_monthly, dry_run, as_json):
    """Delete old archives in DIR by a restic-style policy (times from the archive names, UTC).

    Only files named exactly like this tool's archives are ever deleted; the policy applies
    per store (the store id in the names; --db: only that store), and each store's newest
    intact archive is always kept. Exit 0 done, 1 a damaged archive seen, 2 a deletion failed.

    \b
    Example:
      chachaml-ops prune --out /backups --keep-last 3 --keep-daily 7 --keep-monthly 12 --dry-run
    """
    from chachaml_ops.restore import archive_is_intact
    from chachaml_ops.retention import prune as prune_archives

    policy = _policy(keep_last, keep_daily, keep_weekly, keep_monthly)
    if policy.is_empty():
        raise UsageError(
            "prune needs a policy", "give at least one of --keep-last/daily/weekly/monthly"
        )
    from chachaml_ops.archive import store_id

    _terminate_cleanly()
    store = store_id(db) if db is not None else None
    result = prune_archives(
        out_dir, policy, dry_run=dry_run, is_intact=archive_is_intact, store=store
    )
    report = Report("prune", {"out_dir": str(out_dir)}, actions=result.actions)
    report.add(result.findings)
    counts = {a: sum(1 for x in result.actions if x["action"] == a) for a in ("kept", "deleted")}
    report.stats = {
        **policy.describe(),
        "dry_run": dry_run,
        "kept": counts["kept"],
        "deleted": counts["deleted"],
        "would_delete": sum(1 for x in result.actions if x["action"] == "would delete"),
    }
    if as_json:
        click.echo(render_json(report))
    else:
        mode = " (dry run: nothing deleted)" if dry_run else ""
        click.echo(f"prune: {out_dir}{mode}")
        for action in result.actions:
            reason = f" ({action['reason']})" if action.get("reason") else ""
            click.echo(f"  {action['action']:<13} {action['path']}{reason}")
        for f in result.findings:
            click.echo(f"  warning: {f.path}: {f.detail}")
    failed = any(a["action"] == "failed" for a in result.actions)
    sys.exit(EXIT_ERRORS if failed else report.exit_code())


_GROUP_OPTIONS = ("--log-level", "--version")


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="chachaml-ops", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "chachaml-ops --help")
        sys.exit(0)
    except click.exceptions.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "chachaml-ops"
        message = exc.format_message().rstrip(".")
        hint = f"see '{where} --help'"
        if isinstance(exc, click.exceptions.NoSuchOption) and exc.option_name in _GROUP_OPTIONS:
            hint = f"{exc.option_name} goes before the command: chachaml-ops {exc.option_name} ..."
        click.echo(f"Error: {message}; {hint}", err=True)
        sys.exit(EXIT_CANNOT_CHECK)
    except click.exceptions.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_CANNOT_CHECK)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except OpsError as exc:
        click.echo(f"Error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("Terminated; temporary files removed.", err=True)
        sys.exit(143)
    except sqlite3.Error as exc:
        # The chachaml DB is guarded in store.py; this is our own state or scratch database.
        click.echo(
            f"Error: chachaml-ops' own database failed: {exc}; check --state-dir (move a "
            "damaged state.db aside) and free space for SQLite's temp files",
            err=True,
        )
        sys.exit(EXIT_CANNOT_CHECK)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"Error: {exc.strerror or exc}{where}; nothing more was done", err=True)
        sys.exit(EXIT_CANNOT_CHECK)
    sys.exit(rv if isinstance(rv, int) else 0)
