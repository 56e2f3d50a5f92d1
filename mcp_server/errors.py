"""Expected failures, each with a message that tells the agent what to do next.

The data layer raises these; the tool layer turns them into `ToolError`. Database errors are
translated here too, so no SQL, parameter or driver text ever reaches an agent.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


class TaskServerError(Exception):
    """A failure the caller can act on. The message is safe to show to the agent."""


class InvalidInputError(TaskServerError):
    pass


class NotFoundError(TaskServerError):
    pass


class ConflictError(TaskServerError):
    pass


class DatabaseBusyError(TaskServerError):
    pass


class CallTimeoutError(TaskServerError):
    pass


class PermissionDeniedError(TaskServerError):
    """The calling agent lacks `permission`; the call changed nothing and is recorded as refused."""

    def __init__(self, permission: str, message: str) -> None:
        super().__init__(message)
        self.permission = permission


class StartupError(Exception):
    """The server cannot start; the message is for the operator and names what to fix."""


BUSY_MESSAGE = "the database is busy right now; nothing was changed, retry the call in a moment"
UNAVAILABLE_MESSAGE = "the database is unreachable right now; retry the call later"
TIMEOUT_MESSAGE = (
    "the call ran longer than the database allows and was stopped; nothing was changed. "
    "Narrow the filter or ask for fewer rows, then retry"
)
REFUSED_MESSAGE = (
    "the database refused this call and nothing was changed; this is not an input problem, "
    "so report it to the server's operator if it happens again"
)


def translate_database_error(error: Exception) -> TaskServerError | None:
    """The agent-facing error for a database failure, or None for a bug to report as a crash."""
    if isinstance(error, sa_exc.TimeoutError):  # the connection pool stayed exhausted
        return DatabaseBusyError(BUSY_MESSAGE)
    if isinstance(error, sa_exc.DBAPIError):
        text = str(error.orig).lower()
        sqlstate = getattr(error.orig, "sqlstate", None)
        if sqlstate == "57014":  # query_canceled: the statement timeout
            return CallTimeoutError(TIMEOUT_MESSAGE)
        if sqlstate == "55P03":  # lock_not_available: the lock timeout
            return DatabaseBusyError(BUSY_MESSAGE)
        if error.connection_invalidated or isinstance(error, sa_exc.InterfaceError):
            return DatabaseBusyError(UNAVAILABLE_MESSAGE)
        if "database is locked" in text or "deadlock" in text or "could not serialize" in text:
            return DatabaseBusyError(BUSY_MESSAGE)
        if isinstance(error, sa_exc.OperationalError) and "connect" in text:
            return DatabaseBusyError(UNAVAILABLE_MESSAGE)
    if isinstance(error, OSError | ConnectionError):
        return DatabaseBusyError(UNAVAILABLE_MESSAGE)
    return None
