"""One scheduled job on one store: take the store lock, call the core, record, alert, export.

Shared by the daemon's scheduler and its file watcher; knows nothing of APScheduler, so the
same code runs whether a job was fired by cron, by catch-up at start, or by a lost-event rescan.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chachaml_ops import metrics
from chachaml_ops.alerts import Alerter
from chachaml_ops.config import Config, StoreConfig
from chachaml_ops.errors import EXIT_CANNOT_CHECK, Interrupted, OpsError
from chachaml_ops.logs import get_logger
from chachaml_ops.report import Finding, Report, Severity
from chachaml_ops.state import StateDB, StoreBusy, store_lock
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, Subset, run_check

StopFn = Callable[[], bool]
# Findings logged one per line per job; the rest are counted in the job's summary line.
MAX_LOGGED_FINDINGS = 200
RESCAN = "rescan"


class BackupUnavailable(OpsError):
    """This build has no chachaml_ops.backup module (or it lacks run_backup)."""


class StateUnreadable(OpsError):
    """The state dir cannot be opened (usually: not the service user)."""


@dataclass(frozen=True)
class JobOutcome:
    store: str
    job: str
    started: float
    finished: float
    exit_code: int
    summary: dict[str, Any]


class JobRunner:
    """Runs jobs for one loaded config. Thread-safe: each call opens its own connections."""

    def __init__(
        self,
        config: Config,
        should_stop: StopFn,
        clock: Callable[[], float] = time.time,
        watch_counts: dict[tuple[str, str], int] | None = None,
    ):
        self.config = config
        self.should_stop = should_stop
        self.clock = clock
        self.alerter = Alerter(config.alerts, config.state_dir, should_stop)
        # Since the daemon started: handed on to the next runner at a reload, not reset.
        self.watch_counts: dict[tuple[str, str], int] = {} if watch_counts is None else watch_counts
        # Jobs and watchers finish on different threads; one writer of the textfile at a time.
        self._metrics_lock = threading.Lock()

    # -- the whole job --------------------------------------------------------------------

    def run(self, store_name: str, job: str) -> JobOutcome | None:
        """Run `job` on a store; None when the daemon stopped before the job could start."""
        store = self.config.store(store_name)
        log = get_logger("chachaml_ops.daemon", store=store.name, job=job)
        with ExitStack() as held:
            try:
                self._wait_for_lock(held, store, log)
            except Interrupted:
                log.info("job_skipped", reason="daemon stopping")
                return None
            except StoreBusy as exc:
                started = self.clock()
                outcome = JobOutcome(
                    store.name, job, started, started, EXIT_CANNOT_CHECK, {"error": exc.one_line()}
                )
                log.error("job_failed", error=exc.one_line())
                self._record(store, outcome)
                return outcome
            if self.should_stop():
                # Got the lock as the daemon began stopping: never start, never ping.
                log.info("job_skipped", reason="daemon stopping")
                return None
            return self._run_locked(store, job, log)

    def close(self) -> None:
        """This runner is retired (reload, shutdown): stop its webhook sender."""
        self.alerter.close()

    def _wait_for_lock(self, held: ExitStack, store: StoreConfig, log) -> None:
        """Take the store's lock into `held`, waiting while another job or a CLI run has it.

        A busy store delays the job; it never runs twice side by side. Waiting ends when the
        daemon stops (Interrupted) or after lock_wait (StoreBusy).
        """
        deadline = time.monotonic() + self.config.lock_wait
        waited = False
        while True:
            if self.should_stop():
                raise Interrupted("the daemon is stopping")
            try:
                held.enter_context(
                    store_lock(
                        self.config.state_dir, store.db, wait=1.0, holder="chachaml-ops daemon"
                    )
                )
            except StoreBusy as exc:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    log.info("store_busy", detail=exc.one_line())
                    waited = True
                continue
            if waited:
                log.info("store_free")
            return

    def _run_locked(self, store: StoreConfig, job: str, log) -> JobOutcome | None:
        run_id = str(uuid.uuid4())
        self.alerter.ping("start", run_id)
        if self.should_stop():
            # Stopped while the start ping was out: the job never ran, so no end ping either.
            log.info("job_skipped", reason="daemon stopping")
            return None
        log.info("job_started")
        started = self.clock()
        report: Report | None = None
        try:
            if job in ("verify", RESCAN):
                report, summary = self._verify(store, quick=(job == RESCAN))
            elif job == "orphans":
                report, summary = self._orphans(store)
            elif job == "backup":
                report, summary = run_backup_adapter(store, self.config, self.should_stop)
            else:
                raise ValueError(f"unknown job {job!r}")
            exit_code = summary["exit_code"]
        except Interrupted as exc:
            # SIGTERM mid-job: not a failure to alert on; catch-up at the next start reruns it.
            exit_code, summary = EXIT_CANNOT_CHECK, {"exit_code": 3, "interrupted": True}
            log.info("job_interrupted", detail=exc.one_line())
        except OpsError as exc:
            exit_code, summary = (
                exc.exit_code,
                {"exit_code": exc.exit_code, "error": exc.one_line()},
            )
            log.error("job_failed", error=exc.one_line())
        except Exception as exc:  # a bug or an OS error: record it, keep the daemon alive
            exit_code, summary = EXIT_CANNOT_CHECK, {"exit_code": 3, "error": repr(exc)}
            log.exception("job_crashed")
        outcome = JobOutcome(store.name, job, started, self.clock(), exit_code, summary)
        self._record(store, outcome)
        if report is not None:
            self._log_and_alert(store.name, job, report, log)
        log.info(
            "job_finished",
            exit_code=exit_code,
            duration_s=round(outcome.finished - outcome.started, 3),
            **{k: v for k, v in summary.items() if k in ("by_kind", "interrupted", "error")},
        )
        suffix = "fail" if "error" in summary and exit_code == EXIT_CANNOT_CHECK else str(exit_code)
        self.alerter.ping(suffix, run_id, _ping_body(outcome))
        self.write_metrics()
        return outcome

    # -- the core calls -------------------------------------------------------------------

    def _verify(self, store: StoreConfig, *, quick: bool) -> tuple[Report, dict[str, Any]]:
        cfg = self.config.verify
        kw: dict[str, Any] = {
            "hash": not (quick or cfg.quick),
            "subset": None if quick or cfg.subset is None else self._next_subset(store, cfg.subset),
            "min_age": cfg.min_age,
            "drop_cache": cfg.drop_cache,
            "max_rate": cfg.max_rate,
        }
        if cfg.jobs:
            kw["jobs"] = cfg.jobs
        if not quick and (cfg.max_age is not None or cfg.max_duration is not None):
            kw.update(
                max_age=cfg.max_age, max_duration=cfg.max_duration, state_dir=self.config.state_dir
            )
        # Never fork worker processes from the daemon: its scheduler and watcher threads may
        # hold locks (logging, SQLite) that a forked child would inherit locked.
        kw["processes"] = False
        with Store(store.db) as s:
            report = run_check(
                s, store.artifact_dir, CheckOptions(**kw), should_stop=self.should_stop
            )
        interrupted = bool(report.stats.get("interrupted"))
        # An interrupted check is not a success: catch-up at the next start runs it again.
        exit_code = EXIT_CANNOT_CHECK if interrupted else report.exit_code()
        return report, {"exit_code": exit_code, "by_kind": report.counts(), **report.stats}

    def _next_subset(self, store: StoreConfig, configured: Subset) -> Subset:
        """A fixed slice would hash the same files every night: rotate n through 1..t, so t
        successful runs cover every artifact (the config's n is where the rotation starts)."""
        try:
            with StateDB(self.config.state_dir) as state:
                last = state.last_job(store.state_key, "verify", success=True)
        except (OSError, sqlite3.Error):
            last = None  # history unreadable (logged when the run is recorded)
        try:
            previous = Subset.parse(str(last.summary.get("subset"))) if last else None
        except OpsError:
            previous = None
        if previous is None or previous.t != configured.t:
            return configured
        return Subset(previous.n % configured.t + 1, configured.t)

    def _orphans(self, store: StoreConfig) -> tuple[Report, dict[str, Any]]:
        from chachaml_ops.orphans import find_orphans

        with Store(store.db) as s:
            report = find_orphans(
                s, store.artifact_dir, self.config.orphans.min_age, processes=False
            )
        return report, {"exit_code": report.exit_code(), "by_kind": report.counts(), **report.stats}

    # -- after a job ----------------------------------------------------------------------

    def _record(self, store: StoreConfig, outcome: JobOutcome) -> None:
        """Add the run to the history; a state DB that cannot be written is logged, and the
        job's findings, alerts and end ping still go out."""
        try:
            with StateDB(self.config.state_dir) as state:
                state.record_job(
                    store.state_key,
                    outcome.job,
                    outcome.started,
                    outcome.finished,
                    outcome.exit_code,
                    outcome.summary,
                )
        except (OSError, sqlite3.Error) as exc:
            get_logger("chachaml_ops.daemon", store=store.name, job=outcome.job).error(
                "history_write_failed", state_dir=str(self.config.state_dir), error=str(exc)
            )

    def _log_and_alert(self, store: str, job: str, report: Report, log) -> None:
        worth = [f for f in report.findings if f.severity is not Severity.INFO]
        for f in worth[:MAX_LOGGED_FINDINGS]:
            log.warning("finding", **finding_fields(f))
        if len(worth) > MAX_LOGGED_FINDINGS:
            log.warning("findings_not_logged", count=len(worth) - MAX_LOGGED_FINDINGS)
        complete = (
            job == "verify"
            and not report.stats.get("interrupted")
            and self.config.verify.subset is None
        )
        new = self.alerter.new_errors(store, report.findings, complete=complete)
        self.alerter.webhook(store, job, new)

    def watch_finding(self, store: str, finding: Finding) -> None:
        """A finding from the file watcher: log it, alert if it is a new error, count it."""
        log = get_logger("chachaml_ops.watcher", store=store, job="watch")
        log.warning("finding", **finding_fields(finding))
        key = (store, finding.kind)
        with self._metrics_lock:
            self.watch_counts[key] = self.watch_counts.get(key, 0) + 1
        new = self.alerter.new_errors(store, [finding], complete=False)
        # Queued and batched: a hanging webhook must not hold the watcher (one file per timeout).
        self.alerter.queue_webhook(store, new)
        self.write_metrics()

    def write_metrics(self) -> None:
        path = self.config.metrics.textfile
        if path is None:
            return
        try:
            with self._metrics_lock, StateDB(self.config.state_dir) as state:
                samples = collect_samples(state, self.config.stores)
                samples += [
                    metrics.Sample("watch_findings", {"store": s, "kind": k}, n)
                    for (s, k), n in self.watch_counts.items()
                ]
                metrics.write_textfile(path, metrics.render(samples))
        except (OSError, sqlite3.Error) as exc:
            get_logger("chachaml_ops.daemon").error(
                "metrics_write_failed", path=str(path), error=str(exc)
            )


def finding_fields(f: Finding) -> dict[str, Any]:
    doc = f.to_json()
    return {
        "kind": f.kind,
        "severity": doc["severity"],
        "path": doc["path"],
        "artifact_id": f.artifact_id,
        "detail": f.detail,
    }


def _ping_body(outcome: JobOutcome) -> str:
    s = outcome.summary
    parts = [f"{outcome.job} on {outcome.store}: exit {outcome.exit_code}"]
    if s.get("by_kind"):
        parts.append(", ".join(f"{k} {n}" for k, n in s["by_kind"].items()))
    if s.get("error"):
        parts.append(str(s["error"]))
    return "; ".join(parts)


# -- metrics from the state DB ------------------------------------------------------------


def collect_samples(state: StateDB, stores: Iterable[StoreConfig]) -> list[metrics.Sample]:
    """Every metric from the job history, so a restart re-exports the same numbers."""
    out: list[metrics.Sample] = []
    for store in stores:
        label = {"store": store.name}
        for job in ("verify", "orphans", "backup"):
            last = state.last_job(store.state_key, job)
            if last is None or last.finished is None:
                continue
            jl = {**label, "job": job}
            out.append(metrics.Sample("job_last_exit_code", jl, last.exit_code or 0))
            out.append(metrics.Sample("job_last_run_timestamp_seconds", jl, last.finished))
            out.append(
                metrics.Sample(f"{job}_duration_seconds", label, last.finished - last.started)
            )
            out.append(metrics.Sample(f"{job}_last_exit_code", label, last.exit_code or 0))
            ok = state.last_job(store.state_key, job, success=True)
            if ok is not None and ok.finished is not None:
                out.append(
                    metrics.Sample(f"{job}_last_success_timestamp_seconds", label, ok.finished)
                )
            # Result gauges come from the last COMPLETE run (exit < 3): an interrupted or
            # failed run must neither overwrite them with partial counts nor remove them.
            s = ok.summary if ok is not None else {}
            if job == "verify" and "rows" in s:
                out.append(metrics.Sample("artifacts", label, s["rows"]))
            if job in ("verify", "orphans"):
                by_kind = dict(s.get("by_kind") or {})
                for kind in ("missing", "size_mismatch", "hash_mismatch", "orphan_file"):
                    by_kind.setdefault(kind, 0)  # a zero series, so alerts can see it fall
                for kind, n in by_kind.items():
                    out.append(metrics.Sample("findings", {**jl, "kind": kind}, n))
                orphan_bytes = s.get("orphan_bytes", s.get("reclaimable_bytes"))
                if orphan_bytes is not None:
                    out.append(metrics.Sample("orphan_bytes", jl, orphan_bytes))
            if job == "backup" and ok is not None and isinstance(ok.summary.get("bytes"), int):
                out.append(metrics.Sample("backup_size_bytes", label, ok.summary["bytes"]))
    return out


# -- backup: the adapter to the backup module ----------------------------------------------


def run_backup_adapter(
    store: StoreConfig, config: Config, should_stop: StopFn
) -> tuple[Report, dict[str, Any]]:
    """One backup of a store into [backup] dir, then pruning by the keep_* policy; the same
    calls as `chachaml-ops backup`. The caller holds the store lock.

    Imported lazily: a build without the backup module still runs verify and orphans, and
    the backup job fails with a clear error instead of the daemon failing to start.
    """
    try:
        from chachaml_ops.backup import BackupOptions, backup_and_prune
        from chachaml_ops.retention import RetentionPolicy
    except ImportError as exc:
        raise BackupUnavailable(
            f"this chachaml-ops cannot make backups ({exc})", "install a release with backup"
        ) from None
    cfg = config.backup
    if cfg.dir is None:
        raise BackupUnavailable("[backup] dir is not set", "set it in the config")
    policy = RetentionPolicy(0, cfg.keep_daily, cfg.keep_weekly, cfg.keep_monthly)
    with Store(store.db) as s:
        report, result, _ = backup_and_prune(
            s,
            store.artifact_dir,
            cfg.dir,
            BackupOptions(compression=cfg.compression),
            policy,
            should_stop=should_stop,
        )
    summary = {"exit_code": report.exit_code(), "by_kind": report.counts(), **result.stats()}
    return report, summary


# -- status: what ran, what runs next -----------------------------------------------------


def read_daemon_status(state_dir: Path) -> dict[str, Any] | None:
    """The running daemon's status file, or None when there is none or its process is gone."""
    try:
        doc = json.loads((Path(state_dir) / "daemon.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("stopped"):
        return None
    try:
        os.kill(int(doc.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return None
    except PermissionError:
        pass  # alive, owned by the service user
    return doc


def status_report(
    config: Config,
    daemon_doc: dict[str, Any] | None,
    by_schedule: dict[tuple[str, str], float | None],
    due_at_start: Callable[[str, float | None], bool] | None = None,
) -> dict[str, Any]:
    """Per store and task: the last run, the last success, and the next run.

    `due_at_start(task, last_success_start)`: whether a daemon started now would run the job
    at once (catch-up); shown instead of the schedule's next time when no daemon runs."""
    from_daemon = {
        (j["store"], j["job"]): j.get("next_run") for j in (daemon_doc or {}).get("jobs", [])
    }
    stores = []
    try:
        state = StateDB(config.state_dir)
    except (OSError, sqlite3.Error) as exc:
        raise StateUnreadable(
            f"cannot read the state dir {config.state_dir}: {exc}",
            "run as the service user, e.g. sudo -u chachaml-ops chachaml-ops status",
        ) from None
    with state:
        for store in config.stores:
            tasks = {}
            for task in ("verify", "orphans", "backup"):
                last = state.last_job(store.state_key, task)
                ok = state.last_job(store.state_key, task, success=True)
                scheduled = config.schedule(task) is not None
                if daemon_doc is not None:
                    nxt = from_daemon.get((store.name, task))
                else:
                    nxt = by_schedule.get((store.name, task))
                catch_up = bool(
                    scheduled
                    and daemon_doc is None
                    and due_at_start is not None
                    and due_at_start(task, ok.started if ok else None)
                )
                tasks[task] = {
                    "schedule": str(config.schedule(task)) if scheduled else None,
                    "last_run": _run_json(last),
                    "last_success": ok.finished if ok else None,
                    "next_run": nxt if scheduled else None,
                    "catch_up_at_start": catch_up,
                }
            stores.append({"name": store.name, "db": str(store.db), "jobs": tasks})
    return {
        "config": str(config.source),
        "state_dir": str(config.state_dir),
        "daemon": (
            {"running": True, "pid": daemon_doc.get("pid"), "busy": daemon_doc.get("running", [])}
            if daemon_doc
            else {"running": False}
        ),
        "timezone": config.timezone,
        "stores": stores,
    }


def _run_json(run) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "started": run.started,
        "finished": run.finished,
        "exit_code": run.exit_code,
        "summary": run.summary,
    }
