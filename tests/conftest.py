"""Shared fixtures: real stores in tmp_path built by the demo's own factory, and a CLI runner
that starts the real command in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from chachaml_ops.demo import DemoStore, make_store
from chachaml_ops.store import Store
from chachaml_ops.verify import CheckOptions, run_check

NOW = 1_796_000_000.0  # a fixed clock for in-process checks (2026-11-30)


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path, monkeypatch):
    """Every test (and every CLI process it starts) gets its own state dir."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    return tmp_path / "xdg-state" / "chachaml-ops"


@pytest.fixture
def clean_store(tmp_path: Path) -> DemoStore:
    """A realistic store with no faults, tiny artifacts, the clock at NOW."""
    return make_store(tmp_path / "store", (), scale=0.01, now=NOW)


@pytest.fixture
def store_factory(tmp_path: Path):
    counter = iter(range(1000))

    def build(faults=(), **kw) -> DemoStore:
        kw.setdefault("scale", 0.01)
        kw.setdefault("now", NOW)
        return make_store(tmp_path / f"store{next(counter)}", faults, **kw)

    return build


def check(store: DemoStore, now: float = NOW, **opts):
    """Run the in-process check with the clock at `now`; returns the Report."""
    with Store(store.db) as s:
        return run_check(s, store.artifact_dir, CheckOptions(jobs=2, **opts), clock=lambda: now)


def kinds(report) -> list[tuple[str, str | None]]:
    return sorted((f.kind, f.path) for f in report.findings)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args: str | os.PathLike, timeout: float = 60, prefix=(), **kw) -> CliResult:
    """Run `python -m chachaml_ops ARGS` as a real process (optionally under `prefix`)."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "chachaml_ops", *map(str, args)],
        capture_output=True,
        timeout=timeout,
        **{"text": True, **kw},
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def age(path: Path, seconds: float, now: float | None = None) -> None:
    """Set a file's mtime `seconds` before `now` (real time by default)."""
    t = (time.time() if now is None else now) - seconds
    os.utime(path, (t, t), follow_symlinks=False)
