"""The compiled k-NN selection: it works where numba cannot cache, and the engine's path choices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from diffaudit import distances as D
from diffaudit.distances import _engine


def test_compiles_without_a_writable_cache() -> None:
    # A read-only install with no writable home: numba finds no cache locator and would refuse cache=True at
    # import; the selection must still compile (in memory) and give exact answers.
    code = """
import numba.core.caching as caching
caching.CacheImpl._locator_classes = []
import numpy as np
from diffaudit import distances as D
x = np.random.default_rng(0).integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
d, i = D.nearest_neighbors(x, x, k=2)
assert (i[:, 0] == np.arange(40)).all() and (d[:, 0] == 0).all(), (d, i)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_int8_pass_is_chosen_only_where_it_is_exact_and_applies(monkeypatch) -> None:
    u8 = np.zeros((2, 3, 8, 8), np.uint8)
    monkeypatch.setattr(_engine, "INT8_FAST_PASS", True)
    assert _engine.geometry("l2", 1, u8).int8
    assert not _engine.geometry("l2", 1, u8.astype(np.float32)).int8  # float images keep the float pass
    big = np.zeros((1, 3, 128, 128), np.uint8)  # 49,152 values per tile: squared distances overflow int32
    assert not _engine.geometry("l2", 1, big).int8
    assert _engine.geometry("tiled", 2, big).int8  # 12,288 values per tile
    monkeypatch.setattr(_engine, "INT8_FAST_PASS", None)
    _engine._int8_matmul_is_faster.cache_clear()
    assert isinstance(_engine._int8_matmul_is_faster(), bool)  # measured on this CPU, either way


def test_large_uint8_rows_fall_back_to_the_float_pass_exactly(monkeypatch) -> None:
    monkeypatch.setattr(_engine, "INT8_FAST_PASS", True)
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (12, 3, 128, 128), dtype=np.uint8)
    q = ref[[2, 5]].copy()
    q[:, 0, 0, 0] ^= 1
    dist, idx = D.nearest_neighbors(q, ref, k=2)
    want = np.sqrt(1 / (3 * 128 * 128)) / 255
    np.testing.assert_array_equal(idx[:, 0], [2, 5])
    np.testing.assert_allclose(dist[:, 0], want, rtol=1e-6)
