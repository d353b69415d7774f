"""The backup archive format: names, manifest, SHA256SUMS, and one streaming read that judges it.

Writers live in backup.py; this module knows what a finished archive looks like and how to
read one exactly once (hashing every member as it streams by) and turn what it saw into findings.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
import os
import re
import secrets
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from chachaml_ops.errors import OpsError
from chachaml_ops.layout import UnsafePath, is_object_key, resolve_stored_path
from chachaml_ops.report import Finding, path_fields
from chachaml_ops.store import Store

FORMAT = "chachaml-ops-backup"
FORMAT_VERSION = 1
DB_MEMBER = "chachaml.db"
ARTIFACT_PREFIX = "chachaml-artifacts/"
ORPHAN_PREFIX = "orphans/"
MANIFEST = "MANIFEST.json"
SUMS = "SHA256SUMS"
CHUNK = 1 << 20

COMPRESSION_SUFFIX = {"none": ".tar", "gzip": ".tar.gz", "zstd": ".tar.zst"}
_STAMP = "%Y%m%dT%H%M%SZ"
# chachaml-20261203T160000Z-1a2b3c4d.tar.zst: a UTC second plus 32 random bits, so several
# backups in the same second never collide, and the name alone says when it was taken.
ARCHIVE_RE = re.compile(r"^chachaml-(\d{8}T\d{6}Z)-([0-9a-f]{8})\.tar(?:\.gz|\.zst)?$")
# In-progress files: the archive being written and the DB snapshot beside it.
PARTIAL_RE = re.compile(r"^chachaml-\d{8}T\d{6}Z-[0-9a-f]{8}\.(?:tar(?:\.gz|\.zst)?|db)\.partial$")

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class NotOurArchive(OpsError):
    """Not a chachaml-ops archive, or unreadable from the start (exit 3)."""


def new_archive_name(now: float, compression: str) -> str:
    stamp = time.strftime(_STAMP, time.gmtime(now))
    return f"chachaml-{stamp}-{secrets.token_hex(4)}{COMPRESSION_SUFFIX[compression]}"


def archive_time(name: str) -> float | None:
    """The UTC time in one of our archive names, or None when the name is not ours."""
    m = ARCHIVE_RE.match(name)
    if not m:
        return None
    return float(calendar.timegm(time.strptime(m.group(1), _STAMP)))


def artifact_member(relpath: str) -> str:
    return ARTIFACT_PREFIX + relpath


# -- SHA256SUMS -----------------------------------------------------------------------------


def sums_line(sha256: str, name: str) -> bytes:
    """One `sha256sum` line; names with a backslash or newline use its escaped form."""
    raw = os.fsencode(name)
    if any(c in raw for c in (b"\\", b"\n", b"\r")):
        escaped = raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + sha256.encode() + b"  " + escaped + b"\n"
    return sha256.encode() + b"  " + raw + b"\n"


def parse_sums(data: bytes) -> tuple[dict[str, str], list[str]]:
    """({member name: sha256}, lines that could not be parsed)."""
    out: dict[str, str] = {}
    bad: list[str] = []
    for line in data.split(b"\n"):
        if not line:
            continue
        escaped = line.startswith(b"\\")
        body = line[1:] if escaped else line
        m = re.fullmatch(rb"([0-9a-f]{64}) [ *](.+)", body, re.DOTALL)
        if not m:
            bad.append(line.decode("utf-8", "backslashreplace"))
            continue
        name = m.group(2)
        if escaped:
            name = re.sub(
                rb"\\(.)", lambda g: {b"n": b"\n", b"r": b"\r"}.get(g.group(1), g.group(1)), name
            )
        out[os.fsdecode(name)] = m.group(1).decode()
    return out, bad


# -- manifest -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One archived file: its name in the tar, length and SHA-256 of the bytes archived."""

    path: str
    size: int
    sha256: str
    role: str  # db | artifact | orphan

    def to_json(self) -> dict[str, Any]:
        return {
            **path_fields(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "role": self.role,
        }


def manifest_member_name(doc: dict[str, Any]) -> str:
    if "path_b64" in doc:
        return os.fsdecode(base64.b64decode(doc["path_b64"]))
    return str(doc["path"])


def build_manifest(
    *,
    tool_version: str,
    created: str,
    db: Path,
    artifact_dir: Path,
    sqlite_version: str,
    rows: int,
    compression: str,
    members: list[Member],
    findings: list[Finding],
) -> bytes:
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": "chachaml-ops",
        "tool_version": tool_version,
        "created": created,
        "source": {
            "db": os.fsdecode(os.path.abspath(db)),
            "artifact_dir": os.fsdecode(os.path.abspath(artifact_dir)),
        },
        "sqlite_version": sqlite_version,
        "rows": rows,
        "compression": compression,
        "members": [m.to_json() for m in members],
        "findings": [f.to_json() for f in findings],
    }
    return json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8", "surrogateescape")


