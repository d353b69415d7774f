"""The one structlog configuration: JSON lines off a TTY, the console renderer on one.

Standard-library loggers (apscheduler, watchdog) are routed through the same processors, so
every line on stderr has one shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_LEVEL_METHODS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}
# configure(lazy=True) leaves its arguments here until the first event that passes the level.
_deferred: tuple[str, bool | None, Any] | None = None


def configure(
    level: str = "info", *, json_lines: bool | None = None, stream=None, lazy: bool = False
) -> None:
    """Set up logging at `level`. With `lazy`, only the level is set now, and structlog is
    imported and configured when the first event passes it: a CLI run at the default level
    logs nothing and so never pays structlog's import (~45 ms of a ~150 ms start)."""
    global _deferred
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    if lazy:
        logging.getLogger().setLevel(numeric)
        _deferred = (level, json_lines, stream)
        return
    _deferred = None
    _configure_now(numeric, json_lines, stream or sys.stderr)


def _configure_now(numeric: int, json_lines: bool | None, stream) -> None:
    import structlog

    if json_lines is None:
        json_lines = not stream.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # watchdog's inotify chatter at debug is noise even when we debug ourselves
    logging.getLogger("watchdog").setLevel(max(numeric, logging.INFO))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _real_logger(name: str, context: dict[str, Any]):
    global _deferred
    if _deferred is not None:
        level, json_lines, stream = _deferred
        _deferred = None
        _configure_now(
            logging.getLevelNamesMapping()[level.upper()], json_lines, stream or sys.stderr
        )
    import structlog

    return structlog.get_logger(name).bind(**context)


class _LazyLogger:
    """A bound logger that becomes a structlog one at its first event above the level."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any]) -> None:
        self._name, self._context = name, context

    def bind(self, **context: Any) -> _LazyLogger:
        return _LazyLogger(self._name, {**self._context, **context})

    def __getattr__(self, method: str):
        level = _LEVEL_METHODS.get(method)
        if level is not None and not logging.getLogger(self._name).isEnabledFor(level):
            return _ignore
        return getattr(_real_logger(self._name, self._context), method)


def _ignore(*_args: Any, **_kw: Any) -> None:
    return None


def get_logger(name: str = "chachaml_ops", **context):
    if _deferred is not None:
        return _LazyLogger(name, context)
    return _real_logger(name, context)
