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


class CommitUnknownError(TaskServerError):
    """The connection was lost while the call committed: its change may have been applied or not."""

    def __init__(self) -> None:
        super().__init__(COMMIT_UNKNOWN_MESSAGE.format(request_id="of this call"))

    @staticmethod
    def message(request_id: str) -> str:
        return COMMIT_UNKNOWN_MESSAGE.format(request_id=request_id)


class StartupError(Exception):
    """The server cannot start; the message is for the operator and names what to fix."""


BUSY_MESSAGE = "the database is busy right now; nothing was changed, retry the call in a moment"
UNAVAILABLE_MESSAGE = "the database is unreachable right now; nothing was changed, retry the call later"
TIMEOUT_MESSAGE = (
    "the call ran longer than the database allows and was stopped; nothing was changed. "
    "Narrow the filter or ask for fewer rows, then retry"
)
COMMIT_UNKNOWN_MESSAGE = (
    "the connection to the database was lost while this call was committing, so its change may "
    "have been applied or not. Retry with the same idempotency_key (a change already made is not "
    "made again), or look for request {request_id} with get_audit_trail"
)
REFUSED_MESSAGE = (
    "the database refused this call and nothing was changed; this is not an input problem, "
    "so report it to the server's operator if it happens again"
)


# What a database call can raise: SQLAlchemy wraps the drivers' errors in its own.
DATABASE_ERRORS: tuple[type[Exception], ...] = (sa_exc.SQLAlchemyError, OSError)
_DISCONNECTED = ("57P01", "57P02", "57P03")  # the server shut the session down (terminate, restart)


def is_disconnect(error: BaseException) -> bool:
    """Whether the connection that raised `error` is gone or unusable."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    error = _driver_error(error)
    if isinstance(error, OSError | ConnectionError):
        return True
    return getattr(error, "sqlstate", None) in _DISCONNECTED


def is_unique_violation(error: BaseException) -> bool:
    return isinstance(error, sa_exc.IntegrityError) and (
        getattr(_driver_error(error), "sqlstate", "23505") == "23505"
    )


def _driver_error(error: BaseException) -> BaseException:
    return error.orig if isinstance(error, sa_exc.DBAPIError) and error.orig is not None else error


def translate_database_error(error: Exception) -> TaskServerError | None:
    """The agent-facing error for a database failure, or None for a bug to report as a crash."""
    if isinstance(error, sa_exc.TimeoutError):  # the connection pool stayed exhausted
        return DatabaseBusyError(BUSY_MESSAGE)
    orig = _driver_error(error)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "57014":  # query_canceled: the statement timeout
        return CallTimeoutError(TIMEOUT_MESSAGE)
    if sqlstate in ("55P03", "40P01", "40001"):  # the lock timeout, a deadlock, a serialization failure
        return DatabaseBusyError(BUSY_MESSAGE)
    if sqlstate is not None and sqlstate.startswith("53"):
        # Insufficient resources: too many connections (for the server, or the role's limit), out
        # of memory or disk. Another moment may find them free.
        return DatabaseBusyError(BUSY_MESSAGE)
    if sqlstate is not None and sqlstate.startswith("08"):  # a connection exception
        return DatabaseBusyError(UNAVAILABLE_MESSAGE)
    if is_disconnect(error) or isinstance(error, sa_exc.InterfaceError):
        return DatabaseBusyError(UNAVAILABLE_MESSAGE)
    if isinstance(error, sa_exc.DBAPIError):
        text = str(orig).lower()
        if "database is locked" in text or "deadlock" in text or "could not serialize" in text:
            return DatabaseBusyError(BUSY_MESSAGE)
        if isinstance(error, sa_exc.OperationalError) and "connect" in text:
            return DatabaseBusyError(UNAVAILABLE_MESSAGE)
    return None
