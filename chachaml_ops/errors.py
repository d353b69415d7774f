"""The project's own exceptions: each one means "could not check" and carries its exit code.

The core raises these; only the edges (cli, daemon) turn them into a line of text and an exit.
"""

from __future__ import annotations

EXIT_CLEAN = 0
EXIT_WARNINGS = 1
EXIT_ERRORS = 2
EXIT_CANNOT_CHECK = 3


class OpsError(Exception):
    """A condition that prevents the job from running at all (exit 3).

    `hint` says what the operator can do about it; it is appended to the one-line message.
    """

    exit_code = EXIT_CANNOT_CHECK

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = str(self)
        return f"{text}; {self.hint}" if self.hint else text


class StoreNotFound(OpsError):
    pass


class NotSQLite(OpsError):
    pass


class SchemaError(OpsError):
    pass


class StoreLocked(OpsError):
    pass


class ArtifactDirMissing(OpsError):
    pass


class UsageError(OpsError):
    pass


class ScratchFull(OpsError):
    pass


class Interrupted(OpsError):
    """The process is stopping (SIGTERM): the work gave up part way, and left nothing half-done."""
