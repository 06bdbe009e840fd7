"""Builds and runs the gRPC server: Guard + OIP + health + reflection, metrics endpoint, graceful stop."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from concurrent import futures
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc

from .interceptors import GuardInterceptor, load_tokens
from .metrics import Metrics
from .service import GuardCore
from .servicer import GuardServicer, InferenceServicer
from .settings import ServerSettings

logger = logging.getLogger(__name__)

GUARD_SERVICE = pb.DESCRIPTOR.services_by_name["Guard"].full_name  # "drmguard.v1.Guard"
OIP_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
HEALTH_SERVICES = ("", GUARD_SERVICE, OIP_SERVICE)


def _version() -> str:
    try:
        return metadata.version("drmguard-service")
    except metadata.PackageNotFoundError:
        return "0"


def split_host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:50051 or [::]:50051), got {listen!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GuardServer:
    """The whole server in one object (tests start it in-process on 127.0.0.1:0)."""

    def __init__(self, settings: ServerSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        tokens = load_tokens(settings.tokens_file) if settings.tokens_file else None
        self.core = GuardCore(settings, self.metrics)
        opts = [("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_threads,
                                                             thread_name_prefix="grpc"),
                                  interceptors=[GuardInterceptor(self.metrics, tokens)], options=opts,
                                  maximum_concurrent_rpcs=settings.grpc_threads * 4)
        pb_grpc.add_GuardServicer_to_server(GuardServicer(self.core), self.server)
        self.oip = InferenceServicer(self.core, _version())
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self.oip, self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for svc in HEALTH_SERVICES:
            self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        if settings.reflection:
            reflection.enable_server_reflection((GUARD_SERVICE, OIP_SERVICE, health.SERVICE_NAME,
                                                 reflection.SERVICE_NAME), self.server)
        host, port = split_host_port(settings.listen)
        if not settings.auth_configured and not is_loopback(host):
            logger.warning("no auth configured (--tokens-file or --tls-client-ca): listening on loopback only "
                           "(127.0.0.1) instead of %s", host)
            host = "127.0.0.1"
        elif not settings.auth_configured:
            logger.warning("no auth configured: every caller on this host has every role; listening on %s only", host)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if settings.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
                root_certificates=Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None,
                require_client_auth=bool(settings.tls_client_ca))
            self.port = self.server.add_secure_port(addr, creds)
        else:
            self.port = self.server.add_insecure_port(addr)
        if self.port == 0:
            raise OSError(f"cannot listen on {addr}: the address is in use or not available here")
        self.host = host
        self.metrics_port = -1
        self._metrics_server: object | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> GuardServer:
        self.server.start()
        if self.settings.metrics_port >= 0:
            mhost = self.settings.metrics_host or self.host
            port = self.settings.metrics_port or _free_port(mhost)
            self._metrics_server, _ = start_http_server(port, addr=mhost, registry=self.registry)
            self.metrics_port = port
            logger.info("metrics on http://%s:%d/metrics", mhost, port)
        self.core.start()
        for svc in HEALTH_SERVICES:
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        logger.info("drmguard server %s listening on %s (%s, scans on %s, %d worker(s))", _version(), self.address,
                    "TLS" + (" + client certificates" if self.settings.tls_client_ca else "") if self.settings.tls_cert
                    else "plaintext", self.core.device, self.settings.resolved_workers)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, refuse new RPCs, drain in-flight ones, stop scans, close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.oip.ready = False
        g = self.settings.shutdown_grace if grace is None else grace
        self.core._stopping.set()  # WatchScan streams end, Predict answers UNAVAILABLE during the drain
        self.server.stop(g).wait(g + 1)
        self.core.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
        logger.info("server stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
