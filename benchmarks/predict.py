"""Predict latency and throughput of the guard service against a bare ONNX Runtime session, side by side.

One run measures, on the same ONNX model:

* bare ``onnxruntime.InferenceSession.run`` (CPU provider unless ``--bare-providers``, default session options,
  in this process);
* ``drmguard.v1.Guard/Predict`` through ``guard_client`` against a ``drmguard-server`` on loopback;

for batch 1 and 32 and 1 and 16 concurrent clients (threads; one gRPC channel per client), and then
Predict at batch 1 with one client while a scan runs in the server. Prints a Markdown table.

Goals (issue 4): p50 overhead at batch 1 under 1 ms over bare ORT; batch-32 throughput at least 85% of
bare ORT; Predict latency within 20% while a scan runs.

Run: ``nice python benchmarks/predict.py`` (about 5-10 minutes on a 2-core CPU, most of it the scans).
``--server HOST:PORT`` measures an already running server instead (the model is vetted there first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from guard_client import GuardClient  # noqa: E402
from guard_client.progress import ProgressLine  # noqa: E402

MODEL_NAME = "bench-gaze"


@dataclass
class Result:
    """One measured configuration."""

    target: str  # "ort" (bare session) or "predict" (the service)
    batch: int
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    images_per_s: float


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def measure(call: Callable[[], Any], *, clients: int, seconds: float, warmup: int, target: str, batch: int,
            setup: Callable[[], Callable[[], Any]] | None = None) -> Result:
    """Runs ``call`` from ``clients`` threads for ``seconds``; per-request latencies in ms.

    ``setup`` (when given) builds a per-thread callable (e.g. a client with its own channel).
    """
    lat: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        fn = setup() if setup is not None else call
        for _ in range(warmup):
            fn()
        start.wait()
        mine = lat[i]
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if t1 > stop_at[0]:
                break
            mine.append((t1 - t0) * 1e3)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = float("inf")
    start.wait()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_begin
    flat = [x for xs in lat for x in xs]
    return Result(
        target=target, batch=batch, clients=clients, requests=len(flat), seconds=elapsed,
        p50_ms=_percentile(flat, 50), p99_ms=_percentile(flat, 99),
        images_per_s=len(flat) * batch / elapsed if elapsed > 0 else float("nan"),
    )


def build_model(work: Path, *, arch: str, size: int, width: float, steps: int, seed: int) -> tuple[Path, Path, np.ndarray]:
    """A briefly trained gaze ResNet18 (ONNX), its benign set, and test images (uint8)."""
    import torch

    torch.set_num_threads(1)  # building the model is set-up, not measured; one thread avoids OpenMP stalls
    from drmguard_engine.data.benign import save_benign_npz
    from drmguard_engine.data.synthetic import make_dataset
    from drmguard_engine.models import build_model as build
    from drmguard_engine.onnx_io import export_onnx
    from drmguard_engine.training import train

    x, y = make_dataset("gaze", 1600 + 300 + 64, size=size, seed=seed)
    benign = work / f"benign-{seed}.npz"
    save_benign_npz(benign, x[1600:1900], y[1600:1900])
    model = build(arch, "gaze", input_size=size, width=width, seed=seed)
    train(model, x[:1600], y[:1600], task="gaze", steps=steps, seed=seed)
    path = work / f"model-{seed}.onnx"
    export_onnx(model.cpu().eval(), path, input_shape=(3, size, size))
    return path, benign, x[1900:]


def vet_and_wait(c: GuardClient, model: Path, benign: Path, *, version: str, profile: str | None) -> dict[str, Any]:
    scan_id = c.vet(model, benign, name=MODEL_NAME, version=version, task="gaze", profile=profile)
    bar = ProgressLine()
    try:
        out = c.wait_admission(scan_id, on_event=bar.update)
    finally:
        bar.close()
    return out.to_dict()


def table(rows: list[Result]) -> str:
    """Markdown: ORT and Predict side by side per (batch, clients)."""
    by = {(r.target, r.batch, r.clients): r for r in rows}
    lines = [
        "| batch | clients | ORT p50 ms | Predict p50 ms | p50 overhead ms | ORT p99 ms | Predict p99 ms "
        "| ORT img/s | Predict img/s | Predict / ORT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in sorted({r.batch for r in rows}):
        for clients in sorted({r.clients for r in rows}):
            o, p = by.get(("ort", batch, clients)), by.get(("predict", batch, clients))
            if o is None or p is None:
                continue
            lines.append(
                f"| {batch} | {clients} | {o.p50_ms:.3f} | {p.p50_ms:.3f} | {p.p50_ms - o.p50_ms:+.3f} "
                f"| {o.p99_ms:.3f} | {p.p99_ms:.3f} | {o.images_per_s:.0f} | {p.images_per_s:.0f} "
                f"| {100 * p.images_per_s / o.images_per_s:.0f}% |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=None, help="HOST:PORT of a running server (default: start one)")
    ap.add_argument("--arch", default="resnet18", help="engine architecture (default resnet18)")
    ap.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    ap.add_argument("--width", type=float, default=0.5, help="ResNet18 width multiplier (default 0.5)")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    ap.add_argument("--profile", default="fast",
                    help="scan profile for the admission scan and the background scan (default fast: the scans "
                         "only admit the model and load the CPU; Predict is what is measured)")
    ap.add_argument("--skip-scan", action="store_true", help="skip the Predict-while-scanning measurement")
    ap.add_argument("--input-dtype", choices=["float32", "uint8"], default="float32",
                    help="what Predict sends: float32 in [0,1] (default) or the same images as uint8 0-255, 4x "
                         "smaller on the wire (the bare session always gets float32)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra drmguard-server argument for the started server (repeatable), e.g. "
                         "--server-arg=--inference-spinning")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="the started server's --device (scans; its providers are its own default order)")
    ap.add_argument("--bare-providers", default="CPUExecutionProvider",
                    help="comma-separated providers of the bare session (default CPUExecutionProvider; on a GPU "
                         "machine CUDAExecutionProvider,CPUExecutionProvider)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    # SystemExit on SIGTERM unwinds through ``finally``: the server this script started is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    import onnxruntime as ort

    work = Path(tempfile.mkdtemp(prefix="drmguard-bench-"))
    server = None
    try:
        print(f"building the benchmark model ({args.arch} x{args.width}, {args.size} px) ...", file=sys.stderr)
        model, benign, test_x = build_model(work, arch=args.arch, size=args.size, width=args.width,
                                            steps=args.train_steps, seed=0)
        if args.server is None:
            from guard_server.demo import ServerProcess

            server = ServerProcess(work / "data", device=args.device, extra=("--scan-threads", "1", *args.server_arg))
            server.wait_serving(timeout=90)
            address = server.address
        else:
            address = args.server
        with GuardClient(address, timeout=60) as c:
            t0 = time.monotonic()
            print("vetting it (scan) ...", file=sys.stderr)
            adm = vet_and_wait(c, model, benign, version="1", profile=args.profile)
            scan_s = time.monotonic() - t0
            if adm["state"] != "ADMITTED":
                print(f"the benchmark model was not admitted: {adm}", file=sys.stderr)
                return 1
            version = adm["admitted_version"]

        load_before = os.getloadavg()
        sess = ort.InferenceSession(model.read_bytes(), providers=args.bare_providers.split(","))
        print(f"bare session providers: {sess.get_providers()}", file=sys.stderr)
        in_name = sess.get_inputs()[0].name
        batches = {b: (np.resize(test_x, (b, *test_x.shape[1:])).astype(np.float32) / 255.0) for b in (1, 32)}
        results: list[Result] = []
        for batch in (1, 32):
            xb = batches[batch]
            for clients in (1, 16):
                warm = 3 if batch == 32 else 20
                print(f"  batch {batch}, {clients} clients ...", file=sys.stderr)
                results.append(measure(lambda xb=xb: sess.run(None, {in_name: xb}), clients=clients,
                                       seconds=args.seconds, warmup=warm, target="ort", batch=batch))

                xs = (xb * 255.0).round().astype(np.uint8) if args.input_dtype == "uint8" else xb

                def setup(xs: np.ndarray = xs) -> Callable[[], Any]:
                    cl = GuardClient(address, timeout=60)
                    return lambda: cl.predict(MODEL_NAME, xs, version=version)

                results.append(measure(lambda: None, clients=clients, seconds=args.seconds, warmup=warm,
                                       target="predict", batch=batch, setup=setup))
        # Sanity: the service answers what the bare session computes.
        with GuardClient(address) as c:
            served = c.predict(MODEL_NAME, batches[32], version=version)
            diff = float(np.abs(served - sess.run(None, {in_name: batches[32]})[0]).max())
            cpu = ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
            diff_cpu = float(np.abs(served - cpu.run(None, {in_name: batches[32]})[0]).max())

        during: dict[str, Any] = {}
        if not args.skip_scan:
            # A second, different model starts a scan; Predict at batch 1 is measured before and during it.
            model2, benign2, _ = build_model(work, arch=args.arch, size=args.size, width=args.width,
                                                   steps=args.train_steps, seed=1)
            with GuardClient(address, timeout=60) as c:
                idle = measure(lambda: None, clients=1, seconds=args.seconds, warmup=20, target="predict",
                               batch=1, setup=lambda: (lambda cl=c: cl.predict(MODEL_NAME, batches[1],
                                                                                version=version)))
                scan_id = c.vet(model2, benign2, name=MODEL_NAME + "-2", version="1", task="gaze",
                                profile=args.profile)
                deadline = time.monotonic() + 120
                while c.get_scan(scan_id).state not in ("SCANNING", "MITIGATING") and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(2.0)  # let the scan get past its start-up (imports, model load)
                busy = measure(lambda: None, clients=1, seconds=args.seconds, warmup=5, target="predict",
                               batch=1, setup=lambda: (lambda cl=c: cl.predict(MODEL_NAME, batches[1],
                                                                                version=version)))
                state_after = c.get_scan(scan_id).state
                c.cancel(scan_id) if state_after not in ("ADMITTED", "REJECTED", "FAILED") else None
            during = {"idle": asdict(idle), "scanning": asdict(busy), "scan_state_after": state_after,
                      "p50_ratio": busy.p50_ms / idle.p50_ms, "p99_ratio": busy.p99_ms / idle.p99_ms}

        load = os.getloadavg()
        print(f"\nload average before/after: {load_before[0]:.1f} / {load[0]:.1f} (1 min), "
              f"{os.cpu_count()} CPUs")
        print(f"\n## Predict vs bare ONNX Runtime ({platform.processor() or platform.machine()}, "
              f"{args.arch} x{args.width}, {args.size}x{args.size}, Predict input {args.input_dtype}, "
              f"{args.seconds:.0f} s per row)\n")
        print(table(results))
        print(f"\nmax |Predict - ORT| on a batch of 32: {diff:.2e} (against a CPU session: {diff_cpu:.2e}); "
              f"first scan took {scan_s:.0f} s")
        if during:
            i, b = during["idle"], during["scanning"]
            print("\n## Predict (batch 1, 1 client) while a scan runs\n")
            print("| | p50 ms | p99 ms | img/s |\n|---|---:|---:|---:|")
            print(f"| idle | {i['p50_ms']:.3f} | {i['p99_ms']:.3f} | {i['images_per_s']:.0f} |")
            print(f"| scan running | {b['p50_ms']:.3f} | {b['p99_ms']:.3f} | {b['images_per_s']:.0f} |")
            print(f"\np50 ratio {during['p50_ratio']:.2f}, p99 ratio {during['p99_ratio']:.2f} "
                  f"(scan state after the window: {during['scan_state_after']})")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in results], "during_scan": during,
                                                   "max_abs_diff": diff, "max_abs_diff_cpu": diff_cpu, "scan_seconds": scan_s,
                                                   "loadavg": [load_before[0], load[0]]}, indent=2))
        return 0
    finally:
        if server is not None:
            server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
