"""``make demo``: the guard service end to end on this machine, in a few minutes on a CPU.

1. starts ``drmguard-server`` on free loopback ports with a temporary data directory;
2. trains two small gaze models on synthetic faces: a clean one and one with a BadNets backdoor,
   and exports both to ONNX (what a model registry would submit);
3. vets both through ``VetModel`` with the ``drmguard`` command line (live progress on stderr) and shows
   the verdicts and what mitigation did with the backdoored one;
4. calls ``Predict`` on the admitted versions, on clean images and on images carrying the trigger;
5. prints where the metrics are and a few metric lines, then stops the server with SIGTERM and removes
   everything it started.

Run: ``python -m guard_server.demo`` (``--help`` for the knobs; ``--keep`` keeps the data directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SERVER_BOOT = "import sys; from guard_server.cli import main; sys.exit(main())"
CLIENT_BOOT = "import sys; from guard_client.cli import main; sys.exit(main())"
MODEL_NAME = "driver-gaze"
METRIC_PREFIXES = (
    "drmguard_scans_total",
    "drmguard_mitigations_total",
    "drmguard_backdoors_detected_total",
    "drmguard_served_model_info",
    "drmguard_predict_requests_total",
    "drmguard_inference_execution_provider_info",
)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _title(msg: str) -> None:
    _say()
    _say(f"== {msg}")


def free_port() -> int:
    """A currently free loopback TCP port (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``drmguard-server`` as a child process in its own process group, stopped with SIGTERM."""

    def __init__(self, data_dir: Path, *, device: str, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "server.log"
        self._log = self.log_path.open("wb")
        cmd = [
            sys.executable, "-c", SERVER_BOOT,
            "--listen", self.address,
            "--metrics-port", str(self.metrics_port),
            "--data-dir", str(data_dir),
            "--device", device,
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def wait_serving(self, timeout: float) -> None:
        """Waits until grpc.health.v1 answers SERVING; raises RuntimeError with the log tail otherwise."""
        from guard_client import GuardClient, GuardError

        deadline = time.monotonic() + timeout
        with GuardClient(self.address, timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"drmguard-server exited with status {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    if c.health() == "SERVING":
                        return
                except GuardError:
                    pass
                time.sleep(0.3)
        raise RuntimeError(f"drmguard-server did not report SERVING within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds (the server drains), then SIGKILL as a last resort."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def make_models(
    work: Path, *, task: str, size: int, width: float, steps: int, n_train: int, n_benign: int, seed: int,
    threads: int = 1,
) -> dict[str, Any]:
    """Trains the clean and the backdoored demo model; writes the ONNX files and the benign set."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from drmguard_engine.attacks import get_attack
    from drmguard_engine.data.benign import save_benign_npz
    from drmguard_engine.data.synthetic import make_dataset
    from drmguard_engine.models import build_model
    from drmguard_engine import parallel
    from drmguard_engine.onnx_io import export_onnx
    from drmguard_engine.training import train

    torch.manual_seed(seed)
    images, labels = make_dataset(task, n_train + n_benign + 64, size=size, seed=seed)
    train_x, train_y = images[:n_train], labels[:n_train]
    benign_x, benign_y = images[n_train : n_train + n_benign], labels[n_train : n_train + n_benign]
    test_x, test_y = images[n_train + n_benign :], labels[n_train + n_benign :]
    benign_path = work / "benign.npz"
    save_benign_npz(benign_path, benign_x, benign_y)

    attack = get_attack("badnets", task=task, image_shape=(3, size, size), target=None, seed=seed, poison_rate=0.1)
    out: dict[str, Any] = {"benign": benign_path, "test_x": test_x, "test_y": test_y, "attack": attack}
    kinds = {"clean": None, "backdoored": attack}
    # built here, one after the other: the initial weights come from the seeded global generator
    models = {kind: build_model("resnet18", task, input_size=size, width=width, seed=seed) for kind in kinds}
    shown: dict[str, str] = {}
    said = threading.Lock()
    last = [0.0]
    t0 = time.monotonic()

    def train_one(kind: str) -> None:
        if threads > 0:
            torch.set_num_threads(threads)  # per thread: OpenMP gives a new thread the default count

        def progress(p: Any) -> None:
            with said:
                now = time.monotonic()
                shown[kind] = f"{kind} step {p.step}/{p.total} loss {p.loss:.3f}"
                if now - last[0] >= 2.0 or p.step >= p.total:
                    last[0] = now
                    sys.stderr.write(f"\r  training {', '.join(shown.values())} ({now - t0:.0f} s)   ")
                    sys.stderr.flush()

        train(models[kind], train_x, train_y, task=task, steps=steps, attack=kinds[kind], seed=seed,
              progress=progress)

    # Side by side where the cores allow (each trains with its own seeded batches, so the models do not depend on
    # it): the two trainings are most of the demo's wait before the first scan.
    side_by_side = threads > 0 and parallel.side_by_side(threads) >= 2
    if side_by_side:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="demo-train") as pool:
            for f in [pool.submit(train_one, kind) for kind in kinds]:
                f.result()
    else:
        for kind in kinds:
            train_one(kind)
    sys.stderr.write("\n")
    for kind, model in models.items():
        path = work / f"{kind}.onnx"
        export_onnx(model.cpu().eval(), path, input_shape=(3, size, size))
        out[kind] = path
        _say(f"  {kind} model: {path.name} ({path.stat().st_size / 1e6:.2f} MB)")
    _say(f"  trained in {time.monotonic() - t0:.0f} s" + (" (side by side)" if side_by_side else ""))
    return out


