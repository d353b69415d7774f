"""Read a chachaml metadata DB, strictly read-only; the only place SQL lives.

The DB is opened with `mode=ro` (never written, checkpointed or migrated). Scratch tables for
joins live in SQLite's TEMP schema, which is private to this connection and on disk.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from chachaml_ops.errors import NotSQLite, SchemaError, ScratchFull, StoreLocked, StoreNotFound

SQLITE_MAGIC = b"SQLite format 3\x00"
REQUIRED_ARTIFACT_COLUMNS = ("id", "run_id", "name", "path", "size", "hash", "created_at")
DEFAULT_BUSY_TIMEOUT_MS = 5000
_BATCH = 2000


@dataclass(frozen=True, slots=True)
class ArtifactRow:
    id: str
    run_id: str
    name: str
    path: str
    size: int | None
    hash: str | None
    created_at: int | None  # ms since the epoch
    run_known: bool | None  # None when the store has no runs table
    run_status: str | None


@dataclass(frozen=True, slots=True)
class RunAggregate:
    """One run's rows folded by SQLite into NUL- or comma-separated strings (group_concat).

    Split, they are parallel lists in one row order: a million rows cost a few thousand
    values crossing into Python instead of millions. NULLs are left out by group_concat, so a
    list shorter than `count` means some row lacks that field."""

    run_id: str
    count: int
    ids: str | None  # None unless asked for
    names: str
    paths: str
    sizes: str | None  # None unless asked for
    hashes: str | None
    odd_hashes: int  # rows whose hash is not TEXT (NULL, a BLOB, a number)
    null_names: int  # rows with a NULL id, name or path
    null_sizes: int  # rows with a NULL size (0 unless sizes were asked for)


@dataclass(frozen=True, slots=True)
class DanglingVersion:
    model_name: str
    version: Any
    artifact_id: str | None
    run_id: str | None
    stage: str | None


def _text(raw: bytes) -> str:
    # Paths in the DB are meant to be UTF-8; keep any other bytes losslessly.
    return raw.decode("utf-8", "surrogateescape")


def _bind(text: str) -> bytes:
    # Names from disk may not be UTF-8; bind raw bytes and CAST them to TEXT in SQL, which
    # compares byte-for-byte with what chachaml stored.
    return os.fsencode(text)


def _hint_for(exc: sqlite3.Error) -> str:
    msg = str(exc).lower()
    if "readonly" in msg or "read-only" in msg:
        return (
            "SQLite needs to create the -shm file or recover a hot journal beside the DB; "
            "run as a user who can write the DB's folder (the DB itself is still not written)"
        )
    if "malformed" in msg or "not a database" in msg or "corrupt" in msg:
        return "the DB is damaged: restore it from a backup, or try sqlite3 '.recover' on a copy"
    return "check that --db names a chachaml metadata DB"


def _as_int(value: object) -> int | None:
    """Sizes and timestamps as integers, tolerating SQLite's loose typing ('5', 5.0)."""
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str | bytes):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _row(r: tuple) -> ArtifactRow:
    """An ArtifactRow from (id, run_id, name, path, size, hash, created_at, run known, status)."""
    return ArtifactRow(
        id=_as_text(r[0]),
        run_id=_as_text(r[1]),
        name=_as_text(r[2]),
        path=_as_text(r[3]),
        size=_as_int(r[4]),
        hash=r[5].lower() if isinstance(r[5], str) else None,
        created_at=_as_int(r[6]),
        run_known=None if r[7] is None else bool(r[7]),
        run_status=r[8],
    )


