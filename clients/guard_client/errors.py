"""The one exception type the client raises: a failed RPC or unusable local input."""

from __future__ import annotations

import grpc


class GuardError(Exception):
    """An error from the guard service (or from checking input before sending it).

    Attributes:
        code: the gRPC status code the server answered with (``INVALID_ARGUMENT`` for input
            the client refused before sending it, ``UNAVAILABLE`` when the server cannot be reached).
        message: the server's message, which says what to fix.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> GuardError:
        """Wraps a ``grpc.RpcError`` (a failed call) into a ``GuardError``."""
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        return cls(code, str(details or "no message from the server"))
