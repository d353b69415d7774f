"""The backup archive format: names, manifest, SHA256SUMS, and one streaming read that judges it.

Writers live in backup.py; this module knows what a finished archive looks like and how to
read one exactly once (hashing every member as it streams by) and turn what it saw into findings.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import errno
import hashlib
import json
import os
import re
import secrets
import stat
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
from chachaml_ops.state import store_key
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
# chachaml-mystore-0a1b2c3d-20261203T160000Z-1a2b3c4d.tar.zst: the DB file's stem and the first
# 8 hex of state.store_key(db) say which store it is (several stores may share one --out), then
# a UTC second plus 32 random bits, so backups in the same second never collide.
_STORE_PART = r"(?P<stem>[A-Za-z0-9_]{1,32})-(?P<key>[0-9a-f]{8})"
_TIME_PART = r"(?P<stamp>\d{8}T\d{6}Z)-(?P<rand>[0-9a-f]{8})"
ARCHIVE_RE = re.compile(rf"^chachaml-{_STORE_PART}-{_TIME_PART}\.tar(?:\.gz|\.zst)?$")
# Names of the first release (no store id): still recognised as ours by verify-backup, but never
# touched by retention, which cannot tell which store they belong to.
LEGACY_ARCHIVE_RE = re.compile(r"^chachaml-\d{8}T\d{6}Z-[0-9a-f]{8}\.tar(?:\.gz|\.zst)?$")
# In-progress files: the archive being written, the DB snapshot beside it, and the sidecars
# SQLite may leave beside that snapshot when the process is killed mid-copy.
# The first release's partials (no store id) are still ours to clean up.
PARTIAL_RE = re.compile(
    rf"^chachaml-(?:{_STORE_PART}-)?{_TIME_PART}"
    r"\.(?:tar(?:\.gz|\.zst)?|db)\.partial(?:-wal|-shm|-journal)?$"
)
# Caps on what is held in memory: a manifest lists ~200 bytes per member, so 64 MiB covers
# ~300k members; anything bigger is refused rather than read.
MAX_META_BYTES = 64 << 20

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class NotOurArchive(OpsError):
    """Not a chachaml-ops archive, or unreadable from the start (exit 3)."""


class LocalWriteFailed(OpsError):
    """Writing on this machine failed (full disk, quota, read-only): not the archive's fault."""


def store_id(db: Path) -> str:
    """`<stem>-<key8>`: the DB file's stem (made name-safe) and 8 hex of its store key."""
    # Both parts from the resolved path: a symlinked --db names the same store the same way.
    real = os.path.realpath(os.fspath(db))
    stem = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(real).split(".")[0])[:32] or "db"
    return f"{stem}-{store_key(db)[:8]}"


def new_archive_name(now: float, compression: str, store: str) -> str:
    stamp = time.strftime(_STAMP, time.gmtime(now))
    return f"chachaml-{store}-{stamp}-{secrets.token_hex(4)}{COMPRESSION_SUFFIX[compression]}"


def archive_time(name: str) -> float | None:
    """The UTC time in one of our archive names, or None when the name is not ours."""
    m = ARCHIVE_RE.match(name)
    if not m:
        return None
    return float(calendar.timegm(time.strptime(m.group("stamp"), _STAMP)))


def archive_store(name: str) -> str | None:
    """The `<stem>-<key8>` store id in one of our archive names, or None."""
    m = ARCHIVE_RE.match(name)
    return f"{m.group('stem')}-{m.group('key')}" if m else None


def named_like_ours(name: str) -> bool:
    return bool(ARCHIVE_RE.match(name) or LEGACY_ARCHIVE_RE.match(name))


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
            bad.append(line[:200].decode("utf-8", "backslashreplace"))
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


def restorable_relpath(member: tarfile.TarInfo) -> tuple[str | None, str | None]:
    """(relpath under the artifact dir, why it is refused) for an artifact or orphan member.

    The one judgement verify-backup and restore share: a path that fails here is a finding in
    both, and restore never writes it.
    """
    name = member.name
    rel = (
        name[len(ARTIFACT_PREFIX) :]
        if name.startswith(ARTIFACT_PREFIX)
        else name[len(ORPHAN_PREFIX) :]
    )
    try:
        rel = resolve_stored_path(rel)
        if ARTIFACT_PREFIX + rel != name and ORPHAN_PREFIX + rel != name:
            raise UnsafePath(f"path is not in normal form (would be written as {rel!r})")
        # The second gate: tarfile's own extraction policy for untrusted archives.
        tarfile.data_filter(member, "/nonexistent-restore-root")
    except (UnsafePath, tarfile.FilterError) as exc:
        return None, str(exc)
    return rel, None


class MemberSink(Protocol):
    """Where the bytes of one member go while they are hashed: a file, or nowhere."""

    def write(self, data: bytes) -> Any: ...

    def close(self) -> None: ...


