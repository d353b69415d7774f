"""A chachaml store written exactly as chachaml 0.7 writes one, with real-world faults planted.

`ChachamlWriter` mimics chachaml's own write path (bytes to the final path first, row after,
WAL mode); `make_store` builds a realistic store with it and is the tests' fixture factory.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chachaml_ops.layout import derive_artifact_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
  name TEXT PRIMARY KEY, description TEXT, owner TEXT,
  created_at INTEGER NOT NULL, updated_at INTEGER);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, experiment TEXT NOT NULL, name TEXT, status TEXT NOT NULL,
  start_time INTEGER NOT NULL, end_time INTEGER, created_by TEXT, git_sha TEXT,
  parent_run_id TEXT, note TEXT);
CREATE TABLE IF NOT EXISTS params (
  run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT, PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS metrics (
  run_id TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL, step INTEGER,
  timestamp INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
  content_type TEXT, size INTEGER, hash TEXT, created_at INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS idx_artifacts_run_name ON artifacts (run_id, name);
CREATE TABLE IF NOT EXISTS models (
  name TEXT PRIMARY KEY, description TEXT, created_at INTEGER NOT NULL, updated_at INTEGER);
CREATE TABLE IF NOT EXISTS model_versions (
  model_name TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT, artifact_id TEXT,
  stage TEXT NOT NULL DEFAULT 'none', description TEXT, created_at INTEGER NOT NULL,
  PRIMARY KEY (model_name, version));
"""

# chachaml's retention removes archived runs from these tables and leaves the files behind.
_RETENTION_TABLES = ("artifacts", "params", "metrics", "runs")


class DuplicateArtifact(Exception):
    """chachaml's insert failing on the (run_id, name) unique index, after the overwrite."""


