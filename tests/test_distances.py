"""Blocked distances equal brute force, near-copies are exact, uint8 is scaled, bad sizes are rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffaudit import distances as D
from diffaudit.errors import ConfigError, DataError

# Every test runs on every engine path (int8 and float32 fast passes, fused and torch selections).
pytestmark = pytest.mark.usefixtures("every_engine_path")


def _naive_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.sqrt(((a64 - b64) ** 2).sum() / a64.size))


def _naive_tiled(a: np.ndarray, b: np.ndarray, grid: int) -> float:
    _, h, w = a.shape
    th, tw = h // grid, w // grid
    best = 0.0
    for i in range(grid):
        for j in range(grid):
            ta = a[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            tb = b[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            best = max(best, _naive_l2(ta, tb))
    return best


def _naive_matrix(x: np.ndarray, y: np.ndarray, fn) -> np.ndarray:
    return np.array([[fn(a, b) for b in y] for a in x])


def _images(rng: np.random.Generator, n: int, shape=(3, 8, 8)) -> np.ndarray:
    return rng.random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_pairwise_l2_equals_brute_force(block: int) -> None:
    rng = np.random.default_rng(0)
    x, y = _images(rng, 9), _images(rng, 11)
    y[4] = x[2]  # an exact copy must come out as 0
    got = D.pairwise_l2(x, y, block=block)
    want = _naive_matrix(x, y, _naive_l2)
    assert got.shape == (9, 11) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[2, 4] == 0.0


@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("grid", [1, 2, 4])
def test_pairwise_tiled_equals_brute_force(block: int, grid: int) -> None:
    rng = np.random.default_rng(1)
    x, y = _images(rng, 6), _images(rng, 5)
    got = D.pairwise_tiled_l2(x, y, grid=grid, block=block)
    want = _naive_matrix(x, y, lambda a, b: _naive_tiled(a, b, grid))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tiled_is_max_over_tiles_not_mean() -> None:
    # Two images identical except one tile: global L2 is small, tiled L2 sees the changed tile fully.
    a = np.zeros((1, 1, 8, 8), dtype=np.float32)
    b = a.copy()
    b[0, 0, :2, :2] = 1.0
    assert D.tiled_l2(a, b, grid=4)[0] == pytest.approx(1.0)
    assert D.normalized_l2(a, b)[0] == pytest.approx(np.sqrt(4 / 64))


def test_cancellation_near_copies_are_exact() -> None:
    # a known pitfall of the fast path: the matmul identity gives ~1e-3 here; the true value is 1e-5.
    a = np.full((1, 3, 64, 64), 0.75, dtype=np.float32)
    b = np.full((1, 3, 64, 64), np.float32(0.75) + np.float32(1e-5), dtype=np.float32)
    true = float(np.float32(0.75) + np.float32(1e-5)) - 0.75
    for got in (
        D.pairwise_l2(a, b)[0, 0],
        D.pairwise_tiled_l2(a, b)[0, 0],
        D.normalized_l2(a, b)[0],
        D.nearest_neighbors(a, b, metric="l2")[0][0, 0],
        D.nearest_neighbors(a, b, metric="tiled")[0][0, 0],
    ):
        assert got == pytest.approx(true, rel=1e-3)


def test_cancellation_inside_a_mixed_set() -> None:
    # Centering on one set is not enough by itself: bright near-copies among dark images.
    rng = np.random.default_rng(2)
    ref = (rng.random((20, 3, 16, 16)) * 0.2).astype(np.float32)
    ref[7] = 0.9
    ref[12] = ref[7] + np.float32(3e-5)
    q = ref[7:8] + np.float32(1e-5)
    dist, idx = D.nearest_neighbors(q, ref, k=2, block_r=5)
    # The fast pass cannot tell 1e-5 from 2e-5; the exact re-ranking must.
    np.testing.assert_array_equal(idx[0], [7, 12])
    np.testing.assert_allclose(dist[0], [1e-5, 2e-5], rtol=2e-2)
    assert D.pairwise_tiled_l2(q, ref)[0, 7] == pytest.approx(1e-5, rel=1e-2)


def test_uint8_is_scaled() -> None:
    black = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    white = np.full((1, 3, 8, 8), 255, dtype=np.uint8)
    assert D.normalized_l2(black, white)[0] == pytest.approx(1.0)
    assert D.tiled_l2(black, white)[0] == pytest.approx(1.0)
    assert D.pairwise_l2(black, white)[0, 0] == pytest.approx(1.0)
    assert D.nearest_neighbors(black, white)[0][0, 0] == pytest.approx(1.0)
    u = D.as_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert u.dtype == torch.float32
    np.testing.assert_allclose(u.numpy(), [0.0, 0.2, 1.0])


def test_uint8_and_float_agree() -> None:
    rng = np.random.default_rng(3)
    x8 = rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    y8 = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    got8 = D.pairwise_tiled_l2(x8, y8, grid=2)
    gotf = D.pairwise_tiled_l2(torch.from_numpy(x8) / 255.0, y8.astype(np.float32) / 255, grid=2)
    np.testing.assert_allclose(got8, gotf, rtol=1e-5)


def test_bad_inputs_rejected() -> None:
    x = np.zeros((2, 3, 10, 10), dtype=np.float32)
    with pytest.raises(DataError, match="10x10.*grid 4"):
        D.pairwise_tiled_l2(x, x, grid=4)
    with pytest.raises(DataError, match="10x10"):
        D.tiled_l2(x, x, grid=3)
    with pytest.raises(DataError, match="10x10"):
        D.nearest_neighbors(x, x, metric="tiled", grid=4)
    with pytest.raises(DataError, match=r"\[-1"):
        D.normalized_l2(x - 1.0, x)
    with pytest.raises(DataError, match="int32"):
        D.as_unit_float(np.zeros(3, dtype=np.int32))
    with pytest.raises(ConfigError, match="cosine"):
        D.nearest_neighbors(x, x, metric="cosine")
    with pytest.raises(DataError, match="k=3"):
        D.nearest_neighbors(x, x, k=3)
    with pytest.raises(DataError, match="shapes"):
        D.pairwise_l2(x, np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ConfigError, match="block"):
        D.pairwise_l2(x, x, block=0)


@pytest.mark.parametrize("metric", ["l2", "tiled", "euclidean"])
def test_nearest_neighbors_equals_brute_force_any_block(metric: str) -> None:
    rng = np.random.default_rng(4)
    if metric == "euclidean":
        q, r = rng.normal(size=(13, 6)).astype(np.float32), rng.normal(size=(17, 6)).astype(np.float32) + 3
        full = np.sqrt(((q[:, None].astype(np.float64) - r[None]) ** 2).sum(-1))
    else:
        q, r = _images(rng, 13), _images(rng, 17)
        fn = _naive_l2 if metric == "l2" else (lambda a, b: _naive_tiled(a, b, 4))
        full = _naive_matrix(q, r, fn)
    want_idx = np.argsort(full, axis=1, kind="stable")[:, :3]
    want = np.take_along_axis(full, want_idx, 1)
    results = [
        D.nearest_neighbors(q, r, k=3, metric=metric, block_q=bq, block_r=br)
        for bq, br in [(1, 1), (4, 5), (100, 100), (13, 2)]
    ]
    for dist, idx in results:
        assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == (13, 3)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_allclose(dist, want, rtol=1e-6)
        np.testing.assert_array_equal(dist, results[0][0])  # bit-identical whatever the blocks


def test_knn_radii_excludes_self_but_not_duplicates() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    full = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    for k in (1, 3):
        want = np.sort(full, axis=1)[:, k]  # column 0 is the row itself
        for block in (1, 7, 64):
            np.testing.assert_allclose(D.knn_radii(x, k, block=block), want, rtol=1e-12)
    dup = np.concatenate([x[:5], x[:1]])
    r = D.knn_radii(dup, 1)
    assert r[0] == 0.0 and r[5] == 0.0 and r[1] > 0
    d, i = D.nearest_neighbors(dup, dup, k=1, metric="euclidean", exclude_self=True, block_q=2, block_r=3)
    assert i[0, 0] == 5 and i[5, 0] == 0 and d[0, 0] == 0
    assert all(i[j, 0] != j for j in range(6))


def test_count_within_radii_equals_brute_force() -> None:
    rng = np.random.default_rng(6)
    q = rng.normal(size=(40, 5)).astype(np.float32)
    r = rng.normal(size=(25, 5)).astype(np.float32)
    full = np.sqrt(((q[:, None].astype(np.float64) - r[None]) ** 2).sum(-1))
    radii = np.quantile(full, 0.3, axis=0)
    # Radii a hair above / below a distance: float32 cannot resolve these, only the exact path can.
    radii[3] = full[0, 3] * (1 + 1e-9)
    radii[5] = full[1, 5] * (1 - 1e-9)
    want = (full < radii[None]).sum(1)
    for bq, br in [(1, 1), (8, 3), (64, 64)]:
        np.testing.assert_array_equal(D.count_within_radii(q, r, radii, block_q=bq, block_r=br), want)


def test_large_offset_features_are_exact() -> None:
    # Features far from the origin: without centering and recompute the identity loses everything.
    rng = np.random.default_rng(7)
    base = rng.normal(size=(1, 32)) * 1e3
    x = (base + rng.normal(size=(20, 32)) * 1e-2).astype(np.float32)
    full = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    got = D.pairwise_distances(x, x, metric="euclidean", block=6)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    block=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 1e-3, 1e-6]),
)
def test_property_pairwise_matches_elementwise(n: int, m: int, block: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = _images(rng, n, (1, 4, 4)) * 0.5
    y = np.clip(x[rng.integers(0, n, m)] + scale * rng.random((m, 1, 4, 4)), 0, 1).astype(np.float32)
    got = D.pairwise_tiled_l2(x, y, grid=2, block=block)
    for i in range(n):
        want = D.tiled_l2(np.repeat(x[i : i + 1], m, 0), y, grid=2)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-9)


def test_streamed_reference_equals_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small reference sets are converted once and cached; large ones are streamed. Both must agree exactly.
    rng = np.random.default_rng(8)
    q = rng.integers(0, 256, (9, 3, 8, 8), dtype=np.uint8)
    r = rng.integers(0, 256, (14, 3, 8, 8), dtype=np.uint8)
    r[5] = q[2]
    cached = (D.nearest_neighbors(q, r, k=3, metric="tiled", block_r=4), D.pairwise_l2(q, r, block=4))
    monkeypatch.setattr(D, "REF_CACHE_BYTES", 0)
    streamed = (D.nearest_neighbors(q, r, k=3, metric="tiled", block_r=4), D.pairwise_l2(q, r, block=4))
    np.testing.assert_array_equal(cached[0][0], streamed[0][0])
    np.testing.assert_array_equal(cached[0][1], streamed[0][1])
    np.testing.assert_array_equal(cached[1], streamed[1])
    assert streamed[0][1][2, 0] == 5 and streamed[0][0][2, 0] == 0.0
