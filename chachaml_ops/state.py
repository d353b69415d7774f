"""This tool's own small state: where it lives, per-store locks, and a SQLite of job history.

Never the chachaml DB: everything here is under the state dir (see default_state_dir), so the
user's store stays read-only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from chachaml_ops.errors import OpsError


class StoreBusy(OpsError):
    """Another chachaml-ops job holds this store's lock."""


class StateDirUnusable(OpsError):
    """The state dir cannot be created or written."""


# Where the daemon finds its config when not told (config.find_config uses the same two).
CONFIG_ENV_VAR = "CHACHAML_OPS_CONFIG"
SYSTEM_CONFIG = Path("/etc/chachaml-ops/config.toml")
# The unit's StateDirectory=; a CLI run as the service user finds the daemon's state here.
SYSTEM_STATE_DIR = Path("/var/lib/chachaml-ops")


def default_state_dir(
    environ: Mapping[str, str] = os.environ, *, consult_config: bool = True
) -> Path:
    """Where job history and locks live when no --state-dir is given. In order:

    $STATE_DIRECTORY (systemd); the `state_dir` of the daemon's config ($CHACHAML_OPS_CONFIG,
    else /etc/chachaml-ops/config.toml) when readable; /var/lib/chachaml-ops when it exists
    and is writable by us; else $XDG_STATE_HOME/chachaml-ops (~/.local/state/chachaml-ops).
    So `sudo -u chachaml-ops chachaml-ops backup` shares the daemon's lock and history.
    """
    systemd = environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if consult_config:
        configured = _configured_state_dir(environ)
        if configured is not None:
            return configured
    if SYSTEM_STATE_DIR.is_dir() and os.access(SYSTEM_STATE_DIR, os.W_OK | os.X_OK):
        return SYSTEM_STATE_DIR
    xdg = environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "chachaml-ops"


def _configured_state_dir(environ: Mapping[str, str]) -> Path | None:
    """The `state_dir` of the config the daemon would load; None when none is readable.

    Only that one key is read (leniently): a broken config is `config check`'s business."""
    import tomllib

    path = Path(environ[CONFIG_ENV_VAR]) if environ.get(CONFIG_ENV_VAR) else SYSTEM_CONFIG
    try:
        value = tomllib.loads(path.read_bytes().decode("utf-8")).get("state_dir")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not isinstance(value, str) or not value:
        return None
    text = os.path.expanduser(value)
    return Path(text) if os.path.isabs(text) else path.resolve().parent / text


def store_key(db: Path) -> str:
    """A stable, file-name-safe key for a store: its resolved DB path, hashed."""
    resolved = os.path.realpath(os.fspath(db))
    return hashlib.sha256(os.fsencode(resolved)).hexdigest()[:16]