# -- reading --------------------------------------------------------------------------------


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why a member must never be written (our own check, before tarfile's data filter)."""
    name = member.name
    if not (member.isreg() or member.isdir()):
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special"
        return f"a {kind} entry"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if "\x00" in name:
        return "path contains a NUL byte"
    if ".." in name.split("/"):
        return "path has a '..' segment"
    return None


class MemberSink(Protocol):
    """Where the bytes of one member go while they are hashed: a file, or nowhere."""

    def write(self, data: bytes) -> Any: ...

    def close(self) -> None: ...


SinkFactory = Callable[[str, tarfile.TarInfo], MemberSink | None]


@dataclass
class ArchiveScan:
    """What one pass over an archive saw."""

    archive: Path
    compression: str
    seen: dict[str, Member] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    manifest: bytes | None = None
    sums: bytes | None = None
    db_spool: Path | None = None
    findings: list[Finding] = field(default_factory=list)
    stream_error: str | None = None
    bytes_read: int = 0


def detect_compression(head: bytes) -> str:
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    return "none"


def _open_stream(fh: BinaryIO, compression: str) -> BinaryIO:
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(fh, read_size=CHUNK)  # type: ignore[return-value]
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    return fh


_STREAM_ERRORS = (tarfile.TarError, zstandard.ZstdError, zlib.error, EOFError, OSError)


def scan_archive(
    archive: Path, spool_dir: Path, sink_for: SinkFactory | None = None
) -> ArchiveScan:
    """Read the archive once: hash every member; spool the DB member into `spool_dir`.

    Raises NotOurArchive when the file cannot be opened or does not start with our DB member;
    a read error further on is recorded as `stream_error` (the archive is ours but damaged).
    """
    try:
        fh = open(archive, "rb")  # noqa: SIM115 -- closed in the finally below
    except OSError as exc:
        raise NotOurArchive(f"cannot open {archive}: {exc.strerror}") from None
    try:
        compression = detect_compression(fh.read(4))
        fh.seek(0)
        scan = ArchiveScan(Path(archive), compression)
        try:
            tar = tarfile.open(  # noqa: SIM115 -- entered with `with` just below
                fileobj=_open_stream(fh, compression),
                mode="r|",
                encoding="utf-8",
                errors="surrogateescape",
            )
        except _STREAM_ERRORS as exc:
            raise NotOurArchive(
                f"{archive} is not a tar archive ({compression}): {exc}",
                "pass a chachaml-*.tar[.zst|.gz] written by chachaml-ops backup",
            ) from None
        with tar:
            _read_members(tar, scan, spool_dir, sink_for)
        return scan
    finally:
        fh.close()


def _read_members(
    tar: tarfile.TarFile, scan: ArchiveScan, spool_dir: Path, sink_for: SinkFactory | None
) -> None:
    first = True
    while True:
        try:
            info = tar.next()
        except _STREAM_ERRORS as exc:
            if first:
                raise NotOurArchive(f"{scan.archive} is unreadable: {exc}") from None
            scan.stream_error = str(exc) or type(exc).__name__
            return
        if info is None:
            return
        tar.members.clear()  # tarfile keeps every header otherwise; memory must not grow
        name = info.name
        if first:
            if name != DB_MEMBER or not info.isreg():
                raise NotOurArchive(
                    f"{scan.archive} is not a chachaml-ops archive "
                    f"(first member is {name!r}, expected {DB_MEMBER!r})"
                )
            first = False
        reason = unsafe_member_reason(info)
        if reason is not None:
            scan.findings.append(
                Finding("unsafe_path", name, f"archive member is {reason}; never written")
            )
            continue
        if info.isdir():
            continue
        if name in scan.seen:
            scan.findings.append(Finding("unverifiable", name, "member appears twice in the tar"))
        try:
            member = _read_one(tar, info, scan, spool_dir, sink_for)
        except _STREAM_ERRORS as exc:
            scan.stream_error = f"while reading {name}: {exc}"
            return
        scan.seen[name] = member
        scan.order.append(name)


def _role(name: str) -> str:
    if name == DB_MEMBER:
        return "db"
    if name.startswith(ARTIFACT_PREFIX):
        return "artifact"
    if name.startswith(ORPHAN_PREFIX):
        return "orphan"
    return "meta"


def _read_one(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    scan: ArchiveScan,
    spool_dir: Path,
    sink_for: SinkFactory | None,
) -> Member:
    name = info.name
    keep = name in (MANIFEST, SUMS)
    sink: MemberSink | None
    held: list[bytes] = []
    if name == DB_MEMBER and scan.db_spool is None:
        scan.db_spool = Path(spool_dir) / f"spool-{secrets.token_hex(4)}.db"
        sink = open(scan.db_spool, "wb")  # noqa: SIM115 -- closed below
    else:
        sink = sink_for(name, info) if sink_for else None
    h = hashlib.sha256()
    size = 0
    src = tar.extractfile(info)
    assert src is not None
    try:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
            if keep:
                held.append(chunk)
    finally:
        if sink is not None:
            sink.close()
    scan.bytes_read += size
    if name == MANIFEST:
        scan.manifest = b"".join(held)
    elif name == SUMS:
        scan.sums = b"".join(held)
    return Member(name, size, h.hexdigest(), _role(name))


# -- judging --------------------------------------------------------------------------------


@dataclass
class Judgement:
    findings: list[Finding]
    rows: int = 0
    manifest: dict[str, Any] | None = None

    @property
    def damaged(self) -> bool:
        """True when an error is not merely a problem the source store already had."""
        return any(f.severity == "error" and not f.extra.get("at_backup") for f in self.findings)


def judge(scan: ArchiveScan) -> Judgement:
    """Every problem with the archive, one finding per member (never stopping at the first)."""
    findings = list(scan.findings)
    if scan.stream_error is not None:
        findings.append(
            Finding("unreadable", None, f"archive stream is damaged: {scan.stream_error}")
        )
    manifest, listed, recorded = _load_manifest(scan, findings)
    sums = _load_sums(scan, findings)
    # Per member: which references disagree with the bytes actually read.
    problems: dict[str, list[str]] = {}
    expected: dict[str, str] = {}
    for name, member in listed.items():
        got = scan.seen.get(name)
        if got is None:
            findings.append(Finding("missing", name, f"listed in {MANIFEST}, not in the archive"))
            continue
        if got.size != member.size or got.sha256 != member.sha256:
            problems.setdefault(name, []).append(MANIFEST)
            expected[name] = member.sha256
    for name, sha in (sums or {}).items():
        got = scan.seen.get(name)
        if got is None:
            if name not in listed:
                findings.append(Finding("missing", name, f"listed in {SUMS}, not in the archive"))
            continue
        if got.sha256 != sha:
            problems.setdefault(name, []).append(SUMS)
            expected.setdefault(name, sha)
    for name in scan.order:
        if name == SUMS:
            continue
        if manifest is not None and name != MANIFEST and name not in listed:
            findings.append(Finding("unverifiable", name, f"member not listed in {MANIFEST}"))
        elif sums is not None and name not in sums:
            findings.append(Finding("unverifiable", name, f"member not listed in {SUMS}"))
    for name, refs in problems.items():
        got = scan.seen[name]
        findings.append(
            Finding(
                "hash_mismatch",
                name,
                f"bytes in the archive differ from {' and '.join(refs)} (damaged archive)",
                extra={"expected_sha256": expected[name], "actual_sha256": got.sha256},
            )
        )
    rows = _judge_snapshot(scan, findings, recorded, damaged=set(problems))
    return Judgement(findings, rows, manifest)


def _load_manifest(
    scan: ArchiveScan, findings: list[Finding]
) -> tuple[dict[str, Any] | None, dict[str, Member], dict[str, dict[str, Any]]]:
    if scan.manifest is None:
        findings.append(Finding("missing", MANIFEST, "the archive has no manifest"))
        return None, {}, {}
    try:
        doc = json.loads(scan.manifest.decode("utf-8", "surrogateescape"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')} is not understood")
        listed = {
            manifest_member_name(m): Member(
                manifest_member_name(m), int(m["size"]), str(m["sha256"]), str(m["role"])
            )
            for m in doc["members"]
        }
        recorded = {manifest_member_name(f): f for f in doc.get("findings", []) if f.get("path")}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        findings.append(Finding("unreadable", MANIFEST, f"manifest is not valid: {exc}"))
        return None, {}, {}
    return doc, listed, recorded


def _load_sums(scan: ArchiveScan, findings: list[Finding]) -> dict[str, str] | None:
    if scan.sums is None:
        findings.append(Finding("missing", SUMS, "the archive has no SHA256SUMS"))
        return None
    sums, bad = parse_sums(scan.sums)
    for line in bad:
        findings.append(Finding("unreadable", SUMS, f"line is not 'SHA256  NAME': {line[:80]}"))
    return sums


def _judge_snapshot(
    scan: ArchiveScan,
    findings: list[Finding],
    recorded: dict[str, dict[str, Any]],
    damaged: set[str],
) -> int:
    """The DB member passes integrity_check and each of its rows has its bytes in the archive."""
    if scan.db_spool is None:
        findings.append(Finding("missing", DB_MEMBER, "the archive has no DB snapshot"))
        return 0
    try:
        with Store(scan.db_spool) as snap:
            problems = snap.integrity_check()
            if problems:
                findings.append(
                    Finding(
                        "db_corrupt",
                        DB_MEMBER,
                        "PRAGMA integrity_check: " + "; ".join(problems[:5]),
                        extra={"integrity_check": problems[:100]},
                    )
                )
                return 0
            rows = 0
            for row in snap.iter_artifacts():
                rows += 1
                finding = _judge_row(row, scan, recorded, damaged)
                if finding is not None:
                    findings.append(finding)
            return rows
    except OpsError as exc:
        findings.append(Finding("db_corrupt", DB_MEMBER, f"DB snapshot unusable: {exc}"))
        return 0


def _judge_row(row, scan: ArchiveScan, recorded, damaged: set[str]) -> Finding | None:
    if is_object_key(row.path, row.run_id, row.name):
        return None  # S3 bytes were never on disk; the backup recorded that
    try:
        relpath = resolve_stored_path(row.path)
    except UnsafePath:
        return None  # never read at backup time; recorded there as unsafe_path
    name = artifact_member(relpath)
    at_backup = recorded.get(relpath)
    extra: dict[str, Any] = {"member": name}
    if at_backup is not None and at_backup.get("severity") == "error":
        extra["at_backup"] = True
        note = f" (recorded at backup time: {at_backup.get('kind')})"
    else:
        note = ""
    got = scan.seen.get(name)
    if got is None:
        return Finding(
            "missing",
            relpath,
            "artifact row has no member in the archive" + note,
            row.id,
            row.run_id,
            extra,
        )
    if name in damaged:
        return None  # already reported once as damage
    if row.hash is not None and got.sha256 != row.hash:
        return Finding(
            "hash_mismatch",
            relpath,
            "archived bytes differ from the row's SHA-256" + note,
            row.id,
            row.run_id,
            {**extra, "expected_sha256": row.hash, "actual_sha256": got.sha256},
        )
    return None