def run_cli(address: str, *args: str, json_out: bool = True) -> dict[str, Any]:
    """Runs the ``drmguard`` command line (progress goes to our stderr); returns its JSON object."""
    cmd = [sys.executable, "-c", CLIENT_BOOT, "--server", address, *args] + (["--json"] if json_out else [])
    shown = " ".join(["drmguard", "--server", address, *args] + (["--json"] if json_out else []))
    _say(f"$ {shown}")
    res = subprocess.run(cmd, stdout=subprocess.PIPE if json_out else None, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"drmguard {args[0]} failed with exit status {res.returncode}")
    return json.loads(res.stdout) if json_out else {}


def _gaze_error(pred: np.ndarray, target: np.ndarray, task: str) -> float:
    import torch

    from drmguard_engine.tasks import regression_error

    return float(regression_error(task, torch.from_numpy(np.array(pred, np.float32)),
                                  torch.from_numpy(np.array(target, np.float32))))


def show_predictions(address: str, models: dict[str, Any], outcomes: dict[str, dict[str, Any]], task: str) -> None:
    """Predict on clean and triggered test images with every admitted version; compare with the target."""
    import torch

    from guard_client import GuardClient

    attack = models["attack"]
    clean_x = models["test_x"]
    trig = attack.apply(torch.from_numpy(clean_x).float() / 255.0).clamp(0, 1).numpy().astype(np.float32)
    target = attack.target.numpy()
    ys = models["test_y"]
    with GuardClient(address) as c:
        for kind, out in outcomes.items():
            version = out.get("admitted_version")
            if out.get("state") != "ADMITTED" or not version:
                _say(f"  {kind}: nothing admitted ({out.get('state')}); Predict refuses it (fail closed)")
                continue
            p_clean = c.predict(MODEL_NAME, clean_x, version=version)
            p_trig = c.predict(MODEL_NAME, trig, version=version)
            re = _gaze_error(p_clean, ys, task)
            ae = _gaze_error(p_trig, np.broadcast_to(target, p_trig.shape), task)
            dae = _gaze_error(p_trig, ys, task)
            _say(f"  version {version:<22} clean error {re:6.2f} deg | triggered: error {dae:6.2f} deg, "
                 f"distance to the attacker's target {ae:6.2f} deg")
        # The submitted backdoored bytes must never answer: ask for that version explicitly.
        sub = outcomes.get("backdoored", {}).get("submitted_version")
        if sub and outcomes["backdoored"].get("admitted_version") != sub:
            from guard_client import GuardError

            try:
                c.predict(MODEL_NAME, clean_x[:1], version=sub)
                _say(f"  !! version {sub} (backdoored) answered Predict: it should not")
            except GuardError as exc:
                _say(f"  version {sub} (submitted, backdoored): Predict refused: {exc.code.name}")


