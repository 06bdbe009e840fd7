"""The ``--quick`` run of ``benchmarks/paper_tables.py`` end to end: a tiny zoo, every section, every defense.

The two runs (the synthetic zoo, and a zoo built from a real dataset's file layout) are independent
single-threaded processes, so the module starts both at once and each test waits for its own: on the 2-core CI
machine they take the time of the longer one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy(200)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "paper_tables.py")


class Run:
    """One ``paper_tables.py`` process started in the background; :meth:`wait` gives its return code and stderr."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self._err = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err, text=True, cwd=ROOT)

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._err.close()
        return rc, self.log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Run, Path]]]:
    synth = tmp_path_factory.mktemp("synthetic")
    real = tmp_path_factory.mktemp("real")
    _biwi_fixture(real / "biwi", 120)
    started = {
        "synthetic": (Run([sys.executable, SCRIPT, "--quick", "--out", str(synth / "results")], synth / "stderr"),
                      synth),
        "real": (Run([sys.executable, SCRIPT, "--quick", "--tasks", "headpose", "--sections", "identification",
                      "mitigation", "--real", f"biwi={real / 'biwi'}", "--out", str(real / "results")],
                     real / "stderr"), real),
    }
    yield started
    for run, _ in started.values():  # a deselected or failed test never waited: end the process, close its log
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=30)
        run._err.close()


@pytest.mark.timeout(900)
def test_quick_tables_end_to_end(runs: dict[str, tuple[Run, Path]]) -> None:
    run, root = runs["synthetic"]
    out, cmd = root / "results", run.cmd
    rc, err = run.wait(timeout=880)
    assert rc == 0, err[-3000:]
    md = (out / "paper_tables.md").read_text()
    for heading in ("## Identification", "## Mitigation", "## Ablations"):
        assert heading in md
    ident = json.loads((out / "paper_tables_identification.json").read_text())
    methods = {r["method"] for r in ident}
    assert {"default", "neural_cleanse", "featurere"} <= methods and any(m.startswith("paper@") for m in methods)
    # every method sees both benign models and the backdoored ones (the slow paper profile: one of each, by
    # default), each with a score oriented as documented
    for m in methods:
        rows = [r for r in ident if r["method"] == m]
        n_benign = 1 if m.startswith("paper@") else 2
        assert sum(r["backdoored"] for r in rows) >= 1 and sum(not r["backdoored"] for r in rows) == n_benign
        for r in rows:
            assert (r["verdict"] == "backdoored") == (r["score"] >= r["score_threshold"])
    mit = json.loads((out / "paper_tables_mitigation.json").read_text())
    assert {r["method"] for r in mit} == {"undefended", "drmguard", "drmguard_labels", "fine_tuning", "fine_pruning", "anp"}
    assert all(r["ae"] >= 0 and r["dae"] >= 0 and r["re"] >= 0 for r in mit)
    # a second run resumes from the cache: nothing is recomputed, the tables are identical
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "reverse engineering" not in proc2.stderr and "mitigation " not in proc2.stderr
    assert json.loads((out / "paper_tables_identification.json").read_text()) == ident


def _biwi_fixture(root: Path, n: int) -> None:
    """Biwi's cropped-face layout (``frame_XXXXX_rgb.png`` + ``frame_XXXXX_pose.txt``), synthetic faces turned by
    the yaw the pose file gives (pitch and roll 0), so the labels match the images."""
    import math

    import numpy as np
    from PIL import Image

    from drmguard_engine.data.synthetic import make_dataset

    rng = np.random.default_rng(0)
    yaws = rng.uniform(-40, 40, n)
    images, _ = make_dataset("headpose", n, size=48, seed=3,
                             labels=np.stack([yaws, np.zeros(n), np.zeros(n)], 1).astype(np.float32))
    for i, (img, yaw) in enumerate(zip(images, yaws, strict=True)):
        d = root / "01"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"frame_{i:05d}_rgb.png")
        t = math.radians(float(yaw))
        rot = [[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]]
        text = "\n".join(" ".join(f"{v:.6f}" for v in row) + " " for row in rot) + "\n\n12.1 -3.4 900.2 \n"
        (d / f"frame_{i:05d}_pose.txt").write_text(text)


@pytest.mark.timeout(900)
def test_quick_tables_on_a_real_dataset_layout(runs: dict[str, tuple[Run, Path]]) -> None:
    """``--real biwi=DIR`` builds a zoo from the dataset's own files (80/10/10 split) and tabulates it."""
    run, root = runs["real"]
    out, cmd = root / "results", run.cmd
    rc, err = run.wait(timeout=880)
    assert rc == 0, err[-3000:]
    ident = json.loads((out / "paper_tables_identification.json").read_text())
    assert {r["task"] for r in ident} == {"headpose/biwi"}
    assert {r["seed"] for r in ident if r["kind"] == "benign"} == {0, 1}
    md = (out / "paper_tables.md").read_text()
    assert "### headpose/biwi" in md
    metas = [json.loads(m.read_text()) for m in (out / "zoo-biwi").rglob("meta.json")]
    assert sorted(m["kind"] for m in metas) == ["badnets", "benign", "benign"]
    assert {m["dataset"] for m in metas} == {"biwi"} and all(m["metrics"]["re"] > 0 for m in metas)
    # at this size the BadNets model may not implant: then it is listed as left out, never counted as positive
    bd = next(m for m in metas if m["kind"] == "badnets")
    implanted = bd["metrics"]["ae"] <= 2 * bd["metrics"]["re"]
    assert any(r["kind"] == "badnets" for r in ident) == implanted
    assert implanted or "headpose/badnets" in md.split("## Identification")[0]
    bad = subprocess.run([*cmd[:-2], "--real", "biwi=/nonexistent", "--out", str(out)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "NAME=DIR" in bad.stderr
