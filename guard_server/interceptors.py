"""One server interceptor: bearer-token roles, then request counting by method and status code."""

from __future__ import annotations

import hmac
import json
import logging
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from .metrics import Metrics

logger = logging.getLogger(__name__)

ROLES = ("registry", "vehicle", "admin")
_GUARD = "/drmguard.v1.Guard/"
_OIP = "/inference.GRPCInferenceService/"
# The role each method needs; admin may call everything. Health and reflection are open (probes, grpcurl).
METHOD_ROLES: dict[str, str] = {
    **{_GUARD + m: "registry" for m in ("VetModel", "UploadBenignSet", "WatchScan", "GetScan", "ListModels",
                                        "CancelScan")},
    _GUARD + "Predict": "vehicle",
    _GUARD + "PinVersion": "admin",
    _GUARD + "Rollback": "admin",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def required_role(method: str) -> str | None:
    """The role a method needs, None for open ones; unknown Guard methods need admin (fail closed)."""
    if method.startswith(OPEN_PREFIXES):
        return None
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    if method.startswith(_OIP):
        return "vehicle"
    return "admin"


def load_tokens(path: str) -> dict[str, str]:
    """Reads ``{"tokens": [{"token": "...", "role": "..."}]}`` (JSON or TOML); returns token -> role.

    Raises:
        ValueError: a missing file, an unknown role or a short token, naming which.
    """
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"tokens file {path}: {exc.strerror}") from None
    data = tomllib.loads(text.decode()) if p.suffix.lower() == ".toml" else json.loads(text)
    out: dict[str, str] = {}
    for i, item in enumerate(data.get("tokens", [])):
        tok, role = str(item.get("token", "")), str(item.get("role", ""))
        if role not in ROLES:
            raise ValueError(f"tokens file {path}: entry {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if len(tok) < 16:
            raise ValueError(f"tokens file {path}: entry {i} has a token shorter than 16 characters")
        out[tok] = role
    if not out:
        raise ValueError(f"tokens file {path}: no tokens; add {{\"tokens\": [{{\"token\": ..., \"role\": ...}}]}}")
    return out


class GuardInterceptor(grpc.ServerInterceptor):
    """Auth (when tokens are configured) and ``drmguard_grpc_requests_total`` / duration for every RPC."""

    def __init__(self, metrics: Metrics, tokens: dict[str, str] | None) -> None:
        self.metrics = metrics
        self.tokens = tokens or {}

    def _role_of(self, metadata: Any) -> str | None:
        for k, v in metadata or ():
            if k == "authorization" and isinstance(v, str) and v.lower().startswith("bearer "):
                given = v[7:].strip()
                for tok, role in self.tokens.items():
                    if hmac.compare_digest(tok, given):  # constant-time: no timing oracle on tokens
                        return role
                return ""
        return None

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        denial: tuple[grpc.StatusCode, str] | None = None
        if self.tokens:
            need = required_role(method)
            if need is not None:
                role = self._role_of(details.invocation_metadata)
                if role is None:
                    denial = (grpc.StatusCode.UNAUTHENTICATED,
                              "missing credentials: send metadata 'authorization: Bearer <token>'")
                elif role == "":
                    denial = (grpc.StatusCode.UNAUTHENTICATED, "unknown token")
                elif role != need and role != "admin":
                    denial = (grpc.StatusCode.PERMISSION_DENIED,
                              f"a {role} token may not call {method.rsplit('/', 1)[-1]}; it needs the {need} role")
        return self._wrap(handler, method, denial)

    def _wrap(self, handler: Any, method: str, denial: tuple[grpc.StatusCode, str] | None) -> Any:
        # Bounded label: the full method name ("drmguard.v1.Guard/Predict"); only registered methods get here.
        short = method.strip("/")
        m = self.metrics

        def done(context: grpc.ServicerContext, t0: float, exc: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            m.grpc_requests.labels(short, name).inc()
            m.grpc_duration.labels(short).observe(time.perf_counter() - t0)

        def unary_result(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Any:
                t0 = time.perf_counter()
                if denial is not None:
                    try:
                        context.abort(*denial)
                    finally:
                        done(context, t0, None)
                try:
                    out = behavior(request, context)
                except BaseException as exc:
                    done(context, t0, exc)
                    raise
                done(context, t0, None)
                return out
            return inner

        def stream_result(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                t0 = time.perf_counter()
                if denial is not None:
                    try:
                        context.abort(*denial)
                    finally:
                        done(context, t0, None)
                try:
                    yield from behavior(request, context)
                except BaseException as exc:
                    done(context, t0, exc)
                    raise
                done(context, t0, None)
            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_result(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_result(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_result(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(stream_result(handler.stream_stream),
                                                     handler.request_deserializer, handler.response_serializer)
