"""The click commands: parse options, call one core function, render, exit.

The only module that imports click. Project exceptions become one `Error: ...` line and
their exit code; click's usage errors exit 3 too ("could not check").
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click

from chachaml_ops import __version__, logs
from chachaml_ops.errors import EXIT_CANNOT_CHECK, EXIT_ERRORS, OpsError, UsageError
from chachaml_ops.layout import derive_artifact_dir
from chachaml_ops.report import Report, human_bytes, render_json, render_text
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
        if isinstance(value, (int, float)):
            return float(value)
        try:
            rate = parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if rate <= 0:
            self.fail(f"{value!r} must be more than 0", param, ctx)
        return float(rate)


DURATION = DurationType()
SIZE = SizeType()


def store_options(fn):
    """--db, --artifact-dir and --busy-timeout, shared by every command that reads a store."""

    @click.option(
        "--db",
        "db",
        type=click.Path(path_type=Path),
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
        return fn(
            db=db,
            artifact_dir=artifact_dir or derive_artifact_dir(db),
            busy_timeout=busy_timeout,
            **kwargs,
        )

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
    logs.configure(log_level)


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
            f"\r{stats.files_hashed}/{stats.rows_total} files  "
            f"{human_bytes(stats.bytes_hashed)}/{human_bytes(stats.bytes_total)}  "
            f"{human_bytes(rate)}/s  ETA {eta}   "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _emit(report: Report, as_json: bool, **text_opts) -> None:
    if as_json:
        click.echo(render_json(report))
    else:
        click.echo(render_text(report, colour=sys.stdout.isatty(), **text_opts), nl=False)


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
@click.option("--quick", is_flag=True, help="Presence and size only; no hashing.")
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
@click.option(
    "--max-age",
    type=DURATION,
    default=None,
    help="Skip files verified good within this age (e.g. 7d) whose size, mtime, ctime and "
    "inode are unchanged; new or changed files are always hashed. Uses --state-dir.",
)
@click.option(
    "--max-duration",
    type=DURATION,
    default=None,
    help="Hashing budget (e.g. 2h): least recently verified first, then stop cleanly. "
    "Presence and size checks still cover every row. Uses --state-dir.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where verify marks are kept (default: $STATE_DIRECTORY or "
    "~/.local/state/chachaml-ops). Giving it records marks even without --max-age.",
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
    max_age,
    max_duration,
    state_dir,
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
    opts = CheckOptions(
        hash=not quick,
        jobs=jobs,
        run_ids=tuple(runs),
        subset=subset,
        min_age=min_age,
        drop_cache=drop_cache,
        max_age=max_age,
        max_duration=max_duration,
        state_dir=state_dir,
        max_rate=max_rate,
        processes=not no_processes,
    )
    progress = _Progress()
    with Store(db, busy_timeout_ms=busy_timeout) as store:
        try:
            report = run_check(store, artifact_dir, opts, progress=progress)
        finally:
            progress.done()
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
@click.option("--run", "runs", multiple=True, metavar="RUN_ID", help="Only these run folders.")
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
def orphans(
    db, artifact_dir, busy_timeout, as_json, min_age, runs, quarantine, delete, yes, include_running
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
        raise UsageError("--quarantine and --delete exclude each other")
    if delete and not yes:
        raise UsageError("--delete removes files for good", "add --yes to confirm")
    if quarantine:
        quarantine = check_quarantine_dir(quarantine, artifact_dir)
    with Store(db, busy_timeout_ms=busy_timeout) as store:
        report = find_orphans(store, artifact_dir, min_age, tuple(runs))
        if quarantine or delete:
            plan, spared = plan_removal(report.findings, include_running=include_running)
            report.actions = spared + apply_removal(
                store, artifact_dir, plan, quarantine=quarantine, min_age=min_age
            )
    _emit(report, as_json)
    failed = any(a["action"] == "failed" for a in report.actions)
    sys.exit(EXIT_ERRORS if failed else report.exit_code())


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), default=Path("demo"))
@click.option(
    "--scale",
    type=click.FloatRange(0.001, 100),
    default=1.0,
    show_default=True,
    help="Multiply artifact sizes (0.01 for a tiny store).",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--clean", is_flag=True, help="Plant no faults.")
def demo(directory: Path, scale: float, seed: int, clean: bool):
    """Build a realistic chachaml store in DIRECTORY with one of each real-world fault.

    \b
    Example:
      chachaml-ops demo /tmp/demo && chachaml-ops verify --db /tmp/demo/chachaml.db
    """
    from chachaml_ops.demo import ALL_FAULTS, make_store

    if (directory / "chachaml.db").exists():
        raise UsageError(
            f"{directory / 'chachaml.db'} already exists", "choose an empty folder or remove it"
        )
    store = make_store(directory, () if clean else ALL_FAULTS, seed=seed, scale=scale)
    total = sum(f.stat().st_size for f in store.artifact_dir.rglob("*") if f.is_file())
    click.echo(
        f"Built {store.db} with {len(store.runs) + ('retention_leftover' in ALL_FAULTS)}"
        f" runs and {len(store.artifacts)} artifacts ({human_bytes(total)}) "
        f"in {store.artifact_dir}"
    )
    if store.planted:
        click.echo(f"Planted {len(store.planted)} faults, each a finding verify must report:")
        for p in store.planted:
            click.echo(f"  {p.kind:<24} {p.path or '(model registry)'}")
            click.echo(f"  {'':<24} {p.fault}: {p.note}")
    click.echo(f"Next: chachaml-ops verify --db {store.db}")


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="chachaml-ops", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        exc.show()
        sys.exit(EXIT_CANNOT_CHECK)
    except click.exceptions.ClickException as exc:
        exc.show()
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
    sys.exit(rv if isinstance(rv, int) else 0)
