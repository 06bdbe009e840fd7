"""``drmguard``: the command line of the guard service client.

Every subcommand talks to one server (``--server HOST:PORT``). Exit codes: 0 success (for ``vet`` whatever
the verdict), 1 an RPC or input error (one line on stderr: the gRPC status and the server's message),
2 bad command-line usage, 3 ``health`` answered but not SERVING, 130 interrupted.
With ``--json`` stdout carries exactly one JSON object; the shapes are documented in ``docs/client.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .arrays import load_images_npz
from .client import GuardClient
from .errors import GuardError
from .progress import ProgressLine

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_SERVING = 3
EXIT_INTERRUPTED = 130

TOKEN_ENV = "DRMGUARD_TOKEN"


def _emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _client(args: argparse.Namespace) -> GuardClient:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    return GuardClient(
        args.server,
        token=token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        timeout=args.timeout,
    )


# ---------------------------------------------------------------------------------------------- commands


def _cmd_vet(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ticket = c.submit(
            args.model,
            args.benign,
            benign_set_id=args.benign_id,
            name=args.name,
            version=args.version,
            task=args.task,
            profile=args.profile,
            references=tuple(args.reference or ()),
        )
        if not args.wait:
            out = {"scan_id": ticket.scan_id, "state": ticket.state, "name": ticket.name,
                   "submitted_version": ticket.version, "reused": ticket.reused, "message": ticket.message}
            if args.json:
                _emit_json(out)
            else:
                dup = " (identical bytes already vetted: answered from the record)" if ticket.reused else ""
                print(f"scan {ticket.scan_id} {ticket.state}{dup}")
            return EXIT_OK
        bar = None if args.quiet else ProgressLine()
        try:
            result = c.wait_admission(
                ticket.scan_id, on_event=bar.update if bar else None, reused=ticket.reused
            )
        finally:
            if bar:
                bar.close()
        out = result.to_dict()
        if args.json:
            _emit_json(out)
        else:
            _print_outcome(out)
    return EXIT_OK


def _print_outcome(out: dict[str, Any]) -> None:
    ratio = out.get("perturbation_ratio")
    ratio_s = "n/a" if ratio is None else f"{ratio:.4f}"
    print(f"scan {out['scan_id']}: {out['state']}  verdict={out['verdict']}  perturbation_ratio={ratio_s}")
    if out["mitigated"]:
        print(f"  backdoor mitigated: admitted as version {out['admitted_version']} (parent {out['submitted_version']})")
    if out.get("reason"):
        print(f"  reason: {out['reason']}")
    print(f"  {out['name']} now serves version: {out['version'] or '(none)'}")


def _cmd_upload_benign(args: argparse.Namespace) -> int:
    with _client(args) as c:
        set_id = c.upload_benign(args.benign, task=args.task)
    if args.json:
        _emit_json({"benign_set_id": set_id})
    else:
        print(set_id)
    return EXIT_OK


def _cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.json:
            last = None
            for ev in c.watch(args.scan_id):
                last = ev
            info = c.get_scan(args.scan_id)
            _emit_json(info.to_dict() | {"last_event": last.to_dict() if last else None})
            return EXIT_OK
        bar = ProgressLine()
        try:
            for ev in c.watch(args.scan_id):
                bar.update(ev)
        finally:
            bar.close()
        info = c.get_scan(args.scan_id)
        ratio = "n/a" if info.perturbation_ratio is None else f"{info.perturbation_ratio:.4f}"
        print(f"scan {info.scan_id}: {info.state}  verdict={info.verdict}  perturbation_ratio={ratio}")
        if info.reason:
            print(f"  reason: {info.reason}")
    return EXIT_OK


def _cmd_scan(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.get_scan(args.scan_id)
    if args.json:
        _emit_json(info.to_dict())
    else:
        for k, v in info.to_dict().items():
            if k not in ("report", "mitigation"):
                print(f"{k}: {v}")
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as c:
        versions = c.list_models(name=args.name)
    if args.json:
        _emit_json({"models": [v.to_dict() for v in versions]})
        return EXIT_OK
    header = ("NAME", "VERSION", "TASK", "STATE", "VERDICT", "SERVED", "PARENT", "REASON")
    rows = [header] + [
        (v.name, v.version, v.task, v.state, v.verdict or "-",
         ("yes (pinned)" if v.pinned else "yes") if v.served else "",
         (v.parent or "") + (" (mitigated)" if v.mitigated else ""), v.reason)
        for v in versions
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r[:-1], widths, strict=False)) + "  " + str(r[-1]))
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    try:
        images = load_images_npz(args.input)
    except ValueError as exc:
        raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    with _client(args) as c:
        result = c.predict_ex(args.name, images, version=args.version)
    if args.json:
        _emit_json({"outputs": result.outputs.astype(float).tolist(), "model": args.name,
                    "version": result.version})
    else:
        print(f"# {args.name} version {result.version}: {result.outputs.shape[0]} rows")
        for row in result.outputs:
            print(" ".join(f"{float(v):.6g}" for v in row))
    return EXIT_OK


def _cmd_pin(args: argparse.Namespace) -> int:
    with _client(args) as c:
        served = c.pin(args.name, args.version)
    if args.json:
        _emit_json({"name": args.name, "version": served})
    else:
        print(f"{args.name}: pinned to version {served}")
    return EXIT_OK


def _cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as c:
        served = c.rollback(args.name)
    if args.json:
        _emit_json({"name": args.name, "version": served})
    else:
        print(f"{args.name}: rolled back, now serving version {served}")
    return EXIT_OK


def _cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    if args.json:
        _emit_json({"status": status, "service": args.service})
    else:
        print(status)
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``drmguard`` argument parser (exposed for the docs and tests)."""
    p = argparse.ArgumentParser(
        prog="drmguard",
        description="Client for the DRMGuard guard service: vet models, watch scans, predict, administer.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the guard service address")
    p.add_argument("--token", default=None,
                   help=f"bearer token (role registry, vehicle or admin); default: ${TOKEN_ENV}")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="CA certificate: use TLS and verify the server")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="client private key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="deadline in seconds for each unary call and upload (default 60)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        sp.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        return sp

    v = cmd("vet", _cmd_vet, "upload a model version and its benign dataset for scanning")
    v.add_argument("--model", required=True, metavar="M.onnx", help="the ONNX model (single file)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--benign", metavar="D.npz", help="benign dataset (images, labels) to upload with it")
    src.add_argument("--benign-id", metavar="ID", help="id of a benign set uploaded before (upload-benign)")
    v.add_argument("--name", required=True, help="model name")
    v.add_argument("--version", required=True, help="model version")
    v.add_argument("--task", required=True, choices=("gaze", "headpose"))
    v.add_argument("--profile", default=None, help="scan profile (server default when omitted)")
    v.add_argument("--reference", action="append", metavar="VERSION",
                   help="a vetted benign version of the same model to use as a reference (repeatable)")
    v.add_argument("--wait", action="store_true",
                   help="wait for a final state (ADMITTED and serving, REJECTED or FAILED); progress on stderr")
    v.add_argument("--quiet", action="store_true", help="with --wait: no progress bar")

    u = cmd("upload-benign", _cmd_upload_benign, "upload a benign dataset once; prints its id")
    u.add_argument("--benign", required=True, metavar="D.npz")
    u.add_argument("--task", default=None, choices=("gaze", "headpose"),
                   help="check the label columns against this task on upload")

    w = cmd("watch", _cmd_watch, "follow a scan's progress until its final state")
    w.add_argument("scan_id")

    s = cmd("scan", _cmd_scan, "show a scan's full record (GetScan)")
    s.add_argument("scan_id")

    m = cmd("models", _cmd_models, "list every model version with its state, verdict and serving status")
    m.add_argument("--name", default=None, help="only this model")

    pr = cmd("predict", _cmd_predict, "run an admitted model on images from an .npz (key 'images')")
    pr.add_argument("--name", required=True)
    pr.add_argument("--version", default=None, help="an admitted version (default: the served one)")
    pr.add_argument("--input", required=True, metavar="X.npz")

    pn = cmd("pin", _cmd_pin, "serve a given admitted version (admin)")
    pn.add_argument("--name", required=True)
    pn.add_argument("--version", required=True)

    rb = cmd("rollback", _cmd_rollback, "serve the previous admitted version again (admin)")
    rb.add_argument("--name", required=True)

    h = cmd("health", _cmd_health, "ask grpc.health.v1; exit 0 only when SERVING")
    h.add_argument("--service", default="", help="service name to check (default: the whole server)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``drmguard``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GuardError as exc:
        print(f"drmguard {args.command}: {exc.code.name}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"drmguard {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
