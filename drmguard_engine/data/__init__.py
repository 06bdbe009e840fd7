"""Datasets: the benign-dataset file format, synthetic faces, real-dataset loaders and the paper's split."""

from __future__ import annotations

from .benign import BenignSet, load_benign_npz, save_benign_npz, validate_arrays

__all__ = ["BenignSet", "load_benign_npz", "save_benign_npz", "validate_arrays"]