class ChachamlWriter:
    """Writes a store the way chachaml 0.7 does. Opens its own read-write connection."""

    def __init__(
        self,
        db: Path,
        artifact_dir: Path | None = None,
        *,
        rng: random.Random | None = None,
        clock=time.time,
    ) -> None:
        self.db = Path(db)
        self.artifact_dir = Path(artifact_dir) if artifact_dir else derive_artifact_dir(self.db)
        self.rng = rng or random.Random()
        self.clock = clock
        self.conn = sqlite3.connect(self.db, isolation_level=None, timeout=5)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.conn.close()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def create_experiment(self, name: str, at_ms: int | None = None) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO experiments (name, owner, created_at) VALUES (?, ?, ?)",
            (name, "ml-team", at_ms or self.now_ms()),
        )

    def start_run(
        self, experiment: str, name: str, *, at_ms: int | None = None, created_by: str = "alice"
    ) -> str:
        run_id = self.new_id()
        self.create_experiment(experiment, at_ms)
        self.conn.execute(
            "INSERT INTO runs (id, experiment, name, status, start_time, created_by)"
            " VALUES (?, ?, ?, 'running', ?, ?)",
            (run_id, experiment, name, at_ms or self.now_ms(), created_by),
        )
        return run_id

    def end_run(self, run_id: str, status: str = "completed", at_ms: int | None = None) -> None:
        self.conn.execute(
            "UPDATE runs SET status = ?, end_time = ? WHERE id = ?",
            (status, at_ms or self.now_ms(), run_id),
        )

    def log_param(self, run_id: str, key: str, value: object) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO params VALUES (?, ?, ?)", (run_id, key, str(value))
        )

    def log_metric(self, run_id: str, key: str, value: float, step: int, at_ms: int) -> None:
        self.conn.execute(
            "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", (run_id, key, value, step, at_ms)
        )

    def write_bytes(self, run_id: str, name: str, data: bytes, at_ms: int | None = None) -> Path:
        """Step 1 alone: the bytes at the final path, no temp file, no fsync."""
        target = self.artifact_dir / run_id / name
        os.makedirs(os.path.dirname(os.path.normpath(target)), exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(data)
        if at_ms is not None:
            os.utime(target, (at_ms / 1000, at_ms / 1000))
        return target

    def log_artifact(
        self,
        run_id: str,
        name: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        at_ms: int | None = None,
    ) -> str:
        """Bytes first, then the row; a duplicate name overwrites and then fails."""
        at_ms = at_ms or self.now_ms()
        self.write_bytes(run_id, name, data, at_ms if at_ms < self.now_ms() - 1000 else None)
        artifact_id = self.new_id()
        try:
            self.conn.execute(
                "INSERT INTO artifacts (id, run_id, name, path, content_type, size, hash,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    artifact_id,
                    run_id,
                    name,
                    f"{run_id}/{name}",
                    content_type,
                    len(data),
                    hashlib.sha256(data).hexdigest(),
                    at_ms,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateArtifact(f"{run_id}/{name}") from exc
        return artifact_id

    def register_version(
        self, model: str, run_id: str, artifact_id: str, stage: str, at_ms: int | None = None
    ) -> int:
        at_ms = at_ms or self.now_ms()
        self.conn.execute(
            "INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (model, at_ms)
        )
        (version,) = self.conn.execute(
            "SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model_name = ?",
            (model,),
        ).fetchone()
        self.conn.execute(
            "INSERT INTO model_versions (model_name, version, run_id, artifact_id, stage,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (model, version, run_id, artifact_id, stage, at_ms),
        )
        return version

    def delete_archived(self) -> list[str]:
        """chachaml's `delete-archived!`: rows go, files and model_versions rows stay."""
        ids = [r[0] for r in self.conn.execute("SELECT id FROM runs WHERE status = 'archived'")]
        for run_id in ids:
            for table in _RETENTION_TABLES:
                column = "id" if table == "runs" else "run_id"
                self.conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (run_id,))
        return ids


# -- the demo store -----------------------------------------------------------------------

ALL_FAULTS = (
    "crash_leftover",
    "truncated_leftover",
    "duplicate_log",
    "retention_leftover",
    "escaped_path",
    "missing_file",
    "bit_rot",
)


@dataclass(frozen=True)
class Planted:
    fault: str
    kind: str  # the finding verify must report
    path: str | None  # relative to the artifact dir (None for registry findings)
    note: str


@dataclass
class DemoStore:
    db: Path
    artifact_dir: Path
    runs: dict[str, str] = field(default_factory=dict)  # run name -> id
    artifacts: list[tuple[str, str, str]] = field(default_factory=list)  # (id, run_id, name)
    planted: list[Planted] = field(default_factory=list)

    def expected(self) -> set[tuple[str, str | None]]:
        return {(p.kind, p.path) for p in self.planted}


_EXPERIMENTS = {
    "churn-model": ("xgboost", "logreg"),
    "image-classifier": ("resnet18", "resnet50"),
    "demand-forecast": ("prophet", "lstm"),
}


def _png(rng: random.Random, size: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(0, size - 8))


def _artifact_set(rng: random.Random, scale: float) -> list[tuple[str, str, bytes]]:
    def n(lo: int, hi: int) -> int:
        return max(1, int(rng.randint(lo, hi) * scale))

    report = "# Run report\n\n" + "".join(
        f"- epoch {i}: loss {rng.random():.4f}\n" for i in range(n(5, 40))
    )
    return [
        ("model.nippy", "application/x-nippy", b"NPY\x00" + rng.randbytes(n(200_000, 3_000_000))),
        (
            "config.edn",
            "application/edn",
            f"{{:lr {rng.random():.5f} :epochs {rng.randint(5, 50)}}}\n".encode(),
        ),
        ("plots/loss.png", "image/png", _png(rng, n(20_000, 90_000))),
        ("plots/eval/confusion.png", "image/png", _png(rng, n(15_000, 60_000))),
        ("data/holdout.table", "application/x-chachaml-table", rng.randbytes(n(5_000, 400_000))),
        ("REPORT.md", "text/markdown", report.encode()),
    ]


def make_store(
    root: Path,
    faults: Iterable[str] = ALL_FAULTS,
    *,
    seed: int = 7,
    scale: float = 1.0,
    now: float | None = None,
    db_name: str = "chachaml.db",
) -> DemoStore:
    """Build a realistic store under `root` and plant the named faults (all by default).

    `scale` shrinks artifact sizes (tests use ~0.01); `now` fixes the clock.
    """
    faults = tuple(faults)
    unknown = set(faults) - set(ALL_FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
    rng = random.Random(seed)
    now = time.time() if now is None else now
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    w = ChachamlWriter(root / db_name, rng=rng, clock=lambda: now)
    store = DemoStore(w.db, w.artifact_dir)
    day_ms = 86_400_000
    t0 = int(now * 1000) - 30 * day_ms

    # A month of history: every experiment, every model family, a few runs each.
    ordinal = 0
    for experiment, families in _EXPERIMENTS.items():
        for family in families:
            for attempt in range(2):
                ordinal += 1
                start = t0 + ordinal * day_ms + rng.randint(0, 3_600_000)
                name = f"{family}-{attempt + 1}"
                run_id = w.start_run(experiment, name, at_ms=start)
                store.runs[name] = run_id
                w.log_param(run_id, "family", family)
                for step in range(5):
                    w.log_metric(
                        run_id, "loss", 1 / (step + 1 + rng.random()), step, start + step * 60_000
                    )
                for i, (art, ctype, data) in enumerate(_artifact_set(rng, scale)):
                    aid = w.log_artifact(run_id, art, data, ctype, at_ms=start + (i + 1) * 90_000)
                    store.artifacts.append((aid, run_id, art))
                    if art == "model.nippy" and attempt == 1:
                        w.register_version(
                            family,
                            run_id,
                            aid,
                            "production" if ordinal % 3 == 0 else "staging",
                            at_ms=start + day_ms // 2,
                        )
                w.end_run(run_id, "failed" if ordinal == 3 else "completed", start + 3_600_000)

    runs = list(store.runs.items())

    def plant(fault: str, kind: str, path: str | None, note: str) -> None:
        store.planted.append(Planted(fault, kind, path, note))

    if "crash_leftover" in faults:
        name, run_id = runs[2]  # the failed run: the job died after writing a checkpoint
        rel = "checkpoints/epoch-3.nippy"
        w.write_bytes(
            run_id, rel, rng.randbytes(int(150_000 * scale) + 1), at_ms=int(now * 1000) - 2 * day_ms
        )
        plant(
            "crash_leftover",
            "orphan_file",
            f"{run_id}/{rel}",
            f"run {name}: bytes written, process killed before the row insert",
        )
    if "truncated_leftover" in faults:
        name, run_id = runs[4]
        data = b"NPY\x00" + rng.randbytes(int(800_000 * scale) + 1)
        w.write_bytes(
            run_id, "model-v2.nippy", data[: len(data) // 3], at_ms=int(now * 1000) - day_ms
        )
        plant(
            "truncated_leftover",
            "orphan_file",
            f"{run_id}/model-v2.nippy",
            f"run {name}: crash in the middle of writing, a third of the bytes, no row",
        )
    if "duplicate_log" in faults:
        name, run_id = runs[5]
        path = store.artifact_dir / run_id / "model.nippy"
        fresh = b"NPY\x00" + rng.randbytes(path.stat().st_size - 4)
        try:
            w.log_artifact(run_id, "model.nippy", fresh, "application/x-nippy")
        except DuplicateArtifact:
            pass
        else:  # pragma: no cover - the unique index guarantees the failure
            raise AssertionError("duplicate insert unexpectedly succeeded")
        plant(
            "duplicate_log",
            "hash_mismatch",
            f"{run_id}/model.nippy",
            f"run {name}: model.nippy logged twice; new bytes, old row",
        )
    if "retention_leftover" in faults:
        start = int(now * 1000) - 20 * day_ms
        run_id = w.start_run("churn-model", "xgboost-old", at_ms=start)
        kept = []
        for i, (art, ctype, data) in enumerate(_artifact_set(rng, scale)[:3]):
            aid = w.log_artifact(run_id, art, data, ctype, at_ms=start + (i + 1) * 60_000)
            kept.append(art)
            if art == "model.nippy":
                w.register_version("xgboost", run_id, aid, "archived", at_ms=start + 600_000)
                plant(
                    "retention_leftover",
                    "dangling_model_version",
                    None,
                    f"model_versions row for xgboost still points at deleted artifact {aid}",
                )
        w.end_run(run_id, "archived", start + 3_600_000)
        w.delete_archived()
        for art in kept:
            plant(
                "retention_leftover",
                "orphan_file",
                f"{run_id}/{art}",
                "delete-archived! removed the run's rows and left its folder",
            )
    if "escaped_path" in faults:
        name, run_id = runs[6]
        escaped = "../../escaped-weights.bin"
        aid = w.log_artifact(
            run_id,
            escaped,
            rng.randbytes(int(50_000 * scale) + 1),
            at_ms=int(now * 1000) - 3 * day_ms,
        )
        store.artifacts.append((aid, run_id, escaped))
        plant(
            "escaped_path",
            "unsafe_path",
            f"{run_id}/{escaped}",
            f"run {name}: name from the HTTP API wrote outside the artifact dir",
        )
    if "missing_file" in faults:
        aid, run_id, art = next(a for a in store.artifacts if a[2] == "data/holdout.table")
        (store.artifact_dir / run_id / art).unlink()
        plant("missing_file", "missing", f"{run_id}/{art}", "row kept, bytes deleted by hand")
    if "bit_rot" in faults:
        aid, run_id, art = [a for a in store.artifacts if a[2] == "model.nippy"][-1]
        target = store.artifact_dir / run_id / art
        st = target.stat()
        with open(target, "r+b") as fh:
            fh.seek(st.st_size // 2)
            byte = fh.read(1)
            fh.seek(st.st_size // 2)
            fh.write(bytes([byte[0] ^ 0x01]))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # rot does not touch mtime
        plant(
            "bit_rot",
            "hash_mismatch",
            f"{run_id}/{art}",
            "one bit flipped in the middle, size and mtime unchanged",
        )
    w.close()
    return store
