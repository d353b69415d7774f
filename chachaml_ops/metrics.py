"""Prometheus textfile metrics: render job results per store, and write the file atomically.

Pure rendering plus one atomic write (temp file in the same folder, fsync, rename), so
node-exporter never reads half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "chachaml_ops"

HELP: Mapping[str, tuple[str, str]] = {
    "verify_last_success_timestamp_seconds": ("gauge", "End of the last verify that could check."),
    "verify_duration_seconds": ("gauge", "Wall time of the last verify."),
    "artifacts": ("gauge", "Artifact rows seen by the last complete verify."),
    "orphans_last_success_timestamp_seconds": (
        "gauge",
        "End of the last orphans run that could check.",
    ),
    "orphans_duration_seconds": ("gauge", "Wall time of the last orphans run."),
    "backup_last_success_timestamp_seconds": ("gauge", "End of the last successful backup."),
    "backup_duration_seconds": ("gauge", "Wall time of the last backup."),
    "backup_size_bytes": ("gauge", "Size of the last successful backup archive."),
    "findings": ("gauge", "Findings of the last complete run of a job, by kind."),
    "orphan_bytes": ("gauge", "Bytes in orphan files found by the last complete run of a job."),
    "verify_last_exit_code": ("gauge", "Exit code of the last verify (3: could not check)."),
    "orphans_last_exit_code": ("gauge", "Exit code of the last orphans run (3: could not check)."),
    "backup_last_exit_code": ("gauge", "Exit code of the last backup (3: failed)."),
    "job_last_exit_code": ("gauge", "Exit code of the last run of a job (3: could not check)."),
    "job_last_run_timestamp_seconds": ("gauge", "End of the last run of a job."),
    "watch_findings": ("gauge", "Findings logged by the file watcher since the daemon started."),
}


@dataclass(frozen=True)
class Sample:
    name: str  # without the prefix, a key of HELP
    labels: Mapping[str, str] = field(default_factory=dict)
    value: float = 0.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(samples: Iterable[Sample]) -> str:
    """The exposition format: HELP/TYPE once per metric, samples grouped under it."""
    by_name: dict[str, list[Sample]] = {}
    for s in samples:
        if s.name not in HELP:
            raise ValueError(f"undocumented metric {s.name!r}")
        by_name.setdefault(s.name, []).append(s)
    lines: list[str] = []
    for name in HELP:
        group = by_name.get(name)
        if not group:
            continue
        kind, text = HELP[name]
        full = f"{PREFIX}_{name}"
        lines.append(f"# HELP {full} {text}")
        lines.append(f"# TYPE {full} {kind}")
        for s in sorted(group, key=lambda s: sorted(s.labels.items())):
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
            lines.append(
                f"{full}{{{labels}}} {_number(s.value)}" if labels else f"{full} {_number(s.value)}"
            )
    return "\n".join(lines) + "\n" if lines else ""


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` atomically: a reader sees the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # node-exporter runs as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
