"""The one report model shared by verify, orphans, backup and the daemon.

Checkers produce `Finding` values; this module owns severity, the exit-code policy and the
text and JSON renderings, so no checker decides how bad its own findings are.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from chachaml_ops.errors import EXIT_CLEAN, EXIT_ERRORS, EXIT_WARNINGS

SCHEMA_VERSION = 1


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


SEVERITY: Mapping[str, Severity] = {
    "missing": Severity.ERROR,
    "size_mismatch": Severity.ERROR,
    "hash_mismatch": Severity.ERROR,
    "not_a_file": Severity.ERROR,
    "unreadable": Severity.ERROR,
    "unsafe_path": Severity.ERROR,
    "dangling_model_version": Severity.ERROR,
    "db_corrupt": Severity.ERROR,  # a DB snapshot in a backup fails PRAGMA integrity_check
    "orphan_file": Severity.WARNING,
    "unverifiable": Severity.WARNING,
    "run_missing": Severity.WARNING,
    "in_flight": Severity.INFO,
}

# Order in which kinds are shown: worst first, then by how actionable they are.
KIND_ORDER = tuple(SEVERITY)


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem with one artifact row, file or registry entry."""

    kind: str
    path: str | None = None  # relative to the artifact dir; surrogate-escaped when not UTF-8
    detail: str = ""
    artifact_id: str | None = None
    run_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SEVERITY:
            raise ValueError(f"unknown finding kind {self.kind!r}")

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.kind]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": self.kind,
            "severity": str(self.severity),
            "path": None,
            "artifact_id": self.artifact_id,
            "run_id": self.run_id,
            "detail": self.detail,
        }
        if self.path is not None:
            doc.update(path_fields(self.path))
        doc.update(self.extra)
        return doc


def path_fields(path: str) -> dict[str, str]:
    """JSON fields for a path: `path` always; `path_b64` with the raw bytes when not UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return {
            "path": raw.decode("utf-8", "backslashreplace"),
            "path_b64": base64.b64encode(raw).decode("ascii"),
        }
    return {"path": path}


def iso_time(ts: float) -> str:
    """UTC, second precision, the one timestamp format of reports and logs."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def display_path(path: str | None) -> str:
    if path is None:
        return "-"
    return printable(path_fields(path)["path"])


@dataclass
class Report:
    """What one job saw: the store, counters, findings, and any actions it took."""

    command: str
    store: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    actions: list[dict[str, Any]] = field(default_factory=list)

    def add(self, findings: Iterable[Finding]) -> None:
        self.findings.extend(findings)

    def counts(self) -> dict[str, int]:
        counted = Counter(f.kind for f in self.findings)
        return {kind: counted[kind] for kind in KIND_ORDER if counted[kind]}

    def severity_counts(self) -> dict[str, int]:
        counted = Counter(str(f.severity) for f in self.findings)
        return {str(s): counted[str(s)] for s in Severity}

    def exit_code(self) -> int:
        """The findings' exit code; 2 if an action the operator asked for failed."""
        if any(a.get("action") == "failed" for a in self.actions):
            return EXIT_ERRORS
        return exit_code_for(self.findings)

    def action_counts(self) -> dict[str, int]:
        return dict(Counter(a["action"] for a in self.actions))

    def to_json(self) -> dict[str, Any]:
        summary = {
            "exit_code": self.exit_code(),
            "findings": self.severity_counts(),
            "by_kind": self.counts(),
            **self.stats,
        }
        if self.actions:
            summary["actions"] = self.action_counts()
        doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "command": self.command,
            "store": self.store,
            "summary": summary,
            "findings": [f.to_json() for f in self.findings],
        }
        if self.actions:
            doc["actions"] = [
                {**a, **path_fields(a["path"])} if a.get("path") else a for a in self.actions
            ]
        return doc


def exit_code_for(findings: Iterable[Finding]) -> int:
    """2 if any error finding, 1 if any warning, else 0; info findings never fail a job."""
    worst = EXIT_CLEAN
    for f in findings:
        if f.severity is Severity.ERROR:
            return EXIT_ERRORS
        if f.severity is Severity.WARNING:
            worst = EXIT_WARNINGS
    return worst


