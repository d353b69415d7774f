"""The daemon: config validation, catch-up, watching, signals, sd_notify, locks, alerts, units.

Daemon behaviour is tested on real processes (`python -m chachaml_ops daemon`) against real
stores in tmp_path; schedules that never fire during a test keep runs down to catch-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_cli

from chachaml_ops.config import (
    ConfigError,
    load_config,
    parse_config,
    parse_cron,
)
from chachaml_ops.daemon import cron_trigger, is_due
from chachaml_ops.demo import ChachamlWriter
from chachaml_ops.jobs import JobRunner
from chachaml_ops.metrics import Sample, render, write_textfile
from chachaml_ops.notify import Notifier
from chachaml_ops.state import StateDB

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
# Schedules that will not fire while a test runs: only catch-up at start runs jobs.
NIGHTLY = "0 3 * * *"


def write_config(path: Path, store, *, state: Path, extra: str = "", top: str = "") -> Path:
    """A config for one store named main; `top` goes before the tables, `extra` after."""
    path.write_text(
        f'state_dir = "{state}"\n{top}\n[[store]]\nname = "main"\ndb = "{store.db}"\n'
        + textwrap.dedent(extra)
    )
    return path


class DaemonProcess:
    """`chachaml-ops daemon` in its own process, its JSON log lines collected as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chachaml_ops", "daemon", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: list[dict] = []
        self.raw: list[str] = []
        self._new: queue.Queue[dict] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            self._new.put(event)

    def wait_for(self, predicate, timeout: float = 15.0) -> dict:
        """The first logged event (past or future) for which predicate(event) is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._new.empty()):
                raise AssertionError(
                    f"no matching event in {timeout}s; exit {self.proc.poll()}; log:\n"
                    + "".join(self.raw[-40:])
                )
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(left, 0.2))

    def event(self, name: str, timeout: float = 15.0, **fields) -> dict:
        return self.wait_for(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()),
            timeout,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=2)
        return code

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- config -------------------------------------------------------------------------------


def test_config_errors_are_all_listed_in_one_run(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            state_dri = "{tmp_path}/state"
            [[store]]
            name = "main"
            db = "{tmp_path}"
            [verify]
            schedule = "0 25 * * *"
            """
        )
    )
    result = run_cli("config", "check", config)
    assert result.code == 3
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {config}: 3 problem(s) in the config"
    assert any(
        ln.strip().startswith("state_dri: unknown key") and "did you mean 'state_dir'" in ln
        for ln in lines
    )
    assert any(ln.strip().startswith(f"store[0].db: {tmp_path} is not a file") for ln in lines)
    assert any(ln.strip().startswith("verify.schedule: hour: 25 is outside 0-23") for ln in lines)


def test_daemon_with_a_bad_config_exits_3_before_starting(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[store]]\nname = "x"\ndb = "nowhere.db"\n[watch]\nenabled = "yes"\n')
    result = run_cli("daemon", "--config", config, timeout=30)
    assert result.code == 3
    assert "watch.enabled: must be true or false" in result.stderr


def test_config_is_found_through_the_environment_variable(tmp_path, clean_store):
    config = write_config(tmp_path / "c.toml", clean_store, state=tmp_path / "state")
    result = run_cli("config", "check", env={**os.environ, "CHACHAML_OPS_CONFIG": str(config)})
    assert result.code == 0, result.stderr
    assert f"config {config}: OK" in result.stdout


def test_shipped_example_config_is_valid(tmp_path, clean_store):
    text = (SYSTEMD / "config.example.toml").read_text()
    (tmp_path / "prom").mkdir()
    text = text.replace("/srv/ml/chachaml.db", str(clean_store.db)).replace(
        "/var/lib/prometheus/node-exporter", str(tmp_path / "prom")
    )
    config = parse_config(__import__("tomllib").loads(text), tmp_path / "x.toml")
    assert [s.name for s in config.stores] == ["main"]
    assert str(config.verify.schedule) == "0 3 * * *"
    assert config.watch.enabled is True


def test_relative_paths_are_relative_to_the_config_file(tmp_path, clean_store):
    (tmp_path / "etc").mkdir()
    rel = os.path.relpath(clean_store.db, tmp_path / "etc")
    config = tmp_path / "etc" / "c.toml"
    config.write_text(f'state_dir = "st"\n[[store]]\nname = "a"\ndb = "{rel}"\n')
    loaded = load_config(config)
    assert loaded.state_dir == tmp_path / "etc" / "st"
    assert loaded.stores[0].db.resolve() == clean_store.db.resolve()
    assert loaded.stores[0].artifact_dir.resolve() == clean_store.artifact_dir.resolve()


