"""DRMGuard engine: a plain PyTorch library (no gRPC) for backdoor scans of deep regression models.

Paper: Du, Liu, Jia, Lan, "Defending Deep Regression Models against Backdoor Attacks" (arXiv 2411.04811).
"""

from __future__ import annotations

from .errors import CancelledError, ConfigError, DataError, DRMGuardError, InspectionError, UnsupportedModelError
from .tasks import Task, regression_error

__version__ = "0.1.0"

__all__ = [
    "CancelledError",
    "ConfigError",
    "DataError",
    "DRMGuardError",
    "InspectionError",
    "Task",
    "UnsupportedModelError",
    "regression_error",
]
