"""Container health check: asks the guard server's ``grpc.health.v1`` service whether it is SERVING.

Used by the Docker ``HEALTHCHECK`` and the Kubernetes exec probes (Kubernetes' built-in gRPC probe cannot
speak TLS). Exit status 0 = SERVING, 1 = anything else (NOT_SERVING, unknown service, unreachable), with
one line on stderr saying why. Needs only ``grpcio`` and ``grpcio-health-checking`` (both server
dependencies).

Examples::

    python healthcheck.py --target 127.0.0.1:50051
    python healthcheck.py --target 127.0.0.1:50051 --service inference.GRPCInferenceService \\
        --tls-ca /etc/drmguard/tls/ca.crt --tls-cert /etc/drmguard/tls/tls.crt --tls-key /etc/drmguard/tls/tls.key
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=env("DRMGUARD_HEALTH_TARGET", "127.0.0.1:50051"), help="HOST:PORT")
    ap.add_argument("--service", default=env("DRMGUARD_HEALTH_SERVICE", ""),
                    help='health service name; "" = the whole server (default)')
    ap.add_argument("--timeout", type=float, default=float(env("DRMGUARD_HEALTH_TIMEOUT", "5")))
    ap.add_argument("--tls-ca", default=env("DRMGUARD_HEALTH_TLS_CA"), help="CA bundle; enables TLS")
    ap.add_argument("--tls-cert", default=env("DRMGUARD_HEALTH_TLS_CERT"), help="client certificate (mTLS)")
    ap.add_argument("--tls-key", default=env("DRMGUARD_HEALTH_TLS_KEY"), help="client key (mTLS)")
    ap.add_argument("--server-name", default=env("DRMGUARD_HEALTH_SERVER_NAME"),
                    help="name to verify in the server certificate when it differs from the target host")
    return ap.parse_args(argv)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731 - tiny local helper
    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, creds, options=options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"unhealthy: {args.target} service {args.service!r}: {err.code().name}: {err.details()}",
              file=sys.stderr)
        return 1
    except OSError as err:
        print(f"unhealthy: cannot read TLS files: {err}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.target} service {args.service!r} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