SinkFactory = Callable[[str, str, tarfile.TarInfo], MemberSink | None]


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
    # Set when an archive that is ours by name or structure cannot be read from its start.
    start_damage: str | None = None
    # Artifact/orphan relpaths seen as files and as folders: a path cannot be both.
    _files: dict[str, str] = field(default_factory=dict)
    _folders: dict[str, str] = field(default_factory=dict)


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


def open_archive(archive: Path) -> int:
    """An fd on the archive, which must be a regular file (never blocks on a FIFO)."""
    try:
        fd = os.open(archive, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise NotOurArchive(
            f"cannot open {archive}: {exc.strerror}", "check the path and its permissions"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotOurArchive(
            f"{archive} is not a regular file", "pass a chachaml-*.tar[.zst|.gz] file"
        )
    os.set_blocking(fd, True)
    return fd


def scan_archive(
    archive: Path, spool_dir: Path, sink_for: SinkFactory | None = None, *, fd: int | None = None
) -> ArchiveScan:
    """Read the archive once: hash every member; spool the DB member into `spool_dir`.

    Raises NotOurArchive when the file cannot be opened or is clearly not ours (neither our
    name nor a recognisable tar/zstd/gzip start); an archive of ours that is damaged from its
    start gets `start_damage`, a read error further on `stream_error`. `fd`: an fd from
    open_archive to read from its start (the caller keeps it open).
    """
    own = fd is None
    if fd is None:
        fd = open_archive(archive)
    os.lseek(fd, 0, os.SEEK_SET)
    fh = os.fdopen(os.dup(fd), "rb")
    try:
        head = fh.read(512)
        fh.seek(0)
        compression = detect_compression(head)
        scan = ArchiveScan(Path(archive), compression)
        recognisable = (
            named_like_ours(Path(archive).name)
            or compression != "none"
            or head[257:262] == b"ustar"
        )
        try:
            tar = tarfile.open(  # noqa: SIM115 -- entered with `with` just below
                fileobj=_open_stream(fh, compression),
                mode="r|",
                encoding="utf-8",
                errors="surrogateescape",
            )
        except _STREAM_ERRORS as exc:
            if not recognisable:
                raise NotOurArchive(
                    f"{archive} is not a tar archive"
                    + (f" ({compression} stream)" if compression != "none" else "")
                    + f": {exc}",
                    "pass a chachaml-*.tar[.zst|.gz] written by chachaml-ops backup",
                ) from None
            scan.start_damage = f"its first header cannot be read ({exc or type(exc).__name__})"
            return scan
        with tar:
            _read_members(tar, scan, spool_dir, sink_for, recognisable)
        return scan
    finally:
        fh.close()
        if own:
            os.close(fd)


def _read_members(
    tar: tarfile.TarFile,
    scan: ArchiveScan,
    spool_dir: Path,
    sink_for: SinkFactory | None,
    recognisable: bool,
) -> None:
    first = True
    ours_by_name = named_like_ours(scan.archive.name)
    while True:
        try:
            info = tar.next()
        except _STREAM_ERRORS as exc:
            if first:
                if not recognisable:
                    raise NotOurArchive(f"{scan.archive} is unreadable: {exc}") from None
                scan.start_damage = f"its first header cannot be read ({exc or type(exc).__name__})"
                return
            scan.stream_error = str(exc) or type(exc).__name__
            return
        if info is None:
            if first:
                # A valid but empty tar: nothing of ours in it.
                _not_ours(scan, ours_by_name, "it holds no members")
            return
        tar.members.clear()  # tarfile keeps every header otherwise; memory must not grow
        name = info.name
        if first:
            first = False
            if name != DB_MEMBER:
                _not_ours(scan, ours_by_name, f"its first member is {name!r}, not {DB_MEMBER!r}")
                return
            if not info.isreg():
                kind = "a directory" if info.isdir() else "not a regular file"
                _not_ours(scan, ours_by_name, f"its first member {DB_MEMBER!r} is {kind}")
                return
        reason = unsafe_member_reason(info)
        if reason is not None:
            scan.findings.append(
                Finding("unsafe_path", name, f"archive member is {reason}; never written")
            )
            continue
        if info.isdir():
            continue
        if name in scan.seen:
            # Which copy would a reader trust? Neither: a forged first copy must never pass.
            scan.findings.append(
                Finding("unsafe_path", name, "member appears twice in the tar; never written")
            )
            _skip(tar, info, scan)
            continue
        rel: str | None = None
        if name.startswith((ARTIFACT_PREFIX, ORPHAN_PREFIX)):
            rel, why = restorable_relpath(info)
            if rel is None or (why := _conflict(scan, name, rel)) is not None:
                scan.findings.append(Finding("unsafe_path", name, f"refused: {why}; never written"))
                _skip(tar, info, scan)
                continue
        try:
            member = _read_one(tar, info, rel, scan, spool_dir, sink_for)
        except _STREAM_ERRORS as exc:
            scan.stream_error = f"while reading {name}: {exc}"
            return
        scan.seen[name] = member
        scan.order.append(name)


def _not_ours(scan: ArchiveScan, ours_by_name: bool, why: str) -> None:
    if not ours_by_name:
        raise NotOurArchive(
            f"{scan.archive} is not a chachaml-ops archive ({why})",
            "pass a chachaml-*.tar[.zst|.gz] written by chachaml-ops backup",
        )
    scan.start_damage = why


def _conflict(scan: ArchiveScan, name: str, rel: str) -> str | None:
    """A file path that is also a folder of another member (r/a then r/a/b): never both."""
    top = name[: len(name) - len(rel)]  # which tree: artifacts and orphans restore apart
    key = top + rel
    if key in scan._folders:
        return f"{rel!r} is also a folder of member {scan._folders[key]!r}"
    parts = rel.split("/")
    for i in range(1, len(parts)):
        folder = top + "/".join(parts[:i])
        if folder in scan._files:
            other = scan._files[folder]
            return f"its folder {'/'.join(parts[:i])!r} is also the file member {other!r}"
    for i in range(1, len(parts)):
        scan._folders.setdefault(top + "/".join(parts[:i]), name)
    scan._files[key] = name
    return None


def _skip(tar: tarfile.TarFile, info: tarfile.TarInfo, scan: ArchiveScan) -> None:
    """Read past a refused member's bytes (tarfile would too), counting them."""
    try:
        src = tar.extractfile(info)
        while src is not None and (chunk := src.read(CHUNK)):
            scan.bytes_read += len(chunk)
    except _STREAM_ERRORS as exc:
        scan.stream_error = f"while reading {info.name}: {exc}"


def _role(name: str) -> str:
    if name == DB_MEMBER:
        return "db"
    if name.startswith(ARTIFACT_PREFIX):
        return "artifact"
    if name.startswith(ORPHAN_PREFIX):
        return "orphan"
    return "meta"


class FileSink:
    """One member's bytes to a new private file: O_EXCL|O_NOFOLLOW, fsynced on close, its
    mtime kept when given. The DB spool (0600) and restored files (0640) both use it."""

    def __init__(self, path: Path, mode: int = 0o600, mtime: float | None = None) -> None:
        self.path = path
        self.mtime = mtime
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(path, flags, mode)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        try:
            os.fsync(self.fd)
            if self.mtime is not None:
                os.utime(self.fd, (self.mtime, self.mtime))
        finally:
            os.close(self.fd)


def _local_error(exc: OSError, where: object) -> LocalWriteFailed:
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return LocalWriteFailed(
        f"cannot write {where} on this machine: {reason}; nothing was restored or kept",
        "free space (TMPDIR for verify-backup, the target for restore); the archive itself "
        "was not judged",
    )


def _read_one(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    rel: str | None,
    scan: ArchiveScan,
    spool_dir: Path,
    sink_for: SinkFactory | None,
) -> Member:
    name = info.name
    keep = name in (MANIFEST, SUMS) and info.size <= MAX_META_BYTES
    if name in (MANIFEST, SUMS) and not keep:
        scan.findings.append(
            Finding(
                "unreadable",
                name,
                f"{info.size} bytes, over the {MAX_META_BYTES} byte cap; not read",
            )
        )
    sink: MemberSink | None = None
    held: list[bytes] = []
    try:
        if name == DB_MEMBER:
            scan.db_spool = Path(spool_dir) / f"spool-{secrets.token_hex(4)}.db"
            sink = FileSink(scan.db_spool)
        elif sink_for is not None and rel is not None:
            sink = sink_for(name, rel, info)
    except OSError as exc:
        raise _local_error(exc, scan.db_spool if name == DB_MEMBER else name) from None
    h = hashlib.sha256()
    size = 0
    src = tar.extractfile(info)
    assert src is not None
    try:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if sink is not None:
                try:
                    sink.write(chunk)
                except OSError as exc:
                    raise _local_error(exc, name) from None
            if keep:
                held.append(chunk)
    finally:
        if sink is not None:
            try:
                sink.close()
            except OSError as exc:
                raise _local_error(exc, name) from None
    scan.bytes_read += size
    if name == MANIFEST and keep:
        scan.manifest = b"".join(held)
    elif name == SUMS and keep:
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
    if scan.start_damage is not None:
        # Nothing past a broken start can be trusted or checked: one finding says it all.
        detail = f"archive is damaged: {scan.start_damage}"
        return Judgement([Finding("unreadable", None, detail)], 0, None)
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
    # A problem recorded at backup time is trusted only for a member whose bytes are exactly
    # the ones the manifest (and SHA256SUMS) list: tampered bytes never become "at backup".
    recorded = {
        path: f
        for path, f in recorded.items()
        if _recorded_matches(f, scan.seen.get(artifact_member(path)), listed, problems)
    }
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
        _check_manifest_shape(doc)
        listed = {
            manifest_member_name(m): Member(
                manifest_member_name(m), m["size"], m["sha256"], m["role"]
            )
            for m in doc["members"]
        }
        if len(listed) != len(doc["members"]):
            raise ValueError("members lists a path twice")
        recorded = {manifest_member_name(f): f for f in doc["findings"] if f.get("path")}
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        findings.append(Finding("unreadable", MANIFEST, f"manifest is not valid: {exc}"))
        return None, {}, {}
    return doc, listed, recorded


_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_manifest_shape(doc: Any) -> None:
    """Every field a reader uses has the type the format says (ValueError naming the first
    that does not): a forged or truncated manifest is a finding, never a traceback."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(isinstance(doc, dict), "not a JSON object")
    need(doc.get("format") == FORMAT, f"format is {doc.get('format')!r}")
    need(
        doc.get("format_version") == FORMAT_VERSION,
        f"format_version {doc.get('format_version')!r} is not understood",
    )
    for key in ("created", "compression", "tool_version", "sqlite_version"):
        need(isinstance(doc.get(key), str), f"{key!r} is not a string")
    need(type(doc.get("rows")) is int and doc["rows"] >= 0, "'rows' is not a count")
    source = doc.get("source")
    need(isinstance(source, dict), "'source' is not an object")
    for key in ("db", "artifact_dir"):
        need(isinstance(source.get(key), str), f"'source.{key}' is not a string")
    need(isinstance(doc.get("members"), list), "'members' is not a list")
    need(isinstance(doc.get("findings"), list), "'findings' is not a list")
    for i, m in enumerate(doc["members"]):
        need(isinstance(m, dict), f"members[{i}] is not an object")
        need(
            isinstance(m.get("path_b64", m.get("path")), str),
            f"members[{i}] has no string path",
        )
        need(type(m.get("size")) is int and m["size"] >= 0, f"members[{i}].size is not a size")
        need(
            isinstance(m.get("sha256"), str) and bool(_SHA_RE.match(m["sha256"])),
            f"members[{i}].sha256 is not a SHA-256",
        )
        need(m.get("role") in ("db", "artifact", "orphan"), f"members[{i}].role is not known")
    for i, f in enumerate(doc["findings"]):
        need(isinstance(f, dict), f"findings[{i}] is not an object")
        path = f.get("path_b64", f.get("path"))
        need(path is None or isinstance(path, str), f"findings[{i}].path is not a string")
        for key in ("kind", "severity"):
            need(isinstance(f.get(key), str), f"findings[{i}].{key} is not a string")


def _recorded_matches(
    recorded: dict[str, Any],
    got: Member | None,
    listed: dict[str, Member],
    problems: dict[str, list[str]],
) -> bool:
    """A backup-time finding is believed only when the archive agrees with what it says."""
    if got is None:
        # Recorded as not archived: then the manifest must not list it either.
        return recorded.get("kind") in ("missing", "not_a_file", "unreadable") and (
            artifact_member(manifest_member_name(recorded)) not in listed
        )
    entry = listed.get(got.path)
    if entry is None or got.path in problems or entry.sha256 != got.sha256:
        return False
    actual = recorded.get("actual_sha256")
    return actual is None or actual == got.sha256


def _load_sums(scan: ArchiveScan, findings: list[Finding]) -> dict[str, str] | None:
    if scan.sums is None:
        findings.append(Finding("missing", SUMS, "the archive has no SHA256SUMS"))
        return None
    sums, bad = parse_sums(scan.sums)
    # A garbage SHA256SUMS is one problem, not millions of findings: show the first few.
    for line in bad[:_MAX_BAD_LINES]:
        findings.append(Finding("unreadable", SUMS, f"line is not 'SHA256  NAME': {line[:80]}"))
    if len(bad) > _MAX_BAD_LINES:
        more = len(bad) - _MAX_BAD_LINES
        findings.append(Finding("unreadable", SUMS, f"and {more} more lines that do not parse"))
    return sums


_MAX_BAD_LINES = 20


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
    except UnsafePath as exc:
        # Never read at backup time either: the snapshot's own row shows it, so it is the
        # store's problem, repeated like the others it had then.
        return Finding(
            "unsafe_path",
            row.path,
            f"{exc}; never read at backup time (a problem of the store)",
            row.id,
            row.run_id,
            {"stored_path": row.path, "at_backup": True},
        )
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