def test_cron_accepts_names_steps_ranges_and_sunday_as_7():
    spec = parse_cron("*/15 2-4 * jan,Jul sat-sun")
    assert spec.minute == (0, 15, 30, 45)
    assert spec.hour == (2, 3, 4)
    assert spec.month == (1, 7)
    assert parse_cron("0 0 * * 7").day_of_week == (0,)
    assert parse_cron("0 0 * * 1-5").day_of_week == (1, 2, 3, 4, 5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 3 * *", "has 4 field(s)"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("0 3 * * funday", "day of week: 'funday' is not a number"),
        ("0 3 1 * mon", "not both"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("0 5-2 * * *", "runs backwards"),
    ],
)
def test_bad_cron_lines_say_what_is_wrong(line, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cron(line)


def test_crontab_sunday_is_sunday_in_the_scheduler():
    # APScheduler counts weekdays from Monday; a naive from_crontab would run this on Monday.
    trigger = cron_trigger(parse_cron("0 3 * * 0"), "UTC")
    nxt = trigger.get_next_fire_time(None, datetime(2026, 12, 3, tzinfo=UTC))  # a Thursday
    assert nxt == datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
    assert nxt.strftime("%A") == "Sunday"


def test_a_job_is_due_when_a_scheduled_time_passed_since_its_last_success():
    spec = parse_cron(NIGHTLY)
    night = datetime(2026, 12, 3, 3, 0, tzinfo=UTC).timestamp()
    assert is_due(spec, "UTC", None, night)  # never ran
    assert is_due(spec, "UTC", night - 86400, night + 60)  # missed last night's run
    assert not is_due(spec, "UTC", night + 1, night + 3600)  # ran tonight already
    assert not is_due(spec, "Europe/Berlin", night + 1, night + 3600)


# -- jobs in process: alerts, interruption, metrics -----------------------------------------


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        self.server.requests.append((self.path, self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _config(tmp_path, store, extra="", top=""):
    config = write_config(tmp_path / "c.toml", store, state=tmp_path / "st", extra=extra, top=top)
    return load_config(config)


def test_ping_and_webhook_report_a_job_and_only_new_error_findings(
    tmp_path, store_factory, http_server
):
    store = store_factory(["bit_rot"])
    base = f"http://127.0.0.1:{http_server.server_port}"
    config = _config(
        tmp_path,
        store,
        f"""
        [verify]
        schedule = "{NIGHTLY}"
        min_age = "0s"
        [alerts]
        ping_url = "{base}/ping/abc"
        webhook_url = "{base}/hook"
        timeout = "2s"
        """,
    )
    runner = JobRunner(config, lambda: False)
    outcome = runner.run("main", "verify")
    assert outcome.exit_code == 2
    paths = [p for p, _ in http_server.requests]
    start, hook, end = paths
    assert start.startswith("/ping/abc/start?rid=")
    assert hook == "/hook"
    assert end == "/ping/abc/2?rid=" + start.split("rid=")[1]  # the same run id pairs them
    body = json.loads(http_server.requests[1][1])
    assert "1 new error finding(s) in store main" in body["text"]
    assert "hash_mismatch" in body["text"]
    assert [f["kind"] for f in body["findings"]] == ["hash_mismatch"]

    http_server.requests.clear()
    runner.run("main", "verify")
    assert [p.split("?")[0] for p, _ in http_server.requests] == ["/ping/abc/start", "/ping/abc/2"]


def test_unreachable_alert_urls_never_break_a_job(tmp_path, clean_store):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(
        tmp_path,
        clean_store,
        f"""
        [alerts]
        ping_url = "http://127.0.0.1:{port}/p"
        webhook_url = "http://127.0.0.1:{port}/h"
        timeout = "1s"
        """,
    )
    outcome = JobRunner(config, lambda: False).run("main", "orphans")
    assert outcome.exit_code == 0
    with StateDB(config.state_dir) as state:
        assert state.last_job(config.stores[0].state_key, "orphans", success=True) is not None


def test_a_store_busy_past_lock_wait_fails_the_job_instead_of_doubling_it(tmp_path, clean_store):
    from chachaml_ops.state import store_lock

    config = _config(tmp_path, clean_store, top='lock_wait = "0s"')
    with store_lock(config.state_dir, clean_store.db, holder="chachaml-ops backup (cli)"):
        outcome = JobRunner(config, lambda: False).run("main", "orphans")
    assert outcome.exit_code == 3
    assert "another chachaml-ops job is working on" in outcome.summary["error"]
    assert "chachaml-ops backup (cli)" in outcome.summary["error"]


def test_a_stopped_verify_is_recorded_as_interrupted_not_as_a_success(tmp_path, clean_store):
    config = _config(tmp_path, clean_store, "[verify]\njobs = 1\n")
    calls = iter(range(10_000))
    # The daemon's stop flag turns true after a few files: the check ends at a file boundary.
    outcome = JobRunner(config, lambda: next(calls) > 5).run("main", "verify")
    assert outcome.exit_code == 3
    assert outcome.summary["interrupted"] is True
    assert 0 < outcome.summary["rows"] < len(clean_store.artifacts)
    with StateDB(config.state_dir) as state:
        assert state.last_job(config.stores[0].state_key, "verify", success=True) is None


def test_a_configured_subset_rotates_so_t_runs_hash_every_artifact(tmp_path, clean_store):
    config = _config(tmp_path, clean_store, '[verify]\nsubset = "1/3"\njobs = 1\n')
    runner = JobRunner(config, lambda: False)
    runs = [runner.run("main", "verify").summary for _ in range(4)]
    assert [r["subset"] for r in runs] == ["1/3", "2/3", "3/3", "1/3"]
    assert sum(r["files_hashed"] for r in runs[:3]) == len(clean_store.artifacts)
    assert runs[3]["files_hashed"] == runs[0]["files_hashed"]


def test_metrics_render_labels_escaped_and_write_is_atomic(tmp_path):
    text = render(
        [
            Sample("findings", {"store": 'a"b', "job": "verify", "kind": "missing"}, 3),
            Sample("verify_duration_seconds", {"store": "a"}, 1.5),
        ]
    )
    assert 'chachaml_ops_findings{job="verify",kind="missing",store="a\\"b"} 3' in text
    assert "# TYPE chachaml_ops_verify_duration_seconds gauge" in text
    target = tmp_path / "m.prom"
    write_textfile(target, text)
    write_textfile(target, text)
    assert target.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]  # no temp file left behind


def test_notifier_reaches_an_abstract_socket_and_is_a_no_op_without_one():
    name = f"chachaml-ops-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).reloading()
        head, usec = sock.recv(4096).decode().split("\nMONOTONIC_USEC=")
        assert head == "RELOADING=1" and 0 <= int(usec) - before < 2_000_000
    assert not Notifier({}).ready()
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0


# -- the daemon as a process ----------------------------------------------------------------


def test_catch_up_at_start_runs_every_job_writes_metrics_and_status(tmp_path, store_factory):
    store = store_factory(["bit_rot"])
    prom = tmp_path / "prom"
    prom.mkdir()
    config = write_config(
        tmp_path / "c.toml",
        store,
        state=tmp_path / "st",
        extra=f"""
        [verify]
        schedule = "{NIGHTLY}"
        [orphans]
        schedule = "{NIGHTLY}"
        [metrics]
        textfile = "{prom}/chachaml_ops.prom"
        """,
    )
    with DaemonProcess(config) as daemon:
        started = daemon.event("daemon_started")
        assert sorted(started["catch_up"]) == ["main:orphans", "main:verify"]
        finished = daemon.event("job_finished", job="verify")
        assert finished["exit_code"] == 2 and finished["by_kind"] == {"hash_mismatch": 1}
        assert daemon.event("finding", kind="hash_mismatch")["store"] == "main"
        daemon.event("job_finished", job="orphans")
        status = run_cli("status", "--config", config)
        assert daemon.stop() == 0
    metrics = (prom / "chachaml_ops.prom").read_text()
    assert 'chachaml_ops_verify_last_success_timestamp_seconds{store="main"}' in metrics
    assert 'chachaml_ops_findings{job="verify",kind="hash_mismatch",store="main"} 1' in metrics
    assert f'chachaml_ops_artifacts{{store="main"}} {len(store.artifacts)}' in metrics
    assert 'chachaml_ops_orphans_last_success_timestamp_seconds{store="main"}' in metrics
    assert "daemon: running" in status.stdout
    assert "verify   last: exit 2" in status.stdout and "next 20" in status.stdout

    # Started again right away: nothing was missed, so nothing runs at start.
    with DaemonProcess(config) as daemon:
        assert daemon.event("daemon_started")["catch_up"] == []
        assert daemon.stop() == 0
    status = run_cli("status", "--config", config, "--json").json()
    assert status["daemon"]["running"] is False
    verify = status["stores"][0]["jobs"]["verify"]
    assert verify["last_run"]["exit_code"] == 2 and verify["next_run"] > time.time()


def test_catch_up_at_start_makes_a_backup(tmp_path, clean_store):
    pytest.importorskip("chachaml_ops.backup")
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra=f"""
        [backup]
        schedule = "{NIGHTLY}"
        dir = "{tmp_path}/backups"
        [metrics]
        textfile = "{tmp_path}/m.prom"
        """,
    )
    with DaemonProcess(config) as daemon:
        finished = daemon.event("job_finished", job="backup", timeout=30)
        assert finished["exit_code"] == 0
        assert daemon.stop() == 0
    archives = list((tmp_path / "backups").iterdir())
    assert len(archives) >= 1
    metrics = (tmp_path / "m.prom").read_text()
    assert 'chachaml_ops_backup_last_success_timestamp_seconds{store="main"}' in metrics
    size = max(p.stat().st_size for p in archives)
    assert f'chachaml_ops_backup_size_bytes{{store="main"}} {size}' in metrics


def test_watcher_logs_a_corrupt_new_artifact_a_deleted_one_and_an_orphan(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra="""
        [watch]
        enabled = true
        debounce = "0.3s"
        grace = "1.5s"
        """,
    )
    run_id = next(iter(clean_store.runs.values()))
    doomed = next(a for a in clean_store.artifacts if a[1] == run_id)
    with DaemonProcess(config) as daemon:
        assert daemon.event("watch_started")["mode"] == "inotify"
        writer = ChachamlWriter(clean_store.db, clean_store.artifact_dir)
        t0 = time.monotonic()
        writer.log_artifact(run_id, "new/weights.bin", b"A" * 4096)
        # bit rot right after the write: same size, different bytes than the row's hash
        (clean_store.artifact_dir / run_id / "new" / "weights.bin").write_bytes(b"B" * 4096)
        (clean_store.artifact_dir / run_id / doomed[2]).unlink()
        writer.write_bytes(run_id, "crashed.bin", b"no row will ever come")
        writer.close()

        corrupt = daemon.event("finding", kind="hash_mismatch", timeout=10)
        missing = daemon.event("finding", kind="missing", timeout=10)
        assert time.monotonic() - t0 < 5
        assert corrupt["path"] == f"{run_id}/new/weights.bin" and corrupt["store"] == "main"
        assert missing["path"] == f"{run_id}/{doomed[2]}"
        assert missing["artifact_id"] == doomed[0]
        orphan = daemon.event("finding", kind="orphan_file", timeout=10)
        assert orphan["path"] == f"{run_id}/crashed.bin"
        assert daemon.stop() == 0
    kinds = sorted(e["kind"] for e in daemon.events if e.get("event") == "finding")
    assert kinds == ["hash_mismatch", "missing", "orphan_file"]  # each reported once


def test_status_with_an_unreadable_state_dir_is_one_error_line(tmp_path, clean_store):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = write_config(tmp_path / "c.toml", clean_store, state=blocker / "state")
    result = run_cli("status", "--config", config)
    assert result.code == 3
    assert result.stderr.startswith(f"Error: cannot read the state dir {blocker / 'state'}")
    assert "sudo -u chachaml-ops" in result.stderr


def test_a_moved_run_folder_is_lost_events_and_triggers_a_rescan(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra='[watch]\nenabled = true\ndebounce = "0.2s"\n',
    )
    run_id = next(iter(clean_store.runs.values()))
    moved = sum(1 for a in clean_store.artifacts if a[1] == run_id)
    with DaemonProcess(config) as daemon:
        daemon.event("watch_started")
        folder = clean_store.artifact_dir / run_id
        folder.rename(folder.with_name(run_id + ".moved"))
        lost = daemon.event("watch_events_lost", timeout=10)
        assert lost["reason"] == "a folder was moved" and lost["action"] == "rescan"
        rescan = daemon.event("job_finished", job="rescan", timeout=15)
        assert rescan["by_kind"]["missing"] == moved
        assert rescan["by_kind"]["orphan_file"] == moved
        assert daemon.stop() == 0


def test_an_inotify_queue_overflow_asks_for_a_rescan(tmp_path, clean_store):
    import logging

    from chachaml_ops.watcher import StoreWatcher

    config = _config(tmp_path, clean_store, "[watch]\nenabled = true\n")
    asked: list[tuple[str, str]] = []
    watcher = StoreWatcher(
        config.stores[0], config.watch, lambda *a: None, lambda *a: asked.append(a)
    )
    watcher.start()
    try:
        # the line watchdog logs when the kernel reports IN_Q_OVERFLOW
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
    finally:
        watcher.stop()
    assert asked == [("main", "inotify queue overflow")]


def test_watcher_uses_polling_when_told_to(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra="""
        [watch]
        enabled = true
        polling = true
        poll_interval = "0.2s"
        debounce = "0.1s"
        """,
    )
    doomed = clean_store.artifacts[0]
    with DaemonProcess(config) as daemon:
        assert daemon.event("watch_started")["mode"] == "polling"
        (clean_store.artifact_dir / doomed[1] / doomed[2]).unlink()
        assert daemon.event("finding", kind="missing", timeout=10)["artifact_id"] == doomed[0]
        assert daemon.stop() == 0


def _notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    return sock


def _messages_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while True:
        seen.append(sock.recv(4096).decode())
        if wanted in seen[-1].splitlines():
            return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_0_with_stopping_sent_to_notify_socket(tmp_path, clean_store, sig):
    config = write_config(tmp_path / "c.toml", clean_store, state=tmp_path / "st")
    path = str(tmp_path / "notify.sock")
    with _notify_socket(path) as sock:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        with DaemonProcess(config, env) as daemon:
            ready = _messages_until(sock, "READY=1")[-1]
            assert "STATUS=idle" in ready
            _messages_until(sock, "WATCHDOG=1")
            t0 = time.monotonic()
            daemon.proc.send_signal(sig)
            tail = _messages_until(sock, "STOPPING=1")
            assert daemon.proc.wait(timeout=10) == 0
            assert time.monotonic() - t0 < 5
    assert any("STOPPING=1" in m for m in tail)


def test_sighup_reloads_and_a_bad_new_config_keeps_the_old(tmp_path, clean_store):
    config = write_config(tmp_path / "c.toml", clean_store, state=tmp_path / "st")
    good = config.read_text()
    with DaemonProcess(config) as daemon:
        assert daemon.event("daemon_started")["catch_up"] == []
        config.write_text(good + '[orphans]\nschedule = "every night"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.event("reload_failed")
        assert any(p.startswith("orphans.schedule:") for p in failed["problems"])
        assert daemon.proc.poll() is None  # still running on the old config

        config.write_text(good + f'[orphans]\nschedule = "{NIGHTLY}"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.event("config_reloaded")["catch_up"] == ["main:orphans"]
        assert daemon.event("job_finished", job="orphans")["exit_code"] == 0
        assert daemon.stop() == 0


HOLD_LOCK = """
import sys, time
from pathlib import Path
from chachaml_ops.state import store_lock
with store_lock(Path(sys.argv[1]), Path(sys.argv[2]), holder="chachaml-ops backup (cli)"):
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the test says so
    print(time.time(), flush=True)
"""


def test_store_lock_keeps_a_cli_job_and_a_daemon_job_apart(tmp_path, clean_store):
    state = tmp_path / "st"
    config = write_config(
        tmp_path / "c.toml", clean_store, state=state, extra=f'[orphans]\nschedule = "{NIGHTLY}"\n'
    )
    cli = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(state), str(clean_store.db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout.readline().strip() == "locked"
        with DaemonProcess(config) as daemon:
            busy = daemon.event("store_busy", job="orphans")
            assert "chachaml-ops backup (cli)" in busy["detail"]
            time.sleep(1.5)  # the daemon keeps waiting while the CLI job works
            assert not any(e.get("event") == "job_started" for e in daemon.events)
            cli.stdin.write("done\n")
            cli.stdin.flush()
            released = float(cli.stdout.readline())
            started = daemon.event("job_started", job="orphans")
            assert datetime.fromisoformat(started["timestamp"]).timestamp() >= released
            assert daemon.event("job_finished", job="orphans")["exit_code"] == 0
            assert daemon.stop() == 0
    finally:
        cli.kill()
        cli.wait(timeout=10)


# -- systemd units ----------------------------------------------------------------------------

UNITS = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".timer"))


def _units_for_this_install(tmp_path: Path) -> Path:
    """The shipped units with ExecStart pointed at this checkout's command, which `verify`
    requires to exist; nothing else changes."""
    command = Path(sys.executable).parent / "chachaml-ops"
    if not command.exists():
        pytest.skip("chachaml-ops is not installed next to this Python")
    out = tmp_path / "units"
    out.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/usr/local/bin/chachaml-ops", str(command))
        (out / name).write_text(text)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    assert {
        "chachaml-ops.service",
        "chachaml-ops-verify.timer",
        "chachaml-ops-backup.timer",
    } <= set(UNITS)
    units = _units_for_this_install(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", *(str(units / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", [u for u in UNITS if u.endswith(".service")])
def test_services_are_rated_at_most_2_5_by_systemd_analyze_security(tmp_path, unit):
    units = _units_for_this_install(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=25", str(units / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    overall = next(ln for ln in proc.stdout.splitlines() if "Overall exposure level" in ln)
    assert float(overall.split(":")[1].split()[0]) <= 2.5


def test_config_error_lists_each_problem_on_its_own_line():
    with pytest.raises(ConfigError) as info:
        parse_config({"store": [{"name": "a b"}], "bogus": 1}, Path("/x.toml"))
    keys = [p.key for p in info.value.problems]
    assert keys == ["store[0].name", "store[0].db", "bogus"]
    assert str(info.value).count("\n") == 3


# -- review fixes -------------------------------------------------------------------------


def _plant_huge_artifact(store, size: int = 64 << 30) -> Path:
    """Turn one artifact into a sparse file of `size` bytes (its row says so too): reading
    it takes far longer than any stop may wait."""
    import sqlite3

    aid, run_id, name = store.artifacts[0]
    path = store.artifact_dir / run_id / name
    with open(path, "wb") as fh:
        fh.truncate(size)
    conn = sqlite3.connect(store.db)
    with conn:
        conn.execute("UPDATE artifacts SET size = ? WHERE id = ?", (size, aid))
    conn.close()
    return path


@pytest.mark.parametrize("job", ["verify", "backup"])
def test_sigterm_inside_one_huge_file_exits_0_within_seconds(tmp_path, clean_store, job):
    if job == "backup":
        pytest.importorskip("chachaml_ops.backup")
    _plant_huge_artifact(clean_store)
    backups = tmp_path / "backups"
    extra = f'[{job}]\nschedule = "{NIGHTLY}"\n'
    # zstd: the zeros compress to almost nothing, so the test writes little to disk.
    extra += "jobs = 1\n" if job == "verify" else f'dir = "{backups}"\ncompression = "zstd"\n'
    config = write_config(tmp_path / "c.toml", clean_store, state=tmp_path / "st", extra=extra)
    with DaemonProcess(config) as daemon:
        daemon.event("job_started", job=job, timeout=30)
        time.sleep(1.0)  # well inside the huge file by now
        t0 = time.monotonic()
        assert daemon.stop(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        finished = daemon.event("job_finished", job=job, timeout=1)
        assert finished["exit_code"] == 3 and finished["interrupted"] is True
    with StateDB(tmp_path / "st") as state:
        key = load_config(config).stores[0].state_key
        assert state.last_job(key, job, success=True) is None  # catch-up reruns it
    if job == "backup":
        assert list(backups.iterdir()) == []  # the partial archive is gone, nothing else made


@pytest.fixture
def trickle_server():
    """Answers every request with one byte every 0.3 s, forever: per-read timeouts never fire."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000:
                if stop.is_set():
                    return
                conn.sendall(bytes([byte]))
                time.sleep(0.3)

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_a_trickling_alert_server_costs_a_job_at_most_the_timeout_per_request(
    tmp_path, clean_store, trickle_server
):
    config = _config(
        tmp_path, clean_store, f'[alerts]\nping_url = "{trickle_server}/ping"\ntimeout = "1s"\n'
    )
    t0 = time.monotonic()
    outcome = JobRunner(config, lambda: False).run("main", "orphans")
    assert outcome.exit_code == 0
    assert time.monotonic() - t0 < 6  # two pings of at most 1 s each, plus the job


def test_watcher_findings_reach_the_webhook_in_one_batch_without_blocking(
    tmp_path, clean_store, http_server, trickle_server
):
    from chachaml_ops.report import Finding

    url = f"http://127.0.0.1:{http_server.server_port}"
    config = _config(tmp_path, clean_store, f'[alerts]\nwebhook_url = "{url}/hook"\n')
    runner = JobRunner(config, lambda: False)
    runner.alerter.batch_window = 0.5
    for i in range(5):
        runner.watch_finding("main", Finding("missing", f"r/f{i}", "gone"))
    deadline = time.monotonic() + 5
    while not http_server.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)
    runner.close()
    assert len(http_server.requests) == 1
    assert len(json.loads(http_server.requests[0][1])["findings"]) == 5
    # A hanging webhook: the watcher's calls still return at once.
    config = _config(tmp_path, clean_store, f'[alerts]\nwebhook_url = "{trickle_server}"\n')
    runner = JobRunner(config, lambda: False)
    t0 = time.monotonic()
    for i in range(20):
        runner.watch_finding("main", Finding("missing", f"r/g{i}", "gone"))
    assert time.monotonic() - t0 < 2
    runner.close()


def test_cli_state_dir_resolution_order(tmp_path, monkeypatch, clean_store):
    from chachaml_ops import state

    system_config = tmp_path / "etc" / "config.toml"
    system_state = tmp_path / "varlib"
    monkeypatch.setattr(state, "SYSTEM_CONFIG", system_config)
    monkeypatch.setattr(state, "SYSTEM_STATE_DIR", system_state)
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert state.default_state_dir(env) == tmp_path / "xdg" / "chachaml-ops"
    system_state.mkdir()
    assert state.default_state_dir(env) == system_state
    system_config.parent.mkdir()
    system_config.write_text('state_dir = "from-etc"\n[[store]]\n')
    assert state.default_state_dir(env) == system_config.parent / "from-etc"
    env_config = write_config(tmp_path / "c.toml", clean_store, state=tmp_path / "from-env")
    env[state.CONFIG_ENV_VAR] = str(env_config)
    assert state.default_state_dir(env) == tmp_path / "from-env"
    env["STATE_DIRECTORY"] = str(tmp_path / "systemd")
    assert state.default_state_dir(env) == tmp_path / "systemd"
    # A CLI job with the daemon's config in the environment records into its state dir.
    result = run_cli(
        "orphans", "--db", clean_store.db, env={**os.environ, state.CONFIG_ENV_VAR: str(env_config)}
    )
    assert result.code == 0, result.stderr
    with StateDB(tmp_path / "from-env") as history:
        assert history.last_job(state.store_key(clean_store.db), "orphans") is not None


@contextlib.contextmanager
def _immutable(path: Path):
    """chattr +i: even root cannot write it (skips where chattr is not allowed)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available here (needs root on ext4/xfs)")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_config_check_refuses_a_state_dir_that_cannot_be_created(tmp_path, clean_store):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path / "c.toml", clean_store, state=blocker / "state")
    result = run_cli("config", "check", config)
    assert result.code == 3
    assert f"state_dir: cannot be created: {blocker} is not a folder" in result.stderr


def test_an_unwritable_state_db_fails_the_start_with_exit_3_and_never_loses_a_job(
    tmp_path, store_factory, http_server
):
    store = store_factory(["bit_rot"])
    base = f"http://127.0.0.1:{http_server.server_port}"
    config = _config(
        tmp_path,
        store,
        f'[verify]\nmin_age = "0s"\n[metrics]\ntextfile = "{tmp_path}/m.prom"\n'
        f'[alerts]\nping_url = "{base}/ping"\nwebhook_url = "{base}/hook"\n',
    )
    StateDB(config.state_dir).close()
    with _immutable(config.state_dir / "state.db"):
        result = run_cli("daemon", "--config", config.source, timeout=20)
        assert result.code == 3
        assert result.stderr.startswith(f"Error: {config.source}: state_dir: ")
        assert "state.db is not writable" in result.stderr
        assert len(result.stderr.splitlines()) == 1  # one line, no traceback
        # At run time (the file became unwritable later): findings, alert and end ping survive.
        outcome = JobRunner(config, lambda: False).run("main", "verify")
    assert outcome.exit_code == 2
    paths = [p.split("?")[0] for p, _ in http_server.requests]
    assert paths == ["/ping/start", "/hook", "/ping/2"]


@pytest.mark.parametrize(
    ("snippet", "key", "text"),
    [
        ("store = []", "store", "lists no store"),
        ("[alerts]\ntimeout = inf", "alerts.timeout", "finite"),
        ('[alerts]\ntimeout = "0s"', "alerts.timeout", "more than zero"),
        ("[watch]\ndebounce = nan", "watch.debounce", "finite"),
        ('[watch]\npoll_interval = "0s"', "watch.poll_interval", "more than zero"),
        ('[verify]\nschedule = "0 0 31 2 *"', "verify.schedule", "never fires"),
        ('[verify]\nschedule = "@daily"', "verify.schedule", '"0 0 * * *"'),
        ('log_level = "loud"', "log_level", "; e.g."),
        ('[backup]\ncompression = "xz"', "backup.compression", "; e.g."),
        ("[verify]\njobs = 0", "verify.jobs", "; files hashed"),
        ('[verify]\nquick = "yes"', "verify.quick", "; true"),
        ("[backup]\nkeep_daily = -1", "backup.keep_daily", "; archives kept"),
        ('[watch]\nenabled = "true"', "watch.enabled", "; true or false"),
        ('[verify]\nmax_rate = "fast"', "verify.max_rate", "; bytes per second"),
        ("[verify]\nmax_rate = 0", "verify.max_rate", "more than zero"),
    ],
)
def test_config_rejects_useless_values_with_a_hint(tmp_path, clean_store, snippet, key, text):
    import tomllib

    body = f'state_dir = "{tmp_path}/st"\n'
    if not snippet.startswith("["):  # a top-level key goes before the tables
        body, snippet = body + snippet + "\n", ""
    if "store" not in body:
        body += f'[[store]]\nname = "main"\ndb = "{clean_store.db}"\n'
    doc = tomllib.loads(body + snippet + "\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, tmp_path / "c.toml")
    problem = next(p for p in caught.value.problems if p.key == key)
    assert text in str(problem), str(problem)
    assert problem.hint or "e.g." in problem.message, "every problem shows an example"


def test_the_daemon_verify_job_passes_max_rate_on(tmp_path, clean_store):
    import tomllib

    body = (
        f'state_dir = "{tmp_path}/st"\n[[store]]\nname = "main"\ndb = "{clean_store.db}"\n'
        '[verify]\nmax_rate = "256K"\n'
    )
    config = parse_config(tomllib.loads(body), tmp_path / "c.toml")
    assert config.verify.max_rate == 256 * 2**10
    started = time.monotonic()
    outcome = JobRunner(config, lambda: False).run("main", "verify")
    # The clean store holds ~250 KiB: at 256 KiB/s, less a 0.25 s burst, that is ~0.7 s.
    assert outcome.exit_code == 0 and time.monotonic() - started >= 0.5


def test_config_file_problems_and_a_duplicate_db_name_the_right_things(tmp_path, clean_store):
    assert "is a folder" in run_cli("config", "check", tmp_path).stderr
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    assert "save the file as UTF-8" in run_cli("config", "check", latin).stderr
    body = "".join(f'[[store]]\nname = "{n}"\ndb = "{clean_store.db}"\n' for n in ("a", "b", "c"))
    with pytest.raises(ConfigError) as caught:
        parse_config(__import__("tomllib").loads(body), tmp_path / "c.toml")
    texts = [str(p) for p in caught.value.problems]
    assert texts == [
        f"store[1].db: {clean_store.db} is also store 'a'; list each store once",
        f"store[2].db: {clean_store.db} is also store 'a'; list each store once",
    ]


def test_a_missing_store_db_only_fails_that_stores_jobs(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra=f"""
        [[store]]
        name = "later"
        db = "{tmp_path}/not-yet.db"
        [orphans]
        schedule = "{NIGHTLY}"
        """,
    )
    check = run_cli("config", "check", config)
    assert check.code == 0 and "no database file yet" in check.stdout
    with DaemonProcess(config) as daemon:
        assert daemon.event("store_db_missing")["store"] == "later"
        assert daemon.event("job_finished", store="later", job="orphans")["exit_code"] == 3
        assert daemon.event("job_finished", store="main", job="orphans")["exit_code"] == 0
        assert daemon.stop() == 0
    assert not any("Running job" in line for line in daemon.raw)  # APScheduler kept quiet
    status = run_cli("status", "--config", config, "--json")
    assert status.code == 0, status.stderr


def test_status_with_empty_state_says_jobs_run_at_daemon_start(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra=f'[verify]\nschedule = "{NIGHTLY}"\n',
    )
    text = run_cli("status", "--config", "c.toml", cwd=tmp_path)
    assert text.code == 0, text.stderr
    assert "verify   last: never ran; next: when the daemon starts (catch-up)" in text.stdout
    doc = run_cli("status", "--config", "c.toml", "--json", cwd=tmp_path).json()
    assert doc["config"] == str(config)  # absolute, though given relative
    assert doc["stores"][0]["jobs"]["verify"]["catch_up_at_start"] is True


def test_watcher_survives_its_root_vanishing_and_waits_for_a_missing_one(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra='[watch]\nenabled = true\ndebounce = "0.2s"\n',
    )
    root = clean_store.artifact_dir
    away = tmp_path / "away"
    root.rename(away)
    with DaemonProcess(config) as daemon:
        assert daemon.event("watch_root_gone")["reason"] == "missing at start"
        away.rename(root)
        daemon.event("watch_started", timeout=10)
        daemon.event("watch_events_lost", reason="the artifact dir is back", timeout=5)
        shutil.rmtree(root)  # rm -rf, then the operator restores it
        assert daemon.event("watch_root_gone", reason="removed", timeout=10)
        root.mkdir()
        assert len([e for e in daemon.events if e.get("event") == "watch_started"]) == 1
        daemon.wait_for(
            lambda e: (
                e.get("event") == "watch_started"
                and len([x for x in daemon.events if x.get("event") == "watch_started"]) == 2
            ),
            timeout=10,
        )
        run_id = next(iter(clean_store.runs.values()))
        writer = ChachamlWriter(clean_store.db, root)
        writer.log_artifact(run_id, "after/weights.bin", b"A" * 4096)
        (root / run_id / "after" / "weights.bin").write_bytes(b"B" * 4096)
        writer.close()
        assert daemon.event("finding", kind="hash_mismatch", timeout=10)["store"] == "main"
        assert daemon.stop() == 0


def test_an_interrupted_run_keeps_the_last_complete_runs_gauges(tmp_path, store_factory):
    store = store_factory(["bit_rot"])
    prom = tmp_path / "m.prom"
    config = _config(tmp_path, store, f'[verify]\njobs = 1\n[metrics]\ntextfile = "{prom}"\n')
    assert JobRunner(config, lambda: False).run("main", "verify").exit_code == 2
    complete = prom.read_text()
    calls = iter(range(10_000))
    interrupted = JobRunner(config, lambda: next(calls) > 3).run("main", "verify")
    assert interrupted.summary["interrupted"] is True
    after = prom.read_text()

    def line(text: str, head: str) -> str:
        return next(ln for ln in text.splitlines() if ln.startswith(head))

    for head in (
        'chachaml_ops_findings{job="verify",kind="hash_mismatch",store="main"}',
        'chachaml_ops_findings{job="verify",kind="missing",store="main"}',
        'chachaml_ops_artifacts{store="main"}',
        'chachaml_ops_verify_last_success_timestamp_seconds{store="main"}',
    ):
        assert line(after, head) == line(complete, head)
    assert line(complete, 'chachaml_ops_verify_last_exit_code{store="main"}').endswith(" 2")
    assert line(after, 'chachaml_ops_verify_last_exit_code{store="main"}').endswith(" 3")
    # Watch counts are handed to the next runner at a reload, not reset.
    from chachaml_ops.report import Finding

    first = JobRunner(config, lambda: False)
    first.watch_finding("main", Finding("missing", "r/x", "gone"))
    JobRunner(config, lambda: False, watch_counts=first.watch_counts).write_metrics()
    assert 'chachaml_ops_watch_findings{kind="missing",store="main"} 1' in prom.read_text()


def test_sigterm_while_a_ping_trickles_exits_0_at_once(tmp_path, clean_store, trickle_server):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra=f'[orphans]\nschedule = "{NIGHTLY}"\n'
        f'[alerts]\nping_url = "{trickle_server}/p"\ntimeout = "60s"\n',
    )
    with DaemonProcess(config) as daemon:
        daemon.event("daemon_started")
        time.sleep(1.0)  # the start ping is trickling in now
        t0 = time.monotonic()
        assert daemon.stop(timeout=10) == 0
        assert time.monotonic() - t0 < 5
    assert daemon.event("job_skipped", timeout=1)["reason"] == "daemon stopping"
    assert not any(e.get("event") == "job_finished" for e in daemon.events)


def test_config_check_shows_how_the_verify_job_will_read(tmp_path, clean_store):
    config = write_config(
        tmp_path / "c.toml",
        clean_store,
        state=tmp_path / "st",
        extra='[verify]\nschedule = "0 3 * * *"\nmax_age = "7d"\nmax_rate = "200M"\n',
    )
    result = run_cli("config", "check", config)
    assert result.code == 0, result.stderr
    assert (
        "    full (hashes); skips files verified within 7d0h; at most 200.0 MiB/s;"
        " drops hashed files from the page cache"
    ) in result.stdout.splitlines()