def _locked(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


class Store:
    """A read-only view of one chachaml DB. Use as a context manager."""

    def __init__(self, db: Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        self.db = Path(db)
        self.busy_timeout_ms = busy_timeout_ms
        self._check_file()
        uri = f"file:{quote(os.fsdecode(os.path.abspath(self.db)))}?mode=ro"
        try:
            self.conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.OperationalError as exc:
            raise StoreNotFound(
                f"cannot open {self.db}: {exc}", "check the path and its permissions"
            ) from exc
        self.conn.text_factory = _text
        self.tables: dict[str, set[str]] = {}
        self._guard(self._read_schema)
        self._temp_ready = False

    # -- opening -------------------------------------------------------------------------

    def _check_file(self) -> None:
        if not os.fspath(self.db):
            raise StoreNotFound(
                "--db is empty", "point --db (or db in the daemon config) at a chachaml.db"
            )
        try:
            # O_NONBLOCK: a FIFO at --db must not hang the check
            fd = os.open(self.db, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreNotFound(
                f"no database at {self.db}",
                "point --db (or db in the daemon config) at a chachaml.db",
            ) from None
        except OSError as exc:
            raise StoreNotFound(
                f"cannot open {self.db}: {exc.strerror}", "check its permissions"
            ) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(st.st_mode):
                raise NotSQLite(
                    f"{self.db} is not a regular file",
                    "point --db (or db in the daemon config) at a chachaml.db",
                )
            head = os.pread(fd, len(SQLITE_MAGIC), 0)
        except FileNotFoundError:
            raise StoreNotFound(
                f"no database at {self.db}",
                "point --db (or db in the daemon config) at a chachaml.db",
            ) from None
        except IsADirectoryError:
            raise NotSQLite(
                f"{self.db} is a directory, not a SQLite file",
                "point --db (or db in the daemon config) at the chachaml.db file inside it",
            ) from None
        except OSError as exc:
            raise StoreNotFound(
                f"cannot read {self.db}: {exc.strerror}", "check its permissions"
            ) from None
        finally:
            os.close(fd)
        if head != SQLITE_MAGIC:
            raise NotSQLite(
                f"{self.db} is not a SQLite database",
                "point --db (or db in the daemon config) at the chachaml metadata DB (chachaml.db)",
            )

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                raise StoreLocked(
                    f"{self.db} stayed locked for {self.busy_timeout_ms} ms",
                    "another process holds an exclusive lock; retry later or raise --busy-timeout",
                ) from exc
            raise NotSQLite(f"cannot read {self.db}: {exc}", _hint_for(exc)) from exc
        except sqlite3.DatabaseError as exc:
            raise NotSQLite(f"cannot read {self.db}: {exc}", _hint_for(exc)) from exc

    def _read_schema(self) -> None:
        names = [
            r[0]
            for r in self.conn.execute(
                "SELECT name FROM sqlite_schema WHERE type IN ('table','view')"
            )
        ]
        for name in names:
            cols = {
                r[0] for r in self.conn.execute("SELECT name FROM pragma_table_info(?)", (name,))
            }
            self.tables[name] = cols
        if "artifacts" not in self.tables:
            raise SchemaError(
                f"{self.db} has no 'artifacts' table: not a chachaml store",
                "point --db at the chachaml metadata DB",
            )
        missing = [c for c in REQUIRED_ARTIFACT_COLUMNS if c not in self.tables["artifacts"]]
        if missing:
            raise SchemaError(
                f"{self.db}: table 'artifacts' lacks column(s) {', '.join(missing)}",
                "this chachaml schema is not understood; upgrade chachaml-ops",
            )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def has_runs(self) -> bool:
        return "id" in self.tables.get("runs", ())

    @property
    def has_model_versions(self) -> bool:
        return {"artifact_id", "model_name", "version"} <= self.tables.get("model_versions", set())

    # -- reading -------------------------------------------------------------------------

    def _run_filter(self, run_ids: Iterable[str], alias: str = "a") -> tuple[str, list[bytes]]:
        ids = [_bind(r) for r in run_ids]
        if not ids:
            return "", []
        # Each id in both forms: a foreign writer may have stored run ids as BLOBs, which
        # never equal TEXT (the index serves both).
        marks = ",".join("CAST(? AS TEXT), CAST(? AS BLOB)" for _ in ids)
        return f" WHERE {alias}.run_id IN ({marks})", [b for i in ids for b in (i, i)]

    def totals(self, run_ids: Iterable[str] = ()) -> tuple[int, int]:
        """(row count, sum of recorded sizes)."""
        where, args = self._run_filter(run_ids)
        sql = f"SELECT count(*), coalesce(sum(a.size), 0) FROM artifacts a{where}"
        return self._guard(lambda: tuple(self.conn.execute(sql, args).fetchone()))

    def iter_artifacts(self, run_ids: Iterable[str] = ()) -> Iterator[ArtifactRow]:
        """Every artifact row, streamed (memory does not grow with the row count)."""
        where, args = self._run_filter(run_ids)
        if self.has_runs:
            status = "r.status" if "status" in self.tables["runs"] else "NULL"
            sql = (
                "SELECT a.id, a.run_id, a.name, a.path, a.size, a.hash, a.created_at,"
                f" r.id IS NOT NULL, {status}"
                f" FROM artifacts a LEFT JOIN runs r ON r.id = CAST(a.run_id AS TEXT){where}"
            )
        else:
            sql = (
                "SELECT a.id, a.run_id, a.name, a.path, a.size, a.hash, a.created_at, NULL, NULL"
                f" FROM artifacts a{where}"
            )
        cursor = self._guard(self.conn.execute, sql, args)
        while True:
            batch = self._guard(cursor.fetchmany, _BATCH)
            if not batch:
                return
            for r in batch:
                yield _row(r)

    def run_row_counts(self, run_ids: Iterable[str] = ()) -> list[tuple[str, int]]:
        """(run_id, number of artifact rows) for every run that has rows, by run_id."""
        where, args = self._run_filter(run_ids)
        sql = f"SELECT a.run_id, count(*) FROM artifacts a{where} GROUP BY a.run_id ORDER BY 1"
        counts: dict[str, int] = {}
        for r, n in self._guard(self._fetchall, sql, args):
            run_id = _as_text(r)  # a BLOB id and its TEXT twin are one run
            counts[run_id] = counts.get(run_id, 0) + n
        return sorted(counts.items())

    def iter_row_paths(self, run_ids: Iterable[str]) -> Iterator[tuple[str, str, str, str]]:
        """(id, run_id, name, path) of these runs' rows: the lean read `orphans` needs."""
        where, args = self._run_filter(run_ids)
        sql = f"SELECT a.id, a.run_id, a.name, a.path FROM artifacts a{where}"
        cursor = self._guard(self.conn.execute, sql, args)
        while batch := self._guard(cursor.fetchmany, _BATCH):
            for aid, run_id, name, path in batch:
                yield _as_text(aid), _as_text(run_id), _as_text(name), _as_text(path)

    def run_aggregates(
        self, run_ids: Iterable[str], *, ids: bool, detail: bool
    ) -> list[RunAggregate]:
        """These runs' rows as one RunAggregate per run. Names and paths always; artifact ids
        only with `ids`, sizes and hashes only with `detail` (each costs per row)."""
        where, args = self._run_filter(run_ids)
        id_col = "group_concat(a.id, char(0))" if ids else "NULL"
        extra = (
            "group_concat(a.size), group_concat(a.hash), total(typeof(a.hash) != 'text'),"
            " count(*) - count(a.size)"
            if detail
            else "NULL, NULL, 0, 0"
        )
        sql = (
            f"SELECT a.run_id, count(*), {id_col}, group_concat(a.name, char(0)),"
            f" group_concat(a.path, char(0)), {extra},"
            " 3 * count(*) - count(a.id) - count(a.name) - count(a.path)"
            f" FROM artifacts a{where} GROUP BY a.run_id"
        )
        rows = self._guard(self._fetchall, sql, args)
        return [
            RunAggregate(
                _as_text(r[0]),
                r[1],
                None if r[2] is None else _as_text(r[2]),
                _as_text(r[3]),
                _as_text(r[4]),
                None if r[5] is None else _as_text(r[5]),
                None if r[6] is None else _as_text(r[6]),
                int(r[7]),
                int(r[9]),
                int(r[8]),
            )
            for r in rows
        ]

    def known_runs(self, run_ids: Iterable[str]) -> set[str]:
        """Which of these run ids have a runs row (all of them if the store has no runs table)."""
        ids = list(run_ids)
        if not self.has_runs:
            return set(ids)
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            part = [_bind(r) for r in ids[i : i + 500]]
            marks = ",".join("CAST(? AS TEXT)" for _ in part)
            sql = f"SELECT id FROM runs WHERE id IN ({marks})"
            rows = self._guard(self._fetchall, sql, part)
            found.update(r for (r,) in rows)
        return found

    def _fetchall(self, sql: str, args: list[Any]) -> list[Any]:
        return self.conn.execute(sql, args).fetchall()

    def iter_foreign_paths(self) -> Iterator[tuple[str, str, str]]:
        """(run_id, name, path) of rows whose path does not start with `<run_id>/`: the only
        rows that can reference a file outside their own run folder."""
        sql = (
            "SELECT run_id, name, path FROM artifacts"
            " WHERE substr(path, 1, length(run_id) + 1) IS NOT run_id || '/'"
            " OR instr(run_id, '/') > 0 OR run_id IN ('', '.', '..')"
        )
        cursor = self._guard(self.conn.execute, sql)
        while batch := self._guard(cursor.fetchmany, _BATCH):
            for run_id, name, path in batch:
                yield str(run_id), str(name), path if isinstance(path, str) else str(path or "")

    def iter_dangling_model_versions(self) -> Iterator[DanglingVersion]:
        if not self.has_model_versions:
            return
        cols = self.tables["model_versions"]
        run = "mv.run_id" if "run_id" in cols else "NULL"
        stage = "mv.stage" if "stage" in cols else "NULL"
        sql = (
            f"SELECT mv.model_name, mv.version, mv.artifact_id, {run}, {stage}"
            " FROM model_versions mv"
            " WHERE mv.artifact_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.id = mv.artifact_id)"
        )
        for r in self._guard(lambda: self.conn.execute(sql).fetchall()):
            yield DanglingVersion(*r)

    def run_status(self, run_id: str) -> tuple[bool, str | None]:
        """(whether the store still knows this run, its status if the runs table has it).

        A run is known by its runs row or its artifact rows. model_versions is not asked:
        retention leaves those rows pointing at runs it deleted.
        """
        if self.has_runs:
            status = "status" if "status" in self.tables["runs"] else "NULL"
            sql = f"SELECT {status} FROM runs WHERE id = CAST(? AS TEXT)"
            row = self._guard(lambda: self.conn.execute(sql, (_bind(run_id),)).fetchone())
            if row is not None:
                return True, row[0]
        sql = "SELECT 1 FROM artifacts WHERE run_id = CAST(? AS TEXT) LIMIT 1"
        known = self._guard(lambda: self.conn.execute(sql, (_bind(run_id),)).fetchone())
        return known is not None, None

    def has_row_for(self, run_id: str, name: str) -> bool:
        """Live re-check, used right before a file is moved: does a row claim it now?

        A foreign writer may have stored the ids as BLOBs, which never equal TEXT: both
        forms are asked for, so no such row's file is ever taken for an orphan."""
        sql = (
            "SELECT 1 FROM artifacts WHERE run_id IN (CAST(? AS TEXT), CAST(? AS BLOB))"
            " AND name IN (CAST(? AS TEXT), CAST(? AS BLOB)) LIMIT 1"
        )
        run_b, name_b = _bind(run_id), _bind(name)
        args = (run_b, run_b, name_b, name_b)
        return self._guard(lambda: self.conn.execute(sql, args).fetchone()) is not None

    def artifact_row(self, run_id: str, name: str) -> ArtifactRow | None:
        """The row for one (run_id, name), or None: what the file watcher checks a file against."""
        sql = (
            "SELECT id, run_id, name, path, size, hash, created_at FROM artifacts"
            " WHERE run_id = CAST(? AS TEXT) AND name = CAST(? AS TEXT) LIMIT 1"
        )
        args = (_bind(run_id), _bind(name))
        r = self._guard(lambda: self.conn.execute(sql, args).fetchone())
        if r is None:
            return None
        return _row((*r, None, None))

    # -- scratch space for joins ---------------------------------------------------------

    def _scratch(self, sql: str, rows: Iterable[tuple]) -> None:
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise ScratchFull(
                f"SQLite scratch space failed: {exc}",
                "point SQLITE_TMPDIR at a folder with more free space",
            ) from exc

    def _ensure_temp(self) -> None:
        if self._temp_ready:
            return
        # Scratch data is rebuilt on every run: no journal, no syncs, a bigger page cache.
        self.conn.executescript(
            "PRAGMA temp_store = FILE;"
            "PRAGMA temp.journal_mode = OFF;"
            "PRAGMA temp.synchronous = OFF;"
            "PRAGMA temp.cache_size = -16384;"
            "CREATE TEMP TABLE refs (path BLOB PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TEMP TABLE seen (path BLOB PRIMARY KEY, type TEXT) WITHOUT ROWID;"
        )
        self._temp_ready = True

    # Scratch paths are stored as BLOBs of the raw file-name bytes, so names that are not
    # UTF-8 compare exactly and never fail to encode.
    def add_refs(self, paths: Iterable[str]) -> None:
        self._ensure_temp()
        self._scratch(
            "INSERT OR IGNORE INTO temp.refs VALUES (?)", ((os.fsencode(p),) for p in paths)
        )

    def add_seen(self, entries: Iterable[tuple[str, str]]) -> None:
        self._ensure_temp()
        self._scratch(
            "INSERT OR IGNORE INTO temp.seen VALUES (?, ?)",
            ((os.fsencode(p), t) for p, t in entries),
        )

    def iter_unreferenced(self) -> Iterator[tuple[str, str]]:
        """Files seen on disk that no row references: (relpath, type)."""
        self._ensure_temp()
        cursor = self.conn.execute(
            "SELECT s.path, s.type FROM temp.seen s"
            " WHERE NOT EXISTS (SELECT 1 FROM temp.refs r WHERE r.path = s.path)"
        )
        while batch := cursor.fetchmany(_BATCH):
            for path, kind in batch:
                yield os.fsdecode(path), kind

    def reset_scratch(self) -> None:
        if self._temp_ready:
            self.conn.executescript("DELETE FROM temp.refs; DELETE FROM temp.seen;")

    def describe(self) -> dict[str, Any]:
        return {"db": str(self.db), "sqlite_version": sqlite3.sqlite_version}

    # -- whole-DB operations used by backups ---------------------------------------------

    def snapshot_to(self, target: Path) -> None:
        """Copy a consistent snapshot into `target` with SQLite's online backup API.

        One step (pages=-1) under one read transaction: writers in WAL mode go on meanwhile,
        and the copy is exactly the DB as of that transaction. The target is left in rollback
        mode so it is one self-contained file (chachaml switches it back to WAL on open).
        """
        dest = sqlite3.connect(target, isolation_level=None)
        try:
            # No rollback journal beside the scratch copy: a crash must leave only the one
            # file whose name the stale-partial cleanup knows.
            dest.execute("PRAGMA journal_mode=OFF")
            try:
                self.conn.backup(dest)
            except sqlite3.OperationalError as exc:
                if _locked(exc):
                    raise StoreLocked(
                        f"{self.db} stayed locked for {self.busy_timeout_ms} ms",
                        "another process holds an exclusive lock; retry later",
                    ) from exc
                raise  # the target's problem (e.g. a full disk): the caller words it
            dest.execute("PRAGMA journal_mode=DELETE")
        finally:
            dest.close()

    def integrity_check(self) -> list[str]:
        """PRAGMA integrity_check: an empty list when the DB is sound, else its messages."""
        rows = self._guard(lambda: self.conn.execute("PRAGMA integrity_check").fetchall())
        messages = [str(r[0]) for r in rows]
        return [] if messages == ["ok"] else messages
