"""The long-running service: APScheduler wiring, catch-up at start, signals and sd_notify.

The only module that imports apscheduler. Jobs themselves run in jobs.JobRunner; file events
come from watcher.StoreWatcher; this module decides when things run and how the process stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from chachaml_ops import logs
from chachaml_ops.config import (
    TASKS,
    Config,
    ConfigError,
    CronSpec,
    load_config,
    require_writable_state_dir,
)
from chachaml_ops.errors import OpsError
from chachaml_ops.jobs import RESCAN, JobRunner
from chachaml_ops.logs import get_logger
from chachaml_ops.notify import Notifier
from chachaml_ops.report import iso_time
from chachaml_ops.state import StateDB, StateDirUnusable

STATUS_FILE = "daemon.json"
# A run that could not start on time (the machine slept, all threads busy) still runs if it is
# at most this late; older ones are dropped and catch-up at the next start covers them.
MISFIRE_GRACE_S = 6 * 3600
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def cron_trigger(spec: CronSpec, timezone: str) -> CronTrigger:
    """APScheduler's trigger for a parsed crontab line.

    Not CronTrigger.from_crontab: APScheduler numbers weekdays from Monday, crontab from
    Sunday, so numeric weekdays are passed as names here.
    """

    def values(field: tuple[int, ...] | None) -> str:
        return "*" if field is None else ",".join(map(str, field))

    dow = "*" if spec.day_of_week is None else ",".join(_CRON_DAYS[d] for d in spec.day_of_week)
    return CronTrigger(
        minute=values(spec.minute),
        hour=values(spec.hour),
        day=values(spec.day),
        month=values(spec.month),
        day_of_week=dow,
        timezone=ZoneInfo(timezone),
    )


def next_runs(config: Config, now: float | None = None) -> dict[tuple[str, str], float | None]:
    """When each (store, task) runs next by its schedule alone (for `status` when no daemon)."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    out: dict[tuple[str, str], float | None] = {}
    for task in TASKS:
        spec = config.schedule(task)
        if spec is None:
            continue
        nxt = cron_trigger(spec, config.timezone).get_next_fire_time(None, moment)
        for store in config.stores:
            out[(store.name, task)] = nxt.timestamp() if nxt else None
    return out


def is_due(spec: CronSpec, timezone: str, last_start: float | None, now: float) -> bool:
    """Persistent=true semantics: a scheduled time passed since the last success started."""
    if last_start is None:
        return True
    trigger = cron_trigger(spec, timezone)
    after = datetime.fromtimestamp(last_start, UTC)
    nxt = trigger.get_next_fire_time(None, after)
    return nxt is not None and nxt.timestamp() <= now


def _configure_logging(level: str) -> None:
    logs.configure(level)
    # APScheduler logs every job's start and end at INFO; our job_started/job_finished say it.
    logging.getLogger("apscheduler").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


def check_state_dir(state_dir: Path) -> None:
    """Open (and so create) the job history once: a state dir that cannot hold it is a start
    failure with one line and exit 3 (no restart), not a traceback."""
    try:
        with StateDB(state_dir) as state:
            state.conn.execute("BEGIN IMMEDIATE")  # a write lock: proves it is writable
            state.conn.execute("ROLLBACK")
    except (OSError, sqlite3.Error) as exc:
        raise StateDirUnusable(
            f"cannot use the state dir {state_dir}: {exc}",
            "set state_dir in the config to a folder the service user can write",
        ) from None


