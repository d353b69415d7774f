"""The daemon's TOML config: find it, read it, and validate every key into frozen values.

Validation never stops at the first problem: every unknown key and bad value is collected with
its key path and a hint, and reported together (borgmatic's habit), so one edit fixes them all.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chachaml_ops.errors import OpsError, UsageError
from chachaml_ops.layout import derive_artifact_dir
from chachaml_ops.report import human_bytes, human_duration
from chachaml_ops.state import (
    CONFIG_ENV_VAR,
    SYSTEM_CONFIG,
    StateDirUnusable,
    default_state_dir,
    store_key,
)
from chachaml_ops.units import parse_duration, parse_size
from chachaml_ops.verify import Subset

ENV_VAR = CONFIG_ENV_VAR
SYSTEM_PATH = SYSTEM_CONFIG
TASKS = ("verify", "orphans", "backup")
COMPRESSIONS = ("zstd", "gzip", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
_STORE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" + (f"; {self.hint}" if self.hint else "")


class ConfigError(OpsError):
    """The config cannot be used; `problems` lists every reason, each with its key."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the config"]
        lines += [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


# -- cron --------------------------------------------------------------------------------

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


@dataclass(frozen=True)
class CronField:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_base: int = 0


_CRON_FIELDS = (
    CronField("minute", 0, 59),
    CronField("hour", 0, 23),
    CronField("day of month", 1, 31),
    CronField("month", 1, 12, tuple(_MONTHS), 1),
    CronField("day of week", 0, 7, tuple(_DAYS), 0),
)


@dataclass(frozen=True)
class CronSpec:
    """A parsed crontab line. Each field: the sorted allowed values, or None for `*`.

    Day of week uses crontab numbering (0 and 7 are Sunday, folded to 0); the daemon turns the
    values into names for APScheduler, whose own numbers start at Monday.
    """

    text: str
    minute: tuple[int, ...] | None
    hour: tuple[int, ...] | None
    day: tuple[int, ...] | None
    month: tuple[int, ...] | None
    day_of_week: tuple[int, ...] | None

    def __str__(self) -> str:
        return self.text


def _cron_value(text: str, spec: CronField) -> int:
    lowered = text.lower()
    if spec.names and lowered in spec.names:
        return spec.names.index(lowered) + spec.name_base
    if not text.isdigit():
        names = f" or a name ({spec.names[0]}..{spec.names[-1]})" if spec.names else ""
        raise ValueError(f"{spec.name}: {text!r} is not a number{names}")
    value = int(text)
    if not spec.low <= value <= spec.high:
        raise ValueError(f"{spec.name}: {value} is outside {spec.low}-{spec.high}")
    return value


def _cron_field(text: str, spec: CronField) -> tuple[int, ...] | None:
    if text == "*":
        return None
    values: set[int] = set()
    for part in text.split(","):
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{spec.name}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if rng == "*":
            first, last = spec.low, spec.high
        elif "-" in rng:
            a, _, b = rng.partition("-")
            first, last = _cron_value(a, spec), _cron_value(b, spec)
            if spec.names == tuple(_DAYS) and last == 0 and first > 0:
                last = 7  # "fri-sun": Sunday ends the week as 7
            if first > last:
                raise ValueError(f"{spec.name}: range {rng!r} runs backwards")
        else:
            first = _cron_value(rng, spec)
            last = spec.high if slash else first
        values.update(range(first, last + 1, step))
    if spec.names == tuple(_DAYS) and 7 in values:
        values.discard(7)
        values.add(0)
    return tuple(sorted(values))


def parse_cron(text: str) -> CronSpec:
    """Parse five crontab fields (names allowed); ValueError says which field is wrong."""
    if text.strip().startswith("@"):
        raise ValueError(
            f"{text.strip()!r}: cron macros (@daily, @hourly, ...) are not supported;"
            ' write five fields, e.g. "0 0 * * *" for @daily'
        )
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"{text!r} has {len(fields)} field(s), cron needs 5: minute hour day month weekday"
        )
    parsed = [_cron_field(f, spec) for f, spec in zip(fields, _CRON_FIELDS, strict=True)]
    if parsed[2] is not None and parsed[4] is not None:
        # Vixie cron runs when EITHER matches; APScheduler needs both. Refuse rather than
        # silently schedule something different from what the line means to an operator.
        raise ValueError(
            "restrict the day of month or the day of week, not both"
            " (cron would run when either matches)"
        )
    spec = CronSpec(" ".join(fields), *parsed)
    if not _fires(spec):
        raise ValueError(f"{spec.text!r} never fires (no such day in the months given)")
    return spec


