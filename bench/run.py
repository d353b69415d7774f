"""Benchmarks for verify/orphans at scale, each against the usual alternative in the same run.

Builds its stores under bench/work/ (reused between runs), prints a table and writes
bench/results.json. `--only NAME` runs one figure group, `--quick` uses smaller sizes (for
iterating: the goals are for the full sizes); either writes bench/results-NAME[-quick].json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
VENV_BIN = Path(sys.executable).parent
OPS = [str(VENV_BIN / "chachaml-ops")]
MIB = 2**20
EMPTY_SHA = hashlib.sha256(b"").hexdigest()
T0_MS = 1_700_000_000_000

SCHEMA = """
CREATE TABLE runs (id TEXT PRIMARY KEY, experiment TEXT NOT NULL, name TEXT,
  status TEXT NOT NULL, start_time INTEGER NOT NULL, end_time INTEGER);
CREATE TABLE artifacts (id TEXT PRIMARY KEY, run_id TEXT NOT NULL, name TEXT NOT NULL,
  path TEXT NOT NULL, content_type TEXT, size INTEGER, hash TEXT, created_at INTEGER NOT NULL);
CREATE UNIQUE INDEX idx_artifacts_run_name ON artifacts (run_id, name);
"""


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: float
    max_rss_mb: float
    code: int
    stdout: bytes = b""
    cpu_s: float = 0.0  # user + system of the whole process tree


def timed(cmd: list[str] | str, *, cwd: Path | None = None, shell: bool = False) -> Timing:
    """Wall time and peak RSS (largest process in the tree, via wait4) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Timing(elapsed, usage.ru_maxrss / 1024, proc.returncode, out, cpu)


def best_of(n: int, fn) -> Timing:
    """The fastest of n runs (noise on a shared machine only ever adds time)."""
    runs = [fn() for _ in range(n)]
    best = min(runs, key=lambda t: t.seconds)
    best.max_rss_mb = max(t.max_rss_mb for t in runs)
    return best


