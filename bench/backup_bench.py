"""Backup speed and memory against the usual alternative, measured in one run on one store.

Not a test. Prints a table with ratios and writes JSON:
  .venv/bin/python bench/backup_bench.py [--gib 2.0] [--repeat 3] [--json bench/results/backup.json]

Pairs (best of --repeat, page cache warm, every side ends with an fsync of its archive):
  chachaml-ops backup --compression none   vs  sqlite3 .backup + tar -cf          (goal <= 1.2x)
  chachaml-ops backup --compression zstd   vs  sqlite3 .backup + tar -c | zstd -T0 -3 (<= 1.3x)
and peak RSS of `backup` on a store holding one 1 GiB artifact (goal < 100 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chachaml_ops.demo import ChachamlWriter

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "chachaml_ops"]


def _block(rng: random.Random, compressible: bool) -> bytes:
    if not compressible:
        return rng.randbytes(1 << 20)
    # Text-like float tables: what metrics dumps and CSV exports look like (~3-4x with zstd).
    rows = [f"{rng.random():.6f},{rng.random():.6f},{rng.randint(0, 999)}\n" for _ in range(512)]
    text = "".join(rows).encode()
    return (text * (1 + (1 << 20) // len(text)))[: 1 << 20]


def build_store(root: Path, gib: float, seed: int = 1) -> tuple[Path, int]:
    """A store with ~gib GiB: a few big models, many mid files, many small ones; half of the
    bytes compressible. Returns (db, total artifact bytes)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    w = ChachamlWriter(root / "chachaml.db", rng=rng)
    blocks = [_block(rng, i % 2 == 0) for i in range(8)]
    budget = int(gib * (1 << 30))
    total = 0
    run = w.start_run("bench", "r0")
    i = 0
    while total < budget:
        if i % 50 == 0:
            run = w.start_run("bench", f"r{i}")
            for step in range(200):
                w.log_metric(run, "loss", rng.random(), step, 1_700_000_000_000 + step)
        kind = i % 10
        size = (
            (40 << 20)
            if kind == 0
            else (2 << 20) + rng.randint(0, 1 << 20)
            if kind < 4
            else rng.randint(2_000, 200_000)
        )
        data = b"".join(blocks[(i + k) % 8] for k in range(size // (1 << 20) + 1))[:size]
        data = i.to_bytes(8, "big") + data[8:]
        w.log_artifact(run, f"artifacts/{i}.bin", data)
        total += size
        i += 1
    w.close()
    return root / "chachaml.db", total


def build_one_big(root: Path, gib: float = 1.0) -> Path:
    """One artifact of `gib` GiB, written in 1 MiB blocks (its row carries the real hash)."""
    root.mkdir(parents=True)
    w = ChachamlWriter(root / "chachaml.db")
    run = w.start_run("bench", "big")
    target = w.artifact_dir / run / "model.bin"
    target.parent.mkdir(parents=True)
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    n = int(gib * 1024)
    with open(target, "wb") as fh:
        for k in range(n):
            chunk = k.to_bytes(8, "big") + block[8:]
            h.update(chunk)
            fh.write(chunk)
    w.conn.execute(
        "INSERT INTO artifacts (id, run_id, name, path, size, hash, created_at)"
        " VALUES (?, ?, 'model.bin', ?, ?, ?, ?)",
        (w.new_id(), run, f"{run}/model.bin", n << 20, h.hexdigest(), w.now_ms()),
    )
    w.close()
    return root / "chachaml.db"


def warm(path: Path) -> None:
    subprocess.run(["tar", "-cf", "/dev/null", "-C", str(path.parent), path.name], check=True)
    for f in path.parent.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 22):
                    pass


def timed(cmd: list[str] | str, *, shell: bool = False) -> float:
    os.sync()  # the previous run's dirty pages must not be written back on this run's clock
    t = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def ours(db: Path, out: Path, compression: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    state = out.parent / "state"
    cmd = [*CLI, "backup", "--db", str(db), "--out", str(out), "--state-dir", str(state)]
    return timed([*cmd, "--compression", compression])


def theirs(db: Path, out: Path, compression: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    snap = out / "snap.db"
    art = db.with_name("chachaml-artifacts")
    tar = f"tar -c -C {snap.parent} snap.db -C {art.parent} {art.name}"
    if compression == "none":
        pack = f"{tar} -f {out}/b.tar && sync {out}/b.tar"
    else:
        pack = f"{tar} | zstd -q -T0 -3 -o {out}/b.tar.zst && sync {out}/b.tar.zst"
    return timed(f"sqlite3 {db} '.backup {snap}' && {pack}", shell=True)


# Linux carries the forking process's RSS high-water mark into a child's ru_maxrss across
# exec, so the child is started from a small fresh interpreter that forks it: its wait4()
# rusage then measures the command alone (plus a few MiB of that interpreter's pages).
_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mib(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS of the command in MiB, seconds, exit code)."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[-2]) / 1024, time.perf_counter() - t, int(out[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="size of the mixed store")
    ap.add_argument("--big-gib", type=float, default=1.0, help="size of the one big artifact")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backup.json")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=args.dir))
    started = time.perf_counter()
    try:
        db, total = build_store(scratch / "store", args.gib)
        n_files = sum(1 for _ in (scratch / "store" / "chachaml-artifacts").rglob("*.bin"))
        print(
            f"store: {n_files} artifacts, {total / 2**20:.0f} MiB, DB {db.stat().st_size >> 10} KiB"
        )
        warm(db.parent / "chachaml-artifacts")
        rows = []
        for compression, goal, label in (
            ("none", 1.2, "sqlite3 .backup + tar -cf"),
            ("zstd", 1.3, "sqlite3 .backup + tar -c | zstd -T0 -3"),
        ):
            mine, base = [], []
            for _ in range(args.repeat):  # interleaved, so drift hits both sides alike
                mine.append(ours(db, scratch / "ours", compression))
                base.append(theirs(db, scratch / "theirs", compression))
            size_mine = sum(f.stat().st_size for f in (scratch / "ours").glob("chachaml-*"))
            size_base = sum(f.stat().st_size for f in (scratch / "theirs").glob("b.tar*"))
            rows.append(
                {
                    "case": f"backup --compression {compression}",
                    "baseline": label,
                    "ours_s": round(min(mine), 3),
                    "baseline_s": round(min(base), 3),
                    "ratio": round(min(mine) / min(base), 2),
                    "goal": goal,
                    "ours_bytes": size_mine,
                    "baseline_bytes": size_base,
                    "mib_s": round(total / 2**20 / min(mine), 1),
                }
            )
        shutil.rmtree(scratch / "store")
        shutil.rmtree(scratch / "ours", ignore_errors=True)
        shutil.rmtree(scratch / "theirs", ignore_errors=True)
        big = build_one_big(scratch / "big", args.big_gib)
        rss = {}
        for compression in ("none", "zstd"):
            cmd = [*CLI, "backup", "--db", str(big), "--out", str(scratch / f"big-{compression}")]
            cmd += ["--state-dir", str(scratch / "state"), "--compression", compression]
            mib, secs, code = peak_rss_mib(cmd)
            rss[compression] = {
                "peak_rss_mib": round(mib, 1),
                "seconds": round(secs, 2),
                "exit": code,
            }
        verify_mib, verify_s, _ = peak_rss_mib(
            [*CLI, "verify-backup", str(next((scratch / "big-zstd").iterdir()))]
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"{'case':<28} {'ours s':>8} {'baseline s':>11} {'ratio':>6} {'goal':>5}  baseline")
    for r in rows:
        ok = "ok" if r["ratio"] <= r["goal"] else "OVER"
        print(
            f"{r['case']:<28} {r['ours_s']:>8.2f} {r['baseline_s']:>11.2f} {r['ratio']:>6.2f}"
            f" {r['goal']:>5} {ok:<4} {r['baseline']}"
        )
    print()
    for compression, r in rss.items():
        ok = "ok" if r["peak_rss_mib"] < 100 else "OVER"
        print(
            f"peak RSS, {args.big_gib:g} GiB artifact, --compression {compression}:"
            f" {r['peak_rss_mib']:.1f} MiB ({r['seconds']:.1f} s) {ok}"
        )
    print(f"peak RSS, verify-backup of it: {verify_mib:.1f} MiB ({verify_s:.1f} s)")
    doc = {
        "bench": "backup",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "store_bytes": total,
        "store_files": n_files,
        "pairs": rows,
        "peak_rss": rss,
        "verify_backup_peak_rss_mib": round(verify_mib, 1),
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.json} (bench took {doc['runtime_s']:.0f} s)")


if __name__ == "__main__":
    main()
