"""Shared fixtures. Tests run on CPU with tiny models; torch uses one thread so timings do not thrash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Feature-extractor caches go to a per-session temporary directory, never the user's home."""
    monkeypatch.setenv("DIFFAUDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_images() -> np.ndarray:
    """A deterministic uint8 stack (12, 1, 8, 8)."""
    return np.random.default_rng(0).integers(0, 256, size=(12, 1, 8, 8), dtype=np.uint8)


@pytest.fixture(params=["int8", "float32", "torch-selection"])
def every_engine_path(request, monkeypatch) -> str:
    """Run a distance test on each engine path: the exact integer pass and the float32 pass with the fused
    CPU selection, and the float32 pass with the torch selection that CUDA tensors use."""
    from diffaudit.distances import _engine, _knn_fused

    monkeypatch.setattr(_engine, "INT8_FAST_PASS", request.param == "int8")
    monkeypatch.setattr(_knn_fused, "ENABLED", request.param != "torch-selection")
    return request.param