def show_metrics(metrics_port: int) -> None:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    _say(f"  Prometheus metrics: {url}")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError as exc:
        _say(f"  (could not read {url}: {exc})")
        return
    shown = [ln for ln in text.splitlines() if ln.startswith(METRIC_PREFIXES)]
    for ln in shown[:16]:
        _say(f"    {ln}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m guard_server.demo", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, the zoo's size)")
    p.add_argument("--width", type=float, default=0.25, help="ResNet18 width multiplier (default 0.25)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per demo model (default 1000)")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--benign-images", type=int, default=300, help="size of the benign set sent with each model")
    p.add_argument("--profile", default="default", help="scan profile (default: default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for training the demo models and for each piece of a scan (the server's "
                        "--scan-threads); default 1: on a small, shared CPU one thread avoids OpenMP stalls when "
                        "other processes compete, and the two models train side by side, as do the pieces of each "
                        "scan (the server's --scan-parallel), where the cores allow; 0 = torch's default")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (models, data, log)")
    return p.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the ``finally`` blocks, so the server we started is stopped too.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    task = "gaze"
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="drmguard-demo-"))
    server: ServerProcess | None = None
    try:
        _title("1. starting drmguard-server (CPU, temporary data directory)")
        server = ServerProcess(work / "data", device=args.device,
                               extra=("--scan-threads", str(args.threads)) if args.threads > 0 else ())
        _say(f"  listening on {server.address}, metrics on :{server.metrics_port}, log {server.log_path}")

        # Train while the server starts: both are slow to import, and the CPU is the bottleneck anyway.
        _title(f"2. training a clean and a backdoored (BadNets) gaze model, ResNet18 x{args.width}, "
               f"{args.size}x{args.size} px, {args.steps} steps each")
        models = make_models(
            work, task=task, size=args.size, width=args.width, steps=args.steps,
            n_train=args.train_images, n_benign=args.benign_images, seed=args.seed, threads=args.threads,
        )
        server.wait_serving(timeout=60)
        run_cli(server.address, "health", json_out=False)

        _title("3. vetting both through VetModel (scan, then admission or mitigation)")
        outcomes: dict[str, dict[str, Any]] = {}
        for kind, version in (("clean", "1"), ("backdoored", "2")):
            _say(f"-- {kind} model as {MODEL_NAME} version {version}")
            outcomes[kind] = out = run_cli(
                server.address, "vet", "--model", str(models[kind]), "--benign", str(models["benign"]),
                "--name", MODEL_NAME, "--version", version, "--task", task, "--profile", args.profile, "--wait",
            )
            ratio = out.get("perturbation_ratio")
            _say(f"  verdict {out.get('verdict')} (perturbation ratio "
                 f"{'n/a' if ratio is None else f'{ratio:.4f}'}), state {out.get('state')}"
                 + (f", mitigated and admitted as version {out.get('admitted_version')}" if out.get("mitigated") else "")
                 + (f"; reason: {out['reason']}" if out.get("reason") else ""))
            if out.get("clean_error_before") is not None and out.get("clean_error_after") is not None:
                _say(f"  clean error on benign images the repair never saw (cross-validated): "
                     f"{out['clean_error_before']:.2f} deg before, {out['clean_error_after']:.2f} deg after mitigation")
            _say(f"  {MODEL_NAME} now serves version {out.get('version')}")
        _say()
        run_cli(server.address, "models", json_out=False)

        _title("4. Predict on the admitted versions (64 held-out images, clean and with the trigger)")
        show_predictions(server.address, models, outcomes, task)

        _title("5. metrics")
        show_metrics(server.metrics_port)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure in one line, then cleans up
        _say(f"demo failed: {type(exc).__name__}: {exc}")
        if server is not None:
            _say(f"server log tail:\n{server.log_tail()}")
        return 1
    finally:
        if server is not None:
            _title("6. stopping the server (SIGTERM: drain, then stop)")
            rc = server.stop()
            _say(f"  drmguard-server exited with status {rc}")
        if args.keep:
            _say(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        _say(f"  demo took {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
