"""Server errors and the one table that maps exceptions to gRPC status codes."""

from __future__ import annotations

import grpc

from drmguard_engine.errors import ConfigError, DataError, UnsupportedModelError


class GuardError(Exception):
    """Base of the server's own errors; the message says what is wrong and what to do."""


class InvalidRequestError(GuardError, ValueError):
    """A request field is missing or malformed."""


class ModelNotFoundError(GuardError):
    """No such model, version, scan or benign set (or the version is not admitted)."""


class AlreadyExistsError(GuardError):
    """The name/version already exists with different bytes."""


class PreconditionError(GuardError):
    """The request is well-formed but the current state does not allow it."""


class QueueFullError(GuardError):
    """The scan queue is full."""


class TooLargeError(GuardError):
    """An upload or batch exceeds a configured cap."""


class UnavailableError(GuardError):
    """The server is shutting down or a model is still loading."""


STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (DataError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedModelError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for one of our exceptions, or None for an unexpected one (-> INTERNAL)."""
    for typ, code in STATUS_TABLE:
        if isinstance(exc, typ):
            return code
    return None
