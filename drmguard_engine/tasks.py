"""The two regression tasks, their label order, units and regression errors.

Labels and model outputs are in **degrees**, in the task's order:
gaze (pitch, yaw); head pose (yaw, pitch, roll). (The paper's text says "yaw and pitch" for gaze; we
follow the authors' code and the MPIIFaceGaze tools, which use (pitch, yaw).)
"""

from __future__ import annotations

import enum

import torch

from .errors import ConfigError


class Task(str, enum.Enum):
    GAZE = "gaze"
    HEADPOSE = "headpose"

    @property
    def dim(self) -> int:
        return 2 if self is Task.GAZE else 3

    @property
    def label_names(self) -> tuple[str, ...]:
        return ("pitch", "yaw") if self is Task.GAZE else ("yaw", "pitch", "roll")

    @classmethod
    def parse(cls, value: str | Task) -> Task:
        if isinstance(value, Task):
            return value
        try:
            return cls(str(value).strip().lower().replace("_", "").replace("-", ""))
        except ValueError:
            raise ConfigError(f"unknown task {value!r}: use 'gaze' or 'headpose'") from None


def gaze_vectors(pitch_yaw_deg: torch.Tensor) -> torch.Tensor:
    """(N,2) (pitch, yaw) in degrees -> (N,3) unit vectors (cos p sin y, sin p, cos p cos y)."""
    r = torch.deg2rad(pitch_yaw_deg.double())
    p, y = r[:, 0], r[:, 1]
    return torch.stack((torch.cos(p) * torch.sin(y), torch.sin(p), torch.cos(p) * torch.cos(y)), dim=1)


def per_sample_error(task: Task | str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample regression error in degrees.

    Gaze: the angle between the 3-D gaze vectors. Head pose: the mean absolute error over the three angles.
    """
    task = Task.parse(task)
    pred = pred.detach().reshape(pred.shape[0], -1)
    target = target.detach().reshape(target.shape[0], -1).to(pred.dtype)
    if target.shape[0] == 1 and pred.shape[0] > 1:
        target = target.expand(pred.shape[0], -1)
    if task is Task.GAZE:
        a, b = gaze_vectors(pred), gaze_vectors(target)
        cos = (a * b).sum(1).clamp(-1.0, 1.0)
        return torch.rad2deg(torch.arccos(cos)).float()
    return (pred - target).abs().mean(1).float()


def regression_error(task: Task | str, pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean regression error in degrees (RE against true labels, AE against y_T, DAE on poisoned inputs)."""
    return float(per_sample_error(task, pred, target).mean())
