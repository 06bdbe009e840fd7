"""Client library of the DRMGuard guard service (``drmguard.v1.Guard``); no torch needed.

>>> from guard_client import GuardClient
>>> with GuardClient("127.0.0.1:50051", token="...") as c:
...     scan_id = c.vet("gaze.onnx", "benign.npz", name="gaze", version="3", task="gaze")
...     outcome = c.wait_admission(scan_id)
"""

from __future__ import annotations

from .arrays import check_images, load_images_npz
from .client import DEFAULT_CHUNK_SIZE, GuardClient
from .errors import GuardError
from .types import (
    FINAL_STATES,
    Admission,
    ModelVersionInfo,
    Prediction,
    ScanEvent,
    ScanInfo,
    VetTicket,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FINAL_STATES",
    "Admission",
    "GuardClient",
    "GuardError",
    "ModelVersionInfo",
    "Prediction",
    "ScanEvent",
    "ScanInfo",
    "VetTicket",
    "check_images",
    "load_images_npz",
]
