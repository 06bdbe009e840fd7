"""PNG figures a person looks at to trust a verdict (the paper's figures 2-5), written by ``scan --plots``.

* ``images.png``: benign, reversed-poisoned and residual images (figures 3 and 5), and the best probe's images;
* ``target.png``: the running estimate of the target vector over the reverse-engineering steps (figure 4);
* ``angles.png``: angles between F(x) and each row of H for benign and reversed inputs (figure 2);
* ``loss.png``: the loss terms of equation 5 over the steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data.benign import BenignSet
from .metrics import feature_angles


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(t: torch.Tensor) -> Any:
    x = t.detach().float().cpu().clamp(0, 1)
    return x.permute(1, 2, 0).numpy() if x.shape[0] == 3 else x[0].numpy()


def scan_plots(report: Any, benign: BenignSet, out_dir: Path, *, model: Any = None, n: int = 4) -> list[Path]:
    """Writes the figures for one scan report; returns the paths written."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rev = report.reverse
    x = benign.images[:n].cpu()
    if rev is not None:
        xp = rev.poisoned[:n].detach().cpu()
        rows = [("benign", x), ("reversed poisoned", xp), ("residual |x'-x| (x5)", ((xp - x).abs() * 5).clamp(0, 1))]
        best = min(report.probe_results, key=lambda p: p.variance_ratio) if report.probe_results else None
        if best is not None and best.example is not None:
            rows.append((f"{best.family} probe (held-out)", best.example[:n]))
        fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n, 2.3 * len(rows)), squeeze=False)
        for r, (title, imgs) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                if c < imgs.shape[0]:
                    ax.imshow(_img(imgs[c]), cmap=None if imgs.shape[1] == 3 else "gray")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(title, fontsize=8)
        fig.suptitle(f"{report.verdict}: perturbation ratio {report.perturbation_ratio:.4f} "
                     f"(epsilon {report.threshold:g}); score {report.score:.2f}", fontsize=9)
        fig.tight_layout()
        p = out_dir / "images.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    hist = report.loss_history
    if hist:
        steps = [h["step"] for h in hist]
        keys = sorted(k for k in hist[0] if k.startswith("target_"))
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k in keys:
            ax.plot(steps, [h[k] for h in hist], label=f"mean output {k[len('target_'):]}")
        ax.set_xlabel("reverse-engineering step")
        ax.set_ylabel("degrees")
        ax.set_title("estimated target vector over steps (mean f(x') of the batch)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / "target.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k in ("variance", "l1", "rf", "perturbation_ratio"):
            ax.plot(steps, [max(h[k], 1e-9) for h in hist], label=k)
        ax.set_yscale("log")
        ax.set_xlabel("reverse-engineering step")
        ax.set_title("loss terms of equation 5")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / "loss.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    if model is not None and rev is not None:
        with torch.no_grad():
            k = min(200, len(benign))
            dev = next(iter(model.parameters())).device
            fb = model.features(benign.images[:k].to(dev)).cpu()
            fp = model.features(rev.poisoned[:k].to(dev)).cpu()
            w = model.head.weight.detach().cpu()
            ab, ap = torch.rad2deg(feature_angles(fb, w)), torch.rad2deg(feature_angles(fp, w))
        d = w.shape[0]
        fig, axes = plt.subplots(1, d, figsize=(3.2 * d, 3), squeeze=False)
        for j in range(d):
            ax = axes[0][j]
            ax.scatter(range(k), ab[:, j], s=4, label="benign")
            ax.scatter(range(k), ap[:, j], s=4, label="reversed poisoned")
            ax.set_title(f"angle(F(x), w_{j}) in degrees", fontsize=8)
            ax.set_xlabel("image")
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "angles.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