_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February of a leap year


def _fires(spec: CronSpec) -> bool:
    """Whether the line has a fire time within 4 years (a leap year included): only a day of
    month that no listed month has (`0 0 31 2 *`) can make it never fire."""
    if spec.day is None:
        return True
    months = spec.month or range(1, 13)
    return any(min(spec.day) <= _DAYS_IN_MONTH[m - 1] for m in months)


# -- the config values -------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    name: str
    db: Path
    artifact_dir: Path

    @property
    def state_key(self) -> str:
        """The store's key in the job history: the same one CLI runs record, so a backup made
        by hand counts for the daemon's catch-up and shows in `status`."""
        return store_key(self.db)


@dataclass(frozen=True)
class VerifyConfig:
    schedule: CronSpec | None = None
    subset: Subset | None = None
    jobs: int | None = None  # None: the CPU count
    quick: bool = False
    drop_cache: bool = True  # a nightly full read should not evict the page cache
    min_age: float = 3600.0
    max_duration: float | None = None  # hashing budget per run, least recently verified first
    max_age: float | None = None  # skip files verified good this recently and unchanged since
    max_rate: int | None = None  # bytes/s ceiling on hashing reads


@dataclass(frozen=True)
class OrphansConfig:
    schedule: CronSpec | None = None
    min_age: float = 3600.0


@dataclass(frozen=True)
class BackupConfig:
    schedule: CronSpec | None = None
    dir: Path | None = None
    compression: str = "zstd"
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    textfile: Path | None = None


@dataclass(frozen=True)
class WatchConfig:
    enabled: bool = False
    debounce: float = 2.0  # wait this long after the last event before checking a file
    grace: float = 600.0  # a new file with no row after this long is reported as an orphan
    polling: bool = False  # force polling (network file systems without inotify)
    poll_interval: float = 10.0


@dataclass(frozen=True)
class AlertsConfig:
    ping_url: str | None = None
    webhook_url: str | None = None
    timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    source: Path
    stores: tuple[StoreConfig, ...]
    state_dir: Path
    timezone: str = "UTC"
    log_level: str = "info"
    lock_wait: float = 6 * 3600.0
    verify: VerifyConfig = VerifyConfig()
    orphans: OrphansConfig = OrphansConfig()
    backup: BackupConfig = BackupConfig()
    metrics: MetricsConfig = MetricsConfig()
    watch: WatchConfig = WatchConfig()
    alerts: AlertsConfig = AlertsConfig()

    def schedule(self, task: str) -> CronSpec | None:
        return getattr(self, task).schedule

    def store(self, name: str) -> StoreConfig:
        for s in self.stores:
            if s.name == name:
                return s
        raise KeyError(name)


# -- finding and reading -----------------------------------------------------------------


def find_config(explicit: Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """--config, then $CHACHAML_OPS_CONFIG, then /etc/chachaml-ops/config.toml."""
    if explicit is not None:
        return Path(explicit)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    if SYSTEM_PATH.exists():
        return SYSTEM_PATH
    raise UsageError(
        "no config file given",
        f"name the file (daemon --config FILE, config check FILE), set ${ENV_VAR},"
        f" or create {SYSTEM_PATH}",
    )


def load_config(path: Path) -> Config:
    """Read and validate; raises ConfigError listing every problem at once."""
    path = Path(path).absolute()  # status and daemon.json show where it really came from
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no config file at {path}", "check the path") from None
    except IsADirectoryError:
        raise UsageError(
            f"config {path} is a folder", "give the TOML file, e.g. /etc/chachaml-ops/config.toml"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot read config {path}: {exc.strerror}", "check its permissions"
        ) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path),
            [
                Problem(
                    "(file)",
                    f"not UTF-8 text (byte {exc.start})",
                    "save the file as UTF-8 (iconv -t UTF-8)",
                )
            ],
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Problem("(syntax)", str(exc), "fix the TOML")]) from None
    return parse_config(doc, path)