class Daemon:
    def __init__(self, config_path: Path, *, notifier: Notifier | None = None) -> None:
        self.config_path = Path(config_path).absolute()
        self.config = load_config(self.config_path)
        _configure_logging(self.config.log_level)
        self.log = get_logger("chachaml_ops.daemon")
        require_writable_state_dir(self.config)
        check_state_dir(self.config.state_dir)
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.running: dict[str, float] = {}
        self.running_lock = threading.Lock()
        self.last_result = ""
        self.watchers: list[Any] = []
        self.runner = JobRunner(self.config, self.stop_event.is_set)
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max(4, 3 * len(self.config.stores) + 1))},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": MISFIRE_GRACE_S,
            },
            timezone=ZoneInfo(self.config.timezone),
        )

    # -- setup ------------------------------------------------------------------------------

    def _warn_missing_dbs(self, config: Config) -> None:
        for store in config.stores:
            if not store.db.exists():
                self.log.warning(
                    "store_db_missing",
                    store=store.name,
                    db=str(store.db),
                    action="its jobs exit 3 until the file appears; other stores run",
                )

    def _schedule_all(self, runner: JobRunner, config: Config) -> list[str]:
        """Add one job per (store, task); return the ids of those due now (catch-up)."""
        self._warn_missing_dbs(config)
        now = time.time()
        due: list[str] = []
        try:
            state = StateDB(config.state_dir)
        except (OSError, sqlite3.Error) as exc:
            # History unreadable (at a reload): schedule by cron alone, no catch-up.
            self.log.error("history_read_failed", error=str(exc), action="no catch-up")
            state = None
        with contextlib.ExitStack() as held:
            if state is not None:
                held.callback(state.close)
            for task in TASKS:
                spec = config.schedule(task)
                if spec is None:
                    continue
                trigger = cron_trigger(spec, config.timezone)
                for store in config.stores:
                    job_id = f"{store.name}:{task}"
                    last = state.last_job(store.state_key, task, success=True) if state else None
                    catch_up = state is not None and is_due(
                        spec, config.timezone, last and last.started, now
                    )
                    kwargs: dict[str, Any] = {}
                    if catch_up:
                        kwargs["next_run_time"] = datetime.now(UTC)
                        due.append(job_id)
                    self.scheduler.add_job(
                        self._job,
                        trigger,
                        args=(runner, store.name, task),
                        id=job_id,
                        name=job_id,
                        replace_existing=True,
                        **kwargs,
                    )
        return due

    def _start_watchers(self, runner: JobRunner, config: Config) -> None:
        if not config.watch.enabled:
            return
        from chachaml_ops.watcher import StoreWatcher

        for store in config.stores:
            watcher = StoreWatcher(store, config.watch, runner.watch_finding, self.request_rescan)
            try:
                watcher.start()
            except OSError as exc:
                self.log.error("watch_failed", store=store.name, error=str(exc))
                continue
            self.watchers.append(watcher)

    def _stop_watchers(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        self.watchers = []

    def request_rescan(self, store: str, reason: str) -> None:
        """Lost file events: run a quick full check of the store (the scan is the truth)."""
        if self.stop_event.is_set():
            return
        self.scheduler.add_job(
            self._job,
            args=(self.runner, store, RESCAN),
            id=f"{store}:{RESCAN}",
            name=f"{store}:{RESCAN} ({reason})",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def _job(self, runner: JobRunner, store: str, task: str) -> None:
        key = f"{store}:{task}"
        with self.running_lock:
            self.running[key] = time.time()
        self.wake.set()
        try:
            outcome = runner.run(store, task)
            if outcome is not None:
                self.last_result = f"last {task} on {store}: exit {outcome.exit_code}"
        finally:
            with self.running_lock:
                self.running.pop(key, None)
            self.wake.set()

    # -- running ----------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        self.scheduler.start(paused=True)
        due = self._schedule_all(self.runner, self.config)
        self._start_watchers(self.runner, self.config)
        self.runner.write_metrics()
        self.scheduler.resume()
        self.log.info(
            "daemon_started",
            config=str(self.config_path),
            stores=[s.name for s in self.config.stores],
            catch_up=due,
            watch=self.config.watch.enabled,
            pid=os.getpid(),
        )
        self.notifier.ready(self._status_text())
        self._write_status()
        interval = self.notifier.watchdog_interval
        shown, pinged = "", 0.0
        while not self.stop_event.is_set():
            self.wake.wait(timeout=min(interval or 1.0, 1.0))
            self.wake.clear()
            if self.stop_event.is_set():
                break
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            # From the main loop, not a job thread: a wedged loop stops the pings and systemd
            # restarts the service, while a long verify never looks like a hang.
            if interval and time.monotonic() - pinged >= interval:
                pinged = time.monotonic()
                self.notifier.watchdog()
            text = self._status_text()
            if text != shown:
                shown = text
                self.notifier.status(text)
                self._write_status()
        return self._shutdown()

    def _on_stop(self, signum, frame) -> None:
        self.stop_event.set()
        self.wake.set()

    def _on_reload(self, signum, frame) -> None:
        self.reload_requested = True
        self.wake.set()

    def reload(self) -> None:
        """SIGHUP: swap in the new config; a bad one keeps the old and says why."""
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
            require_writable_state_dir(config)
        except ConfigError as exc:
            self.log.error(
                "reload_failed",
                config=str(self.config_path),
                problems=[str(p) for p in exc.problems],
                action="keeping the running config",
            )
            self.notifier.ready(self._status_text())
            return
        except OpsError as exc:
            self.log.error(
                "reload_failed", error=exc.one_line(), action="keeping the running config"
            )
            self.notifier.ready(self._status_text())
            return
        self._stop_watchers()
        for job in self.scheduler.get_jobs():
            job.remove()
        self.runner.close()
        _configure_logging(config.log_level)
        self.config = config
        self.runner = JobRunner(
            config, self.stop_event.is_set, watch_counts=self.runner.watch_counts
        )
        due = self._schedule_all(self.runner, config)
        self._start_watchers(self.runner, config)
        self.runner.write_metrics()
        self.log.info(
            "config_reloaded",
            config=str(self.config_path),
            stores=[s.name for s in config.stores],
            catch_up=due,
        )
        self.notifier.ready(self._status_text())
        self._write_status()

    def _shutdown(self) -> int:
        self.log.info("daemon_stopping", running=sorted(self.running))
        self.notifier.stopping("stopping: letting running jobs reach a file boundary")
        self._stop_watchers()
        # Running jobs see stop_event at their next file and return; queued ones never start.
        self.scheduler.shutdown(wait=True)
        self.runner.close()
        self._write_status(stopped=True)
        self.log.info("daemon_stopped")
        return 0

    # -- status -----------------------------------------------------------------------------

    def _status_text(self) -> str:
        with self.running_lock:
            running = sorted(self.running)
        head = "running " + ", ".join(running) if running else "idle"
        nxt = [j for j in self.scheduler.get_jobs() if j.next_run_time is not None]
        if nxt and not running:
            first = min(nxt, key=lambda j: j.next_run_time)
            head += f"; next {first.id} at {iso_time(first.next_run_time.timestamp())}"
        return head + (f"; {self.last_result}" if self.last_result else "")

    def _write_status(self, *, stopped: bool = False) -> None:
        jobs = []
        if not stopped:
            for job in self.scheduler.get_jobs():
                store, _, task = job.id.partition(":")
                when = job.next_run_time.timestamp() if job.next_run_time else None
                jobs.append({"store": store, "job": task, "next_run": when})
        doc = {
            "pid": os.getpid(),
            "config": str(self.config_path),
            "updated": time.time(),
            "stopped": stopped,
            "running": sorted(self.running),
            "jobs": jobs,
        }
        path = self.config.state_dir / STATUS_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1), "utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            self.log.warning("status_write_failed", path=str(path), error=str(exc))


def run_daemon(config_path: Path) -> int:
    return Daemon(config_path).run()
