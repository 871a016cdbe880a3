"""Shared fixtures of the Python suite: a fresh CPU backend and a small weight file."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import moeflux


@pytest.fixture
def be() -> moeflux.Backend:
    """A fresh CPU backend with no weight file."""
    return moeflux.Backend("cpu")


@pytest.fixture
def weight_path(tmp_path: Path) -> Path:
    """A small weight file: a float32 vector, a bf16 vector and a quantized [8, 64] matrix."""
    rng = np.random.default_rng(7)
    path = tmp_path / "weights.bin"
    with moeflux.WeightWriter(path) as w:
        w.add("norm", rng.standard_normal(64).astype(np.float32))
        w.add("norm_bf16", rng.standard_normal(64).astype(ml_dtypes.bfloat16))
        w.add_quantized("proj", rng.standard_normal((8, 64)).astype(np.float32), group_size=64, bits=4)
    return path
