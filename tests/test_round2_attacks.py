"""Second adversarial round on verify's fast path and its fixes: a stop reaches the threads
hashing large files, and an interrupted run counts only the rows it checked."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, run_check
from tests.conftest import NOW
from tests.test_fast_path import _add, _file, _run
from tests.test_fast_path_attacks import _connect

# -- signals via the real CLI -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_does_not_wait_for_the_large_file_being_hashed(store_factory, sig):
    """SIGTERM or Ctrl-C while a pool thread reads a large file (12 MiB at --max-rate 1M:
    12 s to read): the signal also sets the CLI's stop flag, which sha256_fd asks between
    chunks, so `verify` exits within a chunk instead of reading the file to its end."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "big")
    data = os.urandom(12 << 20)
    _add(conn, "big", "huge.bin", data)
    _file(run, "huge.bin", data)
    conn.close()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "chachaml_ops", "verify", "--db", str(store.db)),
            *("--jobs", "2", "--no-processes", "--max-rate", "1M"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(1.5)  # the huge file is now being read on a pool thread
        sent = time.monotonic()
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
        took = time.monotonic() - sent
        assert proc.returncode in (130, 143), f"still running {took:.1f} s after {sig.name}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- counters of an interrupted run -------------------------------------------------------


def test_an_interrupted_fast_path_counts_only_the_rows_it_checked(store_factory):
    """Stopped after the first folder of a plain run, `rows` (what the JSON report and the
    daemon's job summary call rows checked) counts only the rows that were checked."""
    store = store_factory(())
    conn = _connect(store)
    run = _run(conn, store.artifact_dir, "!first")  # sorts before the demo's runs (hex ids)
    for folder in ("a", "b"):
        (run / folder).mkdir()
        for i in range(3):
            data = b"%s%d" % (folder.encode(), i)
            _add(conn, "!first", f"{folder}/f{i}.bin", data)
            _file(run / folder, f"f{i}.bin", data)
    conn.close()
    for fast_path in (False, True):
        progressed: list[bool] = []
        with Store(store.db) as s:
            report = run_check(
                s,
                store.artifact_dir,
                CheckOptions(jobs=1, processes=False, fast_path=fast_path),
                clock=lambda: NOW,
                progress=lambda _stats, p=progressed: p.append(True),
                should_stop=lambda p=progressed: bool(p),
            )
        stats = report.stats
        assert stats["interrupted"] is True
        assert report.findings == []
        # every row here is clean, so each row checked is a file hashed
        assert stats["rows"] == stats["files_hashed"], (fast_path, stats)