class _Reader:
    """Pulls typed values out of one table, noting problems and which keys were used."""

    def __init__(self, table: Any, where: str, problems: list[Problem]) -> None:
        self.where = where
        self.problems = problems
        self.ok = isinstance(table, dict)
        if not self.ok:
            self.problem("", f"must be a table, not {type(table).__name__}")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        if not name:
            return self.where or "(top level)"
        return f"{self.where}.{name}" if self.where else name

    def problem(self, name: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.key(name), message, hint))

    def get(self, name: str, convert: Callable[[Any], Any], default: Any, hint: str = "") -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        try:
            return convert(self.table[name])
        except (ValueError, TypeError, UsageError) as exc:
            msg = exc.one_line() if isinstance(exc, UsageError) else str(exc)
            # A message that already shows an example needs no second one.
            self.problem(name, msg, "" if "e.g." in msg or hint in msg else hint)
            return default

    def finish(self, allowed: tuple[str, ...] = ()) -> None:
        known = self.used | set(allowed)
        for name in self.table:
            if name not in known:
                self.problem(name, "unknown key", _suggest(name, sorted(known)))


def _suggest(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return "known keys: " + ", ".join(known) if known else ""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {type(value).__name__}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {value!r}")
    return value


def _int_at_least(low: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"must be a whole number, not {value!r}")
        if value < low:
            raise ValueError(f"must be at least {low}, not {value}")
        return value

    return convert


def _duration(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError('must be a duration like "90s", "1h", "7d"')
    seconds = float(value) if isinstance(value, (int, float)) else parse_duration(_string(value))
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"must be a finite duration, not {value!r}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _positive_duration(value: Any) -> float:
    """A duration where zero makes no sense (a timeout, a polling period, a budget)."""
    seconds = _duration(value)
    if seconds == 0:
        raise ValueError(f"must be more than zero, not {value!r}")
    return seconds


def _rate(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError('must be a rate like "200M"')
    rate = value if isinstance(value, int) else parse_size(_string(value))
    if rate <= 0:
        raise ValueError(f"must be more than zero, not {value!r}")
    return rate


def _cron(value: Any) -> CronSpec:
    return parse_cron(_string(value))


def _url(value: Any) -> str:
    text = _string(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text.rstrip("/")


def _timezone(value: Any) -> str:
    text = _string(value)
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {text!r}") from None
    return text


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _string(value).lower()
        if text not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return text

    return convert


def _subset(value: Any) -> Subset:
    return Subset.parse(_string(value))


def parse_config(doc: dict[str, Any], source: Path) -> Config:
    problems: list[Problem] = []
    base = source.resolve().parent

    def path(value: Any) -> Path:
        text = os.path.expanduser(_string(value))
        if not text:
            raise ValueError("must not be empty")
        return (base / text) if not os.path.isabs(text) else Path(text)

    top = _Reader(doc, "", problems)
    # Without state_dir: $STATE_DIRECTORY, /var/lib/chachaml-ops, XDG (never another config's).
    state_dir = top.get("state_dir", path, None) or default_state_dir(consult_config=False)
    timezone = top.get("timezone", _timezone, "UTC", "an IANA name such as Europe/Berlin")
    log_level = top.get("log_level", _choice(LOG_LEVELS), "info", 'e.g. "info" (or "debug")')
    lock_wait = top.get("lock_wait", _duration, 6 * 3600.0, "how long a job waits for a busy store")

    stores = _stores(doc.get("store"), problems, path)
    top.used.add("store")

    v = _Reader(doc.get("verify", {}), "verify", problems)
    verify = VerifyConfig(
        schedule=v.get("schedule", _cron, None, 'crontab syntax, e.g. "0 3 * * *"'),
        subset=v.get("subset", _subset, None, 'n/t, e.g. "1/7"'),
        jobs=v.get(
            "jobs", _int_at_least(1), None, "files hashed at once, e.g. 2; omit for the CPU count"
        ),
        quick=v.get("quick", _bool, False, "true checks presence and size only"),
        drop_cache=v.get("drop_cache", _bool, True, "true or false"),
        min_age=v.get("min_age", _duration, 3600.0, 'e.g. "1h"'),
        max_duration=v.get("max_duration", _positive_duration, None, 'e.g. "2h"'),
        max_age=v.get("max_age", _duration, None, 'e.g. "30d"'),
        max_rate=v.get("max_rate", _rate, None, 'bytes per second, e.g. "200M"'),
    )
    v.finish()
    o = _Reader(doc.get("orphans", {}), "orphans", problems)
    orphans = OrphansConfig(
        schedule=o.get("schedule", _cron, None, 'crontab syntax, e.g. "0 * * * *"'),
        min_age=o.get("min_age", _duration, 3600.0, 'e.g. "1h"'),
    )
    o.finish()
    b = _Reader(doc.get("backup", {}), "backup", problems)
    backup = BackupConfig(
        schedule=b.get("schedule", _cron, None, 'crontab syntax, e.g. "30 3 * * *"'),
        dir=b.get("dir", path, None),
        compression=b.get("compression", _choice(COMPRESSIONS), "zstd", 'e.g. "zstd"'),
        keep_daily=b.get("keep_daily", _int_at_least(0), 7, "archives kept, e.g. 7; 0 keeps none"),
        keep_weekly=b.get(
            "keep_weekly", _int_at_least(0), 4, "archives kept, e.g. 4; 0 keeps none"
        ),
        keep_monthly=b.get(
            "keep_monthly", _int_at_least(0), 0, "archives kept, e.g. 12; 0 keeps none"
        ),
    )
    b.finish()
    if backup.schedule is not None and backup.dir is None:
        b.problem("dir", "is required when backup.schedule is set", "where archives go")
    m = _Reader(doc.get("metrics", {}), "metrics", problems)
    metrics = MetricsConfig(textfile=m.get("textfile", path, None))
    m.finish()
    if metrics.textfile is not None and not metrics.textfile.parent.is_dir():
        m.problem(
            "textfile",
            f"folder {metrics.textfile.parent} does not exist",
            "create it, or point at node-exporter's --collector.textfile.directory",
        )
    w = _Reader(doc.get("watch", {}), "watch", problems)
    watch = WatchConfig(
        enabled=w.get("enabled", _bool, False, "true or false (no quotes)"),
        debounce=w.get("debounce", _duration, 2.0, 'e.g. "2s"'),
        grace=w.get("grace", _duration, 600.0, 'e.g. "10m"'),
        polling=w.get("polling", _bool, False, "true or false (no quotes)"),
        poll_interval=w.get("poll_interval", _positive_duration, 10.0, 'e.g. "10s"'),
    )
    w.finish()
    a = _Reader(doc.get("alerts", {}), "alerts", problems)
    alerts = AlertsConfig(
        ping_url=a.get("ping_url", _url, None, "a healthchecks-style ping URL"),
        webhook_url=a.get("webhook_url", _url, None, "e.g. a Slack incoming-webhook URL"),
        timeout=a.get("timeout", _positive_duration, 10.0, 'e.g. "10s"'),
    )
    a.finish()
    top.finish(allowed=("verify", "orphans", "backup", "metrics", "watch", "alerts"))
    if problems:
        raise ConfigError(str(source), problems)
    return Config(
        source=source,
        stores=tuple(stores),
        state_dir=state_dir,
        timezone=timezone,
        log_level=log_level,
        lock_wait=lock_wait,
        verify=verify,
        orphans=orphans,
        backup=backup,
        metrics=metrics,
        watch=watch,
        alerts=alerts,
    )


def _stores(raw: Any, problems: list[Problem], path: Callable[[Any], Path]) -> list[StoreConfig]:
    if raw is None:
        problems.append(
            Problem("store", "no [[store]] given", 'add one: [[store]] name = "main" db = "..."')
        )
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        problems.append(Problem("store", "must be an array of tables", "write [[store]]"))
        return []
    if not raw:
        problems.append(
            Problem("store", "lists no store", 'add one: [[store]] name = "main" db = "..."')
        )
        return []
    stores: list[StoreConfig] = []
    names: set[str] = set()
    dbs: dict[str, str] = {}
    for i, table in enumerate(raw):
        r = _Reader(table, f"store[{i}]", problems)
        if not r.ok:
            continue
        name = r.get("name", _string, None)
        db = r.get("db", path, None)
        artifact_dir = r.get("artifact_dir", path, None)
        r.finish()
        if name is None and "name" not in r.table:
            r.problem("name", "is required", "a short label used in logs and metrics")
        elif name is not None and not _STORE_NAME.match(name):
            r.problem("name", f"{name!r} is not a simple label", "letters, digits, . _ -")
            name = None
        elif name in names:
            r.problem("name", f"{name!r} is used by another store", "names must be unique")
            name = None
        if db is None and "db" not in r.table:
            r.problem("db", "is required", "the path of the chachaml metadata DB")
        elif db is not None:
            # A missing file is not a config error (the store may appear later: its jobs exit 3
            # until then); a folder or other non-file there is structurally wrong.
            if os.path.lexists(db) and not db.is_file():
                r.problem("db", f"{db} is not a file", "give the path of the chachaml .db file")
            real = os.path.realpath(db)
            if real in dbs:
                r.problem("db", f"{db} is also {dbs[real]}", "list each store once")
            else:
                dbs[real] = f"store {name!r}" if name else f"store[{i}]"
        if name and db is not None:
            names.add(name)
            stores.append(StoreConfig(name, db, artifact_dir or derive_artifact_dir(db)))
    return stores


def require_writable_state_dir(config: Config) -> None:
    """For `config check` and the daemon (not `status`, which only reads): StateDirUnusable
    (one line, exit 3) when the state dir cannot hold the job history and locks."""
    problem = state_dir_problem(config.state_dir)
    if problem:
        raise StateDirUnusable(
            f"{config.source}: state_dir: {problem}",
            "create it for the service user, or set state_dir to another folder",
        )


def state_dir_problem(state_dir: Path) -> str:
    """Why the state dir cannot hold job history and locks ('' when it can), without creating
    anything: it must be a writable folder, or creatable in the nearest existing parent."""
    path = Path(state_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path:
        if not probe.is_dir():
            return f"cannot be created: {probe} is not a folder"
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"cannot be created: {probe} is not writable by this user"
        return ""
    if not path.is_dir():
        return f"{path} is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by this user"
    for name in ("state.db", "locks", "alerts"):
        item = path / name
        if item.exists() and not os.access(item, os.W_OK):
            return f"{item} is not writable by this user"
    if (path / "state.db").is_dir():
        return f"{path / 'state.db'} is a folder, not the state database"
    return ""


def _verify_settings(v: VerifyConfig) -> str:
    """How the verify job will read, in one line (so `config check` shows what was read)."""
    parts = ["quick (presence and size)" if v.quick else "full (hashes)"]
    if v.subset:
        parts.append(f"subset {v.subset}, rotating")
    if v.max_age is not None:
        parts.append(f"skips files verified within {human_duration(v.max_age)}")
    if v.max_duration is not None:
        parts.append(f"hashing budget {human_duration(v.max_duration)}")
    if v.max_rate is not None:
        parts.append(f"at most {human_bytes(v.max_rate)}/s")
    parts.append("drops hashed files from the page cache" if v.drop_cache else "keeps the cache")
    return "; ".join(parts)


def describe(config: Config) -> list[str]:
    """Short lines saying what the config will do, for `config check`."""
    lines = [f"config {config.source}: OK", f"  state dir: {config.state_dir}"]
    for s in config.stores:
        lines.append(f"  store {s.name}: {s.db} (artifacts {s.artifact_dir})")
        if not s.db.exists():
            lines.append(
                f"    warning: no database file yet; {s.name}'s jobs exit 3 until it appears"
            )
    for task in TASKS:
        spec = config.schedule(task)
        when = f'cron "{spec}" ({config.timezone})' if spec else "not scheduled"
        lines.append(f"  {task}: {when}")
        if task == "verify" and spec:
            lines.append(f"    {_verify_settings(config.verify)}")
    lines.append(f"  watch: {'on' if config.watch.enabled else 'off'}")
    if config.metrics.textfile:
        lines.append(f"  metrics: {config.metrics.textfile}")
    if config.alerts.ping_url or config.alerts.webhook_url:
        lines.append(
            "  alerts: "
            + ", ".join(k for k in ("ping_url", "webhook_url") if getattr(config.alerts, k))
        )
    return lines