def utf8_safe(value: Any) -> Any:
    """Make every string valid UTF-8 for JSON: undecodable bytes become `\\xNN` escapes.

    Paths carry their exact bytes in `path_b64`; ids and details from a damaged DB just need
    to stay printable and parseable.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value).decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [utf8_safe(v) for v in value]
    return value


def write_json(report: Report, out: TextIO) -> None:
    """Write the JSON document, one finding at a time (no second copy of a huge report)."""
    doc = report.to_json()
    findings = doc.pop("findings")
    actions = doc.pop("actions", None)
    head = json.dumps(utf8_safe(doc), indent=2, ensure_ascii=False)
    out.write(head[:-2] + ',\n  "findings": [')
    for i, finding in enumerate(findings):
        out.write(("," if i else "") + "\n    ")
        out.write(json.dumps(utf8_safe(finding), ensure_ascii=False))
    out.write("\n  ]" if findings else "]")
    if actions is not None:
        out.write(',\n  "actions": [')
        out.write(
            ",".join("\n    " + json.dumps(utf8_safe(a), ensure_ascii=False) for a in actions)
        )
        out.write("\n  ]")
    out.write("\n}\n")


def render_json(report: Report) -> str:
    buf = io.StringIO()
    write_json(report, buf)
    return buf.getvalue()


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def printable(text: str) -> str:
    """For a terminal: control characters (ESC, newlines) from names shown as `\\xNN`."""
    return utf8_safe(text).translate(_CONTROL)


_COLOURS = {Severity.ERROR: "31", Severity.WARNING: "33", Severity.INFO: "36"}


def _paint(text: str, severity: Severity, colour: bool) -> str:
    return f"\x1b[{_COLOURS[severity]}m{text}\x1b[0m" if colour else text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_LABELS = {
    "duration_s": ("duration", lambda v: f"{v:.2f}s"),
    "hash_rate_mib_s": ("hash rate", lambda v: f"{v:.0f} MiB/s"),
    "min_age_s": ("grace period (--min-age)", lambda v: human_duration(v)),
    "runs": ("runs", lambda v: ", ".join(v)),
}


def _label(key: str) -> str:
    return _LABELS[key][0] if key in _LABELS else key.replace("_", " ")


def _stat_value(key: str, value: Any) -> str:
    if key in _LABELS:
        return _LABELS[key][1](value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if (key.endswith("bytes") or key.startswith("bytes_")) and isinstance(value, int):
        return f"{human_bytes(value)} ({value} bytes)" if value >= 1024 else f"{value} bytes"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def human_duration(seconds: float) -> str:
    """Two units at most: 45s, 12m30s, 5h2m, 3d2h."""
    seconds = int(seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (name, size) in enumerate(units[:-1]):
        if seconds >= size:
            sub_name, sub_size = units[i + 1]
            return f"{seconds // size}{name}{(seconds % size) // sub_size}{sub_name}"
    return f"{seconds}s"


def _file_facts(extra: Mapping[str, Any]) -> str:
    facts = [
        human_bytes(extra.get("size", 0)),
        f"modified {extra.get('mtime')}",
        f"age {human_duration(extra.get('age_s', 0))}",
    ]
    if extra.get("cause"):
        facts.append(f"cause {extra['cause']}")
    facts.append(f"run status {extra.get('run_status') or 'unknown'}")
    if extra.get("file_type") not in (None, "file"):
        facts.append(f"type {extra['file_type']}")
    return ", ".join(facts)


def render_text(report: Report, *, colour: bool = False, max_per_kind: int | None = None) -> str:
    """A readable summary, then the findings grouped by kind, worst first."""
    lines: list[str] = []
    store = report.store
    lines.append(f"{report.command}: {store.get('db')}")
    lines.append(f"  artifacts: {store.get('artifact_dir')}")
    for key, value in report.stats.items():
        if key == "hash_rate_mib_s" and not report.stats.get("bytes_hashed"):
            continue
        lines.append(f"  {_label(key)}: {_stat_value(key, value)}")
    if report.actions:
        lines.append(f"  actions: {_stat_value('actions', report.action_counts())}")
    sev = report.severity_counts()
    lines.append(
        f"  findings: {sev['error']} error(s), {sev['warning']} warning(s), {sev['info']} info"
    )
    by_kind: dict[str, list[Finding]] = {}
    for f in report.findings:
        by_kind.setdefault(f.kind, []).append(f)
    for kind in KIND_ORDER:
        group = by_kind.get(kind)
        if not group:
            continue
        severity = SEVERITY[kind]
        lines.append("")
        lines.append(_paint(f"{kind} ({severity}): {len(group)}", severity, colour))
        shown = group if max_per_kind is None else group[:max_per_kind]
        for f in shown:
            if f.path is None:  # registry findings: the detail names what is wrong
                lines.append(f"  {printable(f.detail)}")
                continue
            ident = f"  (artifact {f.artifact_id})" if f.artifact_id else ""
            lines.append(f"  {display_path(f.path)}{ident}")
            if f.detail:
                lines.append(f"      {printable(f.detail)}")
            if "age_s" in f.extra:
                lines.append("      " + _file_facts(f.extra))
        if len(shown) < len(group):
            lines.append(f"  ... and {len(group) - len(shown)} more (use --json for all)")
    if report.actions:
        lines.append("")
    for action in report.actions:
        target = f" -> {action['to']}" if action.get("to") else ""
        reason = f" ({action['reason']})" if action.get("reason") else ""
        lines.append(f"{action['action']}: {display_path(action['path'])}{target}{reason}")
    if not report.findings:
        lines.append("")
        lines.append("No problems found.")
    return "\n".join(lines) + "\n"
