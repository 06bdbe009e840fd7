"""Where Predict's overhead at batch 32 goes: inside the servicer (decode, run, encode) or outside it (gRPC
transport, the client, thread hops).

Starts a server, admits a ResNet18 x0.5 64 px gaze model (the ``fast`` profile), then sends the same batch of 32
from one client, as float32 and as uint8, and compares the client-observed p50 with the server's own
``drmguard_predict_latency_seconds`` mean over the same requests, beside a bare ONNX Runtime session.

    .venv/bin/python benchmarks/predict_gap.py        # about 3 minutes on 2 cores (model build and admission scan)
"""

from __future__ import annotations

import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import predict as bench  # noqa: E402

SERIES = ("drmguard_predict_latency_seconds_sum", "drmguard_predict_latency_seconds_count")


def p50_ms(fn: Callable[[], Any], seconds: float = 2.0) -> float:
    """p50 of one client calling ``fn`` for ``seconds`` (``predict.measure``, the main benchmark's loop)."""
    return bench.measure(fn, clients=1, seconds=seconds, warmup=5, target="", batch=32).p50_ms


def latency_totals(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = dict.fromkeys(SERIES, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0]
        if name in out:
            out[name] += float(line.split()[-1])
    return out


def main() -> int:
    import onnxruntime as ort
    from guard_client import GuardClient
    from guard_server.demo import ServerProcess

    work = Path(tempfile.mkdtemp(prefix="drmguard-gap-"))
    model, benign, test_x = bench.build_model(work, arch="resnet18", size=64, width=0.5, steps=20, seed=0)
    server = ServerProcess(work / "data", device="cpu", extra=("--scan-threads", "1"))
    server.wait_serving(timeout=90)
    try:
        with GuardClient(server.address, timeout=120) as c:
            version = bench.vet_and_wait(c, model, benign, version="1", profile="fast")["admitted_version"]
            xf = np.resize(test_x, (32, *test_x.shape[1:])).astype(np.float32) / 255.0
            xu = (xf * 255.0).round().astype(np.uint8)
            sess = ort.InferenceSession(model.read_bytes(), providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            print(f"bare ORT p50 {p50_ms(lambda: sess.run(None, {name: xf})):.2f} ms")
            for label, x in (("float32", xf), ("uint8", xu)):
                before = latency_totals(server.metrics_port)
                client = p50_ms(lambda x=x: c.predict(bench.MODEL_NAME, x, version=version))
                after = latency_totals(server.metrics_port)
                n = after[SERIES[1]] - before[SERIES[1]]
                inside = (after[SERIES[0]] - before[SERIES[0]]) / n * 1e3
                print(f"{label}: client p50 {client:.2f} ms, in the servicer {inside:.2f} ms (mean), "
                      f"outside it {client - inside:.2f} ms")
            print(f"bare ORT p50 again {p50_ms(lambda: sess.run(None, {name: xf})):.2f} ms")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