def openssl_sha256_bytes_per_s(processes: int = 1) -> float:
    multi = ["-multi", str(processes)] if processes > 1 else []
    out = subprocess.run(
        ["openssl", "speed", *multi, "-seconds", "1", "-bytes", "16384", "-evp", "sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # "sha256   1482205.87k" -> thousands of bytes per second for 16384-byte blocks
    m = re.search(r"^sha256\s+([\d.]+)k", out, re.M)
    if not m:
        raise SystemExit(f"cannot parse openssl speed output:\n{out}")
    return float(m.group(1)) * 1000


def hashlib_bytes_per_s(path: Path) -> float:
    """One core, Python's hashlib over a cached file (what verify can reach per thread)."""
    best = 0.0
    for _ in range(2):
        fd = os.open(path, os.O_RDONLY)
        h, buf = hashlib.sha256(), bytearray(256 * 1024)
        view, total = memoryview(buf), 0
        start = time.perf_counter()
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            total += n
        best = max(best, total / (time.perf_counter() - start))
        os.close(fd)
    return best


def resident_bytes(paths: list[Path]) -> int:
    """Bytes of these files in the page cache, by util-linux `fincore` (mincore(2))."""
    out = subprocess.run(
        ["fincore", "--bytes", "--raw", "--noheadings", "--output", "RES", *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(x) for x in out.split())


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(8 * MIB):
                pass


# -- building stores ------------------------------------------------------------------------


def _new_db(root: Path) -> sqlite3.Connection:
    if root.exists():
        shutil.rmtree(root)
    (root / "store-artifacts").mkdir(parents=True)
    conn = sqlite3.connect(root / "store.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def _finish_db(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def build_store(root: Path, runs: int, per_run: int, size: int, tag: str) -> Path:
    """runs x per_run files of `size` bytes (distinct contents), one row each. Reused if built."""
    marker = root / "BUILT"
    want = f"{runs}x{per_run}x{size}"
    if marker.exists() and marker.read_text() == want:
        return root
    conn = _new_db(root)
    art = root / "store-artifacts"
    base = os.urandom(size) if size else b""
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO runs VALUES (?, 'bench', ?, 'completed', ?, ?)",
        ((f"run{r:05d}", f"r{r}", T0_MS, T0_MS) for r in range(runs)),
    )
    rows = []
    for r in range(runs):
        run_id = f"run{r:05d}"
        folder = art / run_id
        folder.mkdir()
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        for i in range(per_run):
            name = f"{tag}{i:06d}.bin"
            data = (r * per_run + i).to_bytes(8, "little") + base[8:] if size else b""
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dfd)
            if data:
                os.write(fd, data)
            os.close(fd)
            digest = hashlib.sha256(data).hexdigest() if size else EMPTY_SHA
            rows.append(
                (f"{run_id}-{i}", run_id, name, f"{run_id}/{name}", len(data), digest, T0_MS)
            )
            if len(rows) >= 50_000:
                _insert_rows(conn, rows)
        os.close(dfd)
    _insert_rows(conn, rows)
    conn.execute("COMMIT")
    _finish_db(conn)
    old = T0_MS / 1000 - 86400
    os.utime(art, (old, old))
    marker.write_text(want)
    return root


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    conn.executemany(
        "INSERT INTO artifacts VALUES (?, ?, ?, ?, 'application/octet-stream', ?, ?, ?)", rows
    )
    rows.clear()


def build_large(root: Path, count: int, size: int) -> Path:
    """`count` files of `size` random bytes in one run."""
    marker = root / "BUILT"
    want = f"large {count}x{size}"
    if marker.exists() and marker.read_text() == want:
        return root
    conn = _new_db(root)
    folder = root / "store-artifacts" / "run00000"
    folder.mkdir()
    conn.execute("INSERT INTO runs VALUES ('run00000', 'bench', 'big', 'completed', 0, 0)")
    for i in range(count):
        h = hashlib.sha256()
        with open(folder / f"big{i}.bin", "wb") as fh:
            left = size
            while left:
                chunk = os.urandom(min(left, 16 * MIB))
                fh.write(chunk)
                h.update(chunk)
                left -= len(chunk)
        conn.execute(
            "INSERT INTO artifacts VALUES (?, 'run00000', ?, ?, 'application/octet-stream',"
            " ?, ?, ?)",
            (f"big-{i}", f"big{i}.bin", f"run00000/big{i}.bin", size, h.hexdigest(), T0_MS),
        )
    _finish_db(conn)
    marker.write_text(want)
    return root


def files_of(root: Path) -> list[Path]:
    art = root / "store-artifacts"
    return sorted(p for p in art.rglob("*") if p.is_file())


def relpaths_of(root: Path) -> list[str]:
    art = root / "store-artifacts"
    return sorted(os.path.relpath(p, art) for p in files_of(root))


def add_new_artifacts(root: Path, count: int, size: int) -> None:
    """Add `count` files + rows in a fresh run (artifacts new since the last verify)."""
    art = root / "store-artifacts"
    run_id = "run-new"
    if (art / run_id).exists():
        shutil.rmtree(art / run_id)
    (art / run_id).mkdir()
    conn = sqlite3.connect(root / "store.db", isolation_level=None)
    conn.execute("DELETE FROM artifacts WHERE run_id = ?", (run_id,))
    conn.execute(
        "INSERT OR IGNORE INTO runs VALUES (?, 'bench', 'new', 'completed', 0, 0)", (run_id,)
    )
    rows = []
    for i in range(count):
        data = os.urandom(size)
        name = f"new{i:06d}.bin"
        (art / run_id / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        rows.append((f"new-{i}", run_id, name, f"{run_id}/{name}", size, digest, T0_MS))
    _insert_rows(conn, rows)
    conn.close()


# -- figures --------------------------------------------------------------------------------


@dataclass
class Figure:
    group: str
    name: str
    ours: float
    theirs: float | None
    unit: str
    goal: str
    met: bool | None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.theirs in (None, 0):
            return None
        return self.theirs / self.ours if self.unit == "s" else self.ours / self.theirs


def verify_cmd(root: Path, *args: str) -> list[str]:
    return [*OPS, "verify", "--db", str(root / "store.db"), "--json", *args]


def stats_of(t: Timing) -> dict:
    try:
        return json.loads(t.stdout)["summary"]
    except (ValueError, KeyError):
        return {}


def bench_large(q: bool, figs: list[Figure], facts: dict) -> None:
    count, size = 4, (64 if q else 512) * MIB
    root = build_large(WORK / ("large-q" if q else "large"), count, size)
    files = files_of(root)
    warm(files)
    total = count * size
    ssl = openssl_sha256_bytes_per_s()
    facts["openssl_sha256_1core_mb_s"] = round(ssl / 1e6)
    # What two openssl processes get right now: on a shared VM, less than 2 x one core.
    ssl2 = openssl_sha256_bytes_per_s(2)
    facts["openssl_sha256_multi2_mb_s"] = round(ssl2 / 1e6)
    facts["hashlib_sha256_1core_mb_s"] = round(hashlib_bytes_per_s(files[0]) / 1e6)
    sums = best_of(2, lambda: timed(["sha256sum", *map(str, files)]))
    facts["sha256sum_1core_mb_s"] = round(total / sums.seconds / 1e6)
    full = best_of(3, lambda: timed(verify_cmd(root)))
    quick = best_of(3, lambda: timed(verify_cmd(root, "--quick")))
    assert full.code == 0 and stats_of(full)["files_hashed"] == count, full
    figs.append(
        Figure(
            "large",
            f"verify {count} x {size // MIB} MiB, end to end",
            full.seconds,
            sums.seconds,
            "s",
            ">= 4x faster than sha256sum",
            sums.seconds / full.seconds >= 4,
            extra={"rss_mb": full.max_rss_mb},
        )
    )
    figs.append(
        Figure(
            "large",
            "  same, CPU seconds (user+sys; immune to other load)",
            full.cpu_s,
            sums.cpu_s,
            "s",
            "(context)",
            None,
        )
    )
    steady = total / max(full.seconds - quick.seconds, 1e-9)
    figs.append(
        Figure(
            "large",
            "steady-state hash rate (full - quick) vs 2 x openssl",
            steady / 1e6,
            2 * ssl / 1e6,
            "MB/s",
            ">= 0.8 of 2-core openssl",
            steady >= 0.8 * 2 * ssl,
            extra={"quick_s": quick.seconds},
        )
    )
    figs.append(
        Figure(
            "large",
            "  same rate vs `openssl speed -multi 2` measured in this run",
            steady / 1e6,
            ssl2 / 1e6,
            "MB/s",
            "(context: cores actually free)",
            None,
        )
    )
    per_cpu = total / max(full.cpu_s - quick.cpu_s, 1e-9)
    figs.append(
        Figure(
            "large",
            "  hash rate per CPU-second (full - quick) vs 1-core openssl",
            per_cpu / 1e6,
            ssl / 1e6,
            "MB/s",
            "(context: the 2-core goal needs >= 0.8)",
            None,
        )
    )
    facts["large_full_rss_mb"] = full.max_rss_mb

    # Good neighbour: what --drop-cache leaves in the page cache, and --max-rate.
    before = resident_bytes(files)
    dropped = timed(verify_cmd(root, "--drop-cache"))
    after = resident_bytes(files)
    figs.append(
        Figure(
            "neighbour",
            "page cache of hashed files after --drop-cache (MiB resident)",
            after / MIB,
            before / MIB,
            "MiB",
            "near 0 (was fully cached)",
            after <= 0.05 * total,
            note=f"run took {dropped.seconds:.2f}s",
        )
    )
    warm(files)
    kept = timed(verify_cmd(root))
    figs.append(
        Figure(
            "neighbour",
            "page cache of hashed files after plain verify (MiB resident)",
            resident_bytes(files) / MIB,
            total / MIB,
            "MiB",
            "unchanged (default keeps cache)",
            None,
            note=f"run took {kept.seconds:.2f}s",
        )
    )
    rate = 200 * MIB if not q else 100 * MIB
    limited = timed(verify_cmd(root, "--max-rate", str(rate // MIB) + "M"))
    achieved = total / max(limited.seconds - quick.seconds, 1e-9)
    figs.append(
        Figure(
            "neighbour",
            f"--max-rate {rate // MIB}M achieved (MiB/s)",
            achieved / MIB,
            rate / MIB,
            "MiB/s",
            "within 5% of the limit",
            achieved <= rate * 1.05 and achieved >= rate * 0.8,
        )
    )


def bench_small(q: bool, figs: list[Figure], facts: dict) -> None:
    runs, per_run, size = (10, 1000, 4096) if q else (50, 1000, 4096)
    root = build_store(WORK / ("small-q" if q else "small"), runs, per_run, size, "s")
    rels = relpaths_of(root)
    art = root / "store-artifacts"
    sums = best_of(2, lambda: timed(["sha256sum", *rels], cwd=art))
    full = best_of(3, lambda: timed(verify_cmd(root)))
    assert full.code == 0 and stats_of(full)["files_hashed"] == len(rels), full
    figs.append(
        Figure(
            "small",
            f"verify {len(rels):,} x {size // 1024} KiB, end to end",
            full.seconds,
            sums.seconds,
            "s",
            ">= 2x faster than sha256sum",
            sums.seconds / full.seconds >= 2,
            extra={"rss_mb": full.max_rss_mb},
        )
    )
    figs.append(
        Figure(
            "small",
            "  same, CPU seconds (user+sys; immune to other load)",
            full.cpu_s,
            sums.cpu_s,
            "s",
            "(context)",
            None,
        )
    )
    threads = best_of(2, lambda: timed(verify_cmd(root, "--no-processes")))
    figs.append(
        Figure(
            "small",
            "same, thread pool only (--no-processes)",
            threads.seconds,
            sums.seconds,
            "s",
            "(for comparison)",
            None,
        )
    )


def bench_incremental(q: bool, figs: list[Figure], facts: dict) -> None:
    runs, per_run, size = (4, 250, 2 * MIB) if q else (20, 250, 2 * MIB)
    root = build_store(WORK / ("incr-q" if q else "incr"), runs, per_run, size, "i")
    warm(files_of(root))
    state = WORK / ("incr-q-state" if q else "incr-state")
    if state.exists():
        shutil.rmtree(state)
    n_new = runs * per_run // 100
    art = root / "store-artifacts" / "run-new"
    if art.exists():
        shutil.rmtree(art)
    conn = sqlite3.connect(root / "store.db", isolation_level=None)
    conn.execute("DELETE FROM artifacts WHERE run_id = 'run-new'")
    conn.close()
    full = best_of(2, lambda: timed(verify_cmd(root)))
    seed = timed(verify_cmd(root, "--state-dir", str(state), "--max-age", "7d"))
    assert seed.code == 0, seed

    def one_incremental() -> Timing:
        # Fresh files (new inodes, no marks) each time, so every try has exactly 1% new.
        add_new_artifacts(root, n_new, size)
        warm(files_of(root))
        return timed(verify_cmd(root, "--state-dir", str(state), "--max-age", "7d"))

    incr = best_of(3, one_incremental)  # best of, like the full run it is compared with
    st = stats_of(incr)
    assert incr.code == 0 and st.get("files_hashed") == n_new, (incr, st)
    figs.append(
        Figure(
            "incremental",
            f"--max-age 7d with 1% new ({n_new} of {runs * per_run} x {size // MIB} MiB)",
            incr.seconds,
            full.seconds,
            "s",
            "<= 5% of a full run",
            incr.seconds <= 0.05 * full.seconds,
            note=f"hashed {st.get('files_hashed')} files, skipped {st.get('files_skipped')}",
        )
    )


def bench_million(q: bool, figs: list[Figure], facts: dict) -> None:
    runs, per_run = (100, 1000) if q else (1000, 1000)
    n = runs * per_run
    root = build_store(WORK / ("million-q" if q else "million"), runs, per_run, 0, "e")
    art = root / "store-artifacts"
    find = best_of(3, lambda: timed(f"find {art} -type f | wc -l", shell=True))
    facts["find_cpu_s"] = round(find.cpu_s, 2)
    assert int(find.stdout) == n, find
    quick = best_of(2, lambda: timed(verify_cmd(root, "--quick")))
    assert quick.code == 0 and stats_of(quick)["rows"] == n, quick
    orph = best_of(2, lambda: timed([*OPS, "orphans", "--db", str(root / "store.db"), "--json"]))
    assert orph.code == 0, orph
    label = f"{n:,}"
    for what, t in ((f"verify --quick, {label} rows", quick), (f"orphans, {label} files", orph)):
        figs.append(
            Figure(
                "million",
                what,
                t.seconds,
                find.seconds,
                "s",
                "<= 2x find | wc -l",
                t.seconds <= 2 * find.seconds,
                note=f"CPU {t.cpu_s:.1f}s vs find {find.cpu_s:.1f}s",
            )
        )
        figs.append(
            Figure(
                "million",
                what + ", peak RSS",
                t.max_rss_mb,
                None,
                "MB",
                "<= 200 MB",
                t.max_rss_mb <= 200,
            )
        )
    full = timed(verify_cmd(root))
    assert full.code == 0, full
    figs.append(
        Figure(
            "million",
            f"full verify, {label} rows, peak RSS",
            full.max_rss_mb,
            None,
            "MB",
            "< 200 MB",
            full.max_rss_mb < 200,
            note=f"took {full.seconds:.1f}s",
        )
    )
    if "large_full_rss_mb" in facts:
        figs.append(
            Figure(
                "million",
                "full verify peak RSS, 4 x 512 MiB store (size-independent)",
                facts["large_full_rss_mb"],
                None,
                "MB",
                "< 200 MB",
                facts["large_full_rss_mb"] < 200,
            )
        )


GROUPS = {
    "large": bench_large,
    "small": bench_small,
    "incremental": bench_incremental,
    "million": bench_million,
}


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:,.0f} {unit}"


def table(figs: list[Figure]) -> str:
    head = ("figure", "ours", "theirs", "ratio", "goal", "met?")
    rows = [
        (
            f.name,
            fmt(f.ours, f.unit),
            fmt(f.theirs, f.unit),
            "-" if f.ratio is None else f"{f.ratio:.2f}x",
            f.goal,
            {True: "yes", False: "NO", None: "-"}[f.met],
        )
        for f in figs
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=sorted(GROUPS), action="append")
    ap.add_argument("--quick", action="store_true", help="smaller stores, for iterating")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    # Time the tool as a pip install runs it, from byte-compiled modules: with
    # PYTHONDONTWRITEBYTECODE set (as on this machine), an editable install would otherwise
    # compile every module from source at every start (~50 ms, a third of the start-up).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(HERE.parent / "chachaml_ops")], check=True
    )
    figs: list[Figure] = []
    facts: dict = {
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "loadavg_at_start": round(os.getloadavg()[0], 2),
    }
    start = time.perf_counter()
    for name in args.only or list(GROUPS):
        t = time.perf_counter()
        GROUPS[name](args.quick, figs, facts)
        print(f"[{name}: {time.perf_counter() - t:.0f}s]", file=sys.stderr, flush=True)
    facts["bench_seconds"] = round(time.perf_counter() - start)
    facts["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    print(table(figs))
    for f in figs:
        if f.note:
            print(f"  * {f.name.strip()}: {f.note}")
    print("\n" + ", ".join(f"{k}={v}" for k, v in facts.items()))
    doc = {
        "facts": facts,
        "figures": [
            {
                "group": f.group,
                "figure": f.name,
                "ours": round(f.ours, 4),
                "theirs": None if f.theirs is None else round(f.theirs, 4),
                "unit": f.unit,
                "ratio": None if f.ratio is None else round(f.ratio, 3),
                "goal": f.goal,
                "met": f.met,
                "note": f.note,
                **f.extra,
            }
            for f in figs
        ],
    }
    # A partial or --quick run never replaces the full run's results.json.
    name = (
        "results"
        + "".join(f"-{g}" for g in sorted(args.only or ()))
        + ("-quick" if args.quick else "")
    )
    out = HERE / f"{name}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
