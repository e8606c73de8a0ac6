"""The compiled k-NN selection: it works where numba cannot cache, and the engine's path choices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from diffaudit import distances as D
from diffaudit.distances import _engine


def test_compiles_without_a_writable_cache() -> None:
    # A read-only install with no writable home: numba finds no cache locator and would refuse cache=True at
    # import; the selection must still compile (in memory) and give exact answers.
    code = """
import numba.core.caching as caching
caching.CacheImpl._locator_classes = []
import numpy as np
import pytest
import torch
from diffaudit import distances as D
x = np.random.default_rng(0).integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
d, i = D.nearest_neighbors(x, x, k=2)
assert (i[:, 0] == np.arange(40)).all() and (d[:, 0] == 0).all(), (d, i)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_int8_pass_is_chosen_only_where_it_is_exact_and_applies(monkeypatch) -> None:
    from diffaudit.distances._operand import exact_dtype

    u8 = np.zeros((2, 3, 8, 8), np.uint8)
    monkeypatch.setattr(_engine, "INT8_FAST_PASS", True)
    assert _engine.geometry("l2", 1, u8).int8
    assert not _engine.geometry("l2", 1, u8.astype(np.float32)).int8  # float images keep the float pass
    wide = np.zeros((1, 3, 128, 128), np.uint8)  # 49,152 values: squared distances leave int32
    assert _engine.geometry("l2", 1, wide).int8 and exact_dtype(_engine.geometry("l2", 1, wide)) == torch.int64
    assert exact_dtype(_engine.geometry("tiled", 2, wide)) == torch.int32  # 12,288 values per tile
    huge = np.zeros((1, 3, 256, 256), np.uint8)  # 196,608 values: int8 dot products leave int32
    assert not _engine.geometry("l2", 1, huge).int8
    monkeypatch.setattr(_engine, "INT8_FAST_PASS", None)
    _engine._int8_matmul_is_faster.cache_clear()
    assert isinstance(_engine._int8_matmul_is_faster(), bool)  # measured on this CPU, either way


@pytest.mark.parametrize("side", [128, 256])
def test_long_rows_are_exact_on_int64_assembly_and_on_the_float_fallback(monkeypatch, side: int) -> None:
    # 3x128x128 rows: int8 dot products with squared distances assembled in int64; 3x256x256: the float pass.
    monkeypatch.setattr(_engine, "INT8_FAST_PASS", True)
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (12, 3, side, side), dtype=np.uint8)
    ref[2] = rng.integers(0, 2, ref[2].shape, dtype=np.uint8) * 255
    ref[7] = 255 - ref[2]  # a far pair: its squared distance (255^2 per value) is above 2^31 at 3x128x128
    q = ref[[2, 5]].copy()
    q[:, 0, 0, 0] ^= 1
    dist, idx = D.nearest_neighbors(q, ref, k=12)
    want_sq = ((q[:, None].astype(np.int64) - ref[None]) ** 2).reshape(2, 12, -1).sum(-1)
    np.testing.assert_array_equal(idx, np.argsort(want_sq, 1, kind="stable"))
    assert want_sq.max() > 2**31
    np.testing.assert_allclose(dist, np.sqrt(np.sort(want_sq, 1) / (3 * side * side)) / 255, rtol=1e-6)
    pair = D.pairwise_distances(q, ref, metric="l2")
    np.testing.assert_allclose(pair, np.sqrt(want_sq / (3 * side * side)) / 255, rtol=1e-6)