@contextmanager
def store_lock(
    state_dir: Path, db: Path, *, wait: float | None = 0.0, holder: str = "chachaml-ops"
) -> Iterator[Path]:
    """Hold the one-job-per-store lock. `wait`: seconds to wait (None: forever, 0: not at all).

    An flock on a file in the state dir: released by the kernel if the holder dies, so a
    kill -9 never leaves a stale lock behind.
    """
    locks = Path(state_dir) / "locks"
    path = locks / f"{store_key(db)}.lock"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StateDirUnusable(
            f"cannot use the state dir {state_dir}: {exc.strerror}",
            "use a writable state dir (--state-dir, STATE_DIRECTORY, or state_dir in the config)",
        ) from None
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    other = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                    raise StoreBusy(
                        f"another chachaml-ops job is working on {db}"
                        + (f" ({other})" if other else ""),
                        "wait for it to finish, or allow a longer wait"
                        " (--wait, or lock_wait in the config)",
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing drops the flock


STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_runs (
  store TEXT NOT NULL, job TEXT NOT NULL, started REAL NOT NULL, finished REAL,
  exit_code INTEGER, summary TEXT);
CREATE INDEX IF NOT EXISTS job_runs_by_store ON job_runs (store, job, started);
CREATE TABLE IF NOT EXISTS verify_marks (
  store TEXT NOT NULL, artifact_id TEXT NOT NULL, run_id TEXT NOT NULL,
  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
  ctime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, verified_at REAL NOT NULL,
  PRIMARY KEY (store, artifact_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS verify_marks_by_run ON verify_marks (store, run_id);
"""


class VerifyMark(NamedTuple):
    """An artifact last verified good at `verified_at`, and what its file looked like then.

    A NamedTuple, not a frozen dataclass: one is built per artifact on every incremental run,
    and a tuple is built several times faster."""

    artifact_id: str
    run_id: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    sha256: str
    verified_at: float


def _text(raw: bytes) -> str:
    # Artifact and run ids are bound as their exact bytes (see put_marks): ids that are not
    # UTF-8 come back as the same surrogate-escaped strings the chachaml DB gave.
    return raw.decode("utf-8", "surrogateescape")


class MarkReader:
    """A read-only view of the verify marks, one per process (forked workers open their own)."""

    def __init__(self, state_dir: Path, store: str) -> None:
        path = os.path.abspath(Path(state_dir) / "state.db")
        self.store = store
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        self.conn.text_factory = _text

    def close(self) -> None:
        self.conn.close()

    def for_runs(self, run_ids: Iterable[str]) -> dict[str, VerifyMark]:
        """Marks of these runs' artifacts, by artifact id (memory bounded by the runs asked)."""
        out: dict[str, VerifyMark] = {}
        ids = list(run_ids)
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            sql = (
                "SELECT artifact_id, run_id, size, mtime_ns, inode, ctime_ns, sha256, verified_at"
                " FROM verify_marks WHERE store = ?"
                f" AND run_id IN ({','.join(['CAST(? AS TEXT)'] * len(part))})"
            )
            for r in self.conn.execute(sql, (self.store, *map(os.fsencode, part))):
                out[r[0]] = VerifyMark._make(r)
        return out

    def run_summary(self) -> dict[str, tuple[int, float]]:
        """run_id -> (marks held, oldest verified_at): which runs to verify first."""
        sql = (
            "SELECT run_id, count(*), min(verified_at) FROM verify_marks"
            " WHERE store = ? GROUP BY run_id"
        )
        return {r: (n, oldest) for r, n, oldest in self.conn.execute(sql, (self.store,))}


@dataclass(frozen=True)
class JobRun:
    store: str
    job: str
    started: float
    finished: float | None
    exit_code: int | None
    summary: dict[str, Any]


class StateDB:
    """chachaml-ops' own SQLite in the state dir: job history and verify marks."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.dir / "state.db", isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(STATE_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_job(
        self,
        store: str,
        job: str,
        started: float,
        finished: float,
        exit_code: int,
        summary: dict[str, Any],
    ) -> None:
        self.conn.execute(
            "INSERT INTO job_runs VALUES (?, ?, ?, ?, ?, ?)",
            (store, job, started, finished, exit_code, json.dumps(summary)),
        )

    def put_marks(self, store: str, marks: Iterable[VerifyMark]) -> None:
        """Record artifacts just verified good (replacing older marks)."""
        self.conn.execute("BEGIN")
        self.conn.executemany(
            "INSERT OR REPLACE INTO verify_marks"
            " VALUES (?, CAST(? AS TEXT), CAST(? AS TEXT), ?, ?, ?, ?, ?, ?)",
            (
                (
                    store,
                    os.fsencode(m.artifact_id),
                    os.fsencode(m.run_id),
                    m.size,
                    m.mtime_ns,
                    m.inode,
                    m.ctime_ns,
                    m.sha256,
                    m.verified_at,
                )
                for m in marks
            ),
        )
        self.conn.execute("COMMIT")

    def drop_marks(self, store: str, artifact_ids: Iterable[str]) -> None:
        """Forget artifacts found bad (or gone), so the next run hashes them again."""
        self.conn.executemany(
            "DELETE FROM verify_marks WHERE store = ? AND artifact_id = CAST(? AS TEXT)",
            ((store, os.fsencode(a)) for a in artifact_ids),
        )

    def last_job(self, store: str, job: str, *, success: bool = False) -> JobRun | None:
        """The latest run of a job; with success=True the latest that could check (exit < 3)."""
        cond = " AND exit_code < 3" if success else ""
        row = self.conn.execute(
            "SELECT store, job, started, finished, exit_code, summary FROM job_runs"
            f" WHERE store = ? AND job = ?{cond} ORDER BY started DESC LIMIT 1",
            (store, job),
        ).fetchone()
        if row is None:
            return None
        return JobRun(*row[:5], json.loads(row[5] or "{}"))


@dataclass
class JobOutcome:
    """Filled in by the job; recorded in the history when the job's block ends."""

    exit_code: int | None = None
    summary: dict[str, Any] | None = None


@contextmanager
def locked_job(
    state_dir: Path, db: Path, job: str, *, wait: float | None = 0.0
) -> Iterator[JobOutcome]:
    """Run one CLI job on a store: hold its lock, then record the outcome in the history
    (a job that could not check is recorded with exit 3 and its error)."""
    started = time.time()
    outcome = JobOutcome()
    with store_lock(state_dir, db, wait=wait, holder=f"chachaml-ops {job}"):
        try:
            yield outcome
        except OpsError as exc:
            outcome.exit_code, outcome.summary = exc.exit_code, {"error": exc.one_line()}
            raise
        finally:
            if outcome.exit_code is not None:
                with StateDB(state_dir) as history:
                    history.record_job(
                        store_key(db),
                        job,
                        started,
                        time.time(),
                        outcome.exit_code,
                        outcome.summary or {},
                    )
