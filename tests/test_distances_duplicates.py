"""Blocked results equal brute force and do not depend on any block size, with many exact duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffaudit import distances as D
from diffaudit.distances._knn import _GROUP, select_le

# Every test runs on every engine path (int8 and float32 fast passes, fused and torch selections).
pytestmark = pytest.mark.usefixtures("every_engine_path")

BLOCKS = [(1, 1), (3, 5), (7, 64), (64, 2), (17, 33), (1000, 1000)]


def _raw_sq(q: np.ndarray, r: np.ndarray, metric: str, grid: int = 2) -> np.ndarray:
    """Brute-force squared distances (Nq, Nr) in exact integer units for uint8, float64 otherwise (unscaled)."""
    if q.dtype == np.uint8:
        qa, ra = q.astype(np.int64), r.astype(np.int64)
    else:
        qa, ra = q.astype(np.float64), r.astype(np.float64)
    diff2 = (qa[:, None] - ra[None]) ** 2  # (Nq, Nr, ...)
    if metric == "tiled":
        n, m, c, h, w = diff2.shape
        per_tile = diff2.reshape(n, m, c, grid, h // grid, grid, w // grid).sum(axis=(2, 4, 6))
        return per_tile.reshape(n, m, -1).max(-1)
    return diff2.reshape(len(q), len(r), -1).sum(-1)


def _scale(q: np.ndarray, metric: str, grid: int = 2) -> float:
    per = int(np.prod(q.shape[1:])) // (grid * grid if metric == "tiled" else 1)
    unit = 255.0**2 if q.dtype == np.uint8 else 1.0
    return 1.0 / per / unit if metric != "euclidean" else 1.0


def _want(q: np.ndarray, r: np.ndarray, k: int, metric: str, exclude_self: bool = False):
    sq = _raw_sq(q, r, metric)
    if exclude_self:
        sq = sq.astype(np.float64)
        np.fill_diagonal(sq, np.inf)
    idx = np.argsort(sq, axis=1, kind="stable")[:, :k]  # ties by lower index
    dist = np.sqrt(np.take_along_axis(sq, idx, 1) * _scale(q, metric))
    return dist, idx


def _dup_images(rng: np.random.Generator, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A reference set where 90 of 130 rows are exact copies of 3 images, and queries on and near them."""
    base = rng.integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    ref = np.concatenate([base, np.repeat(base[:3], 30, axis=0)])
    ref = ref[rng.permutation(len(ref))]  # copies spread over every block
    q = np.concatenate([base[:5], base[:3] ^ np.uint8(1)])  # exact hits and one-grey-level near-copies
    if dtype == "float":
        return q.astype(np.float32) / 255, ref.astype(np.float32) / 255
    return q, ref


@pytest.mark.parametrize("dtype", ["uint8", "float"])
@pytest.mark.parametrize("metric", ["l2", "tiled"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_knn_with_many_duplicates_is_brute_force_for_every_block(dtype: str, metric: str, k: int) -> None:
    q, ref = _dup_images(np.random.default_rng(0), dtype)
    want_d, want_i = _want(q, ref, k, metric)
    for bq, br in BLOCKS:
        dist, idx = D.nearest_neighbors(q, ref, k=k, metric=metric, grid=2, block_q=bq, block_r=br)
        np.testing.assert_array_equal(idx, want_i, err_msg=f"blocks {bq}x{br}")
        np.testing.assert_allclose(dist, want_d, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_knn_switching_from_dense_to_group_blocks_is_brute_force(dtype: str) -> None:
    # k = 8 compares blocks whole while k >= 2% of the rows seen (the first 400), then by group minima: both
    # paths, and the hand-over between them, must keep every copy that ties with the k-th nearest.
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (300, 1, 4, 4), dtype=np.uint8)
    ref = np.concatenate([base, np.repeat(base[:4], 60, axis=0)])[rng.permutation(540)]
    q = np.concatenate([base[:6], base[:3] ^ np.uint8(1), rng.integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)])
    if dtype == "float":
        q, ref = q.astype(np.float32) / 255, ref.astype(np.float32) / 255
    for k in (8, 12, 70):
        want_d, want_i = _want(q, ref, k, "l2")
        for bq, br in [(4, 32), (14, 100), (1000, 1000)]:
            dist, idx = D.nearest_neighbors(q, ref, k=k, block_q=bq, block_r=br)
            np.testing.assert_array_equal(idx, want_i, err_msg=f"k={k} blocks {bq}x{br}")
            np.testing.assert_allclose(dist, want_d, rtol=1e-6, atol=0)


def test_features_with_many_duplicates_and_exclude_self() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(25, 3)).astype(np.float32)
    x = np.concatenate([x, np.repeat(x[:2], 40, axis=0)])[rng.permutation(105)]
    for k in (1, 4, 50):
        want_d, want_i = _want(x, x, k, "euclidean", exclude_self=True)
        for bq, br in [(5, 7), (16, 3), (1000, 1000)]:
            dist, idx = D.nearest_neighbors(x, x, k=k, metric="euclidean", block_q=bq, block_r=br, exclude_self=True)
            np.testing.assert_array_equal(idx, want_i)
            np.testing.assert_allclose(dist, want_d, rtol=1e-6, atol=1e-12)
        radii = [D.knn_radii(x, k, block=b) for b in (1, 9, 1000)]
        for r in radii:
            np.testing.assert_array_equal(r, radii[0])
        np.testing.assert_allclose(radii[0], want_d[:, k - 1], rtol=1e-12, atol=1e-12)


def test_counts_with_duplicates_do_not_depend_on_blocks() -> None:
    # The eidetic count of extraction: training images within delta of a generation's nearest neighbour.
    rng = np.random.default_rng(2)
    q, ref = _dup_images(rng, "uint8")
    radius = np.full(len(ref), np.nextafter(0.05, 1.0))
    full = np.sqrt(_raw_sq(q, ref, "l2") * _scale(q, "l2"))
    want = (full < radius[None]).sum(1)
    assert want.max() >= 30  # the copies are all counted
    for bq, br in BLOCKS:
        got = D.count_within_radii(q, ref, radius, metric="l2", block_q=bq, block_r=br)
        np.testing.assert_array_equal(got, want)


def test_crowded_rows_are_pruned_exactly() -> None:
    # Far more tied copies than the candidate cap (2k + 64): the early exact prune must keep the lowest indices.
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (1, 1, 4, 4), dtype=np.uint8)
    others = rng.integers(0, 256, (50, 1, 4, 4), dtype=np.uint8)
    ref = np.concatenate([others[:20], np.repeat(img, 400, axis=0), others[20:]])
    for k in (1, 3):
        for bq, br in [(1, 7), (4, 1000), (1, 1)]:
            dist, idx = D.nearest_neighbors(img, ref, k=k, block_q=bq, block_r=br)
            np.testing.assert_array_equal(idx[0], np.arange(20, 20 + k))
            assert (dist == 0).all()


def test_neighbours_whose_fast_values_are_far_off_are_found() -> None:
    # Features far from the reference centre: float32 fast values err by far more than the gaps between the
    # nearest rows, so a selection that trusts them (no error band) keeps the wrong rows.
    rng = np.random.default_rng(11)
    spread = rng.normal(size=(300, 64)).astype(np.float32) * 1000  # centre near 0, norms ~ 8e3
    q = spread[:20] + 1000
    near = np.repeat(q, 5, axis=0) + rng.normal(size=(100, 64)).astype(np.float32) * 1e-3
    ref = np.concatenate([spread, near])[rng.permutation(400)]
    fast = (q**2).sum(1)[:, None] + (ref**2).sum(1)[None] - 2 * q @ ref.T  # what a float32 pass sees
    exact = ((q[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1)
    assert (np.argsort(fast, 1)[:, :2] != np.argsort(exact, 1)[:, :2]).any()  # the fast order is wrong
    want_d, want_i = _want(q, ref, 2, "euclidean")
    for bq, br in [(1, 1), (7, 16), (1000, 1000)]:
        dist, idx = D.nearest_neighbors(q, ref, k=2, metric="euclidean", block_q=bq, block_r=br)
        np.testing.assert_array_equal(idx, want_i)
        np.testing.assert_allclose(dist, want_d, rtol=1e-6)


def test_float_near_ties_ranked_by_exact_distance() -> None:
    # 200 rows closer to each other than the float32 error band: only the exact pass can order them.
    rng = np.random.default_rng(4)
    base = rng.random((1, 3, 8, 8)).astype(np.float32) * 0.5 + 0.25
    ref = base + (rng.integers(1, 200, (200, 1, 1, 1)) * np.float32(1e-6)).astype(np.float32)
    q = base.copy()
    want_d, want_i = _want(q, ref, 10, "l2")
    for bq, br in [(1, 1), (1, 16), (1, 1000)]:
        dist, idx = D.nearest_neighbors(q, ref, k=10, block_q=bq, block_r=br)
        np.testing.assert_array_equal(idx, want_i)
        np.testing.assert_allclose(dist, want_d, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 64, 64)])
def test_uint8_near_copies_exact_to_1e6(shape: tuple[int, ...]) -> None:
    # Large images leave the exactly-representable range of the fast pass and go through the exact recompute.
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 255, (30, *shape), dtype=np.uint8)
    q = ref[[3, 7]].copy()
    q[:, 0, 0, 0] += 1  # one grey level on one value
    want_d, want_i = _want(q, ref, 2, "l2")
    dist, idx = D.nearest_neighbors(q, ref, k=2, block_r=8)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-6)
    tiled = D.pairwise_tiled_l2(q, ref)
    np.testing.assert_allclose(tiled[0, 3], np.sqrt(1 / (shape[0] * shape[1] * shape[2] / 16)) / 255, rtol=1e-6)


@pytest.mark.parametrize("block", [1, 5, 16, 1000])
def test_symmetric_pairwise_equals_two_set_pairwise(block: int) -> None:
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (37, 3, 8, 8), dtype=np.uint8)
    x[5] = x[30]
    same = D.pairwise_tiled_l2(x, x, grid=2, block=block)
    other = D.pairwise_tiled_l2(x, x.copy(), grid=2, block=block)
    want = np.sqrt(_raw_sq(x, x, "tiled") * _scale(x, "tiled"))
    np.testing.assert_allclose(same, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(other, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(same, same.T)
    assert same[5, 30] == 0 and same[30, 5] == 0 and (np.diag(same) == 0).all()


@pytest.mark.parametrize("m", [1, _GROUP - 1, _GROUP, 3 * _GROUP + 5])
def test_select_le_equals_mask(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    sq = torch.randn(m, 23, generator=gen)
    thr = torch.randn(23, generator=gen)
    qi, rj = select_le(sq, thr)
    got = sorted(zip(qi.tolist(), rj.tolist(), strict=True))
    want = sorted((i, j) for j, i in zip(*np.nonzero((sq <= thr[None, :]).numpy()), strict=True))
    assert got == want


def test_torch_inputs_stay_on_their_device() -> None:
    # No GPU here: this checks the device-agnostic path on CPU tensors (CUDA tensors take the same code).
    rng = np.random.default_rng(7)
    q, ref = _dup_images(rng, "uint8")
    d_np, i_np = D.nearest_neighbors(q, ref, k=3)
    d_t, i_t = D.nearest_neighbors(torch.from_numpy(q), torch.from_numpy(ref), k=3)
    np.testing.assert_array_equal(i_np, i_t)
    np.testing.assert_array_equal(d_np, d_t)


@pytest.mark.parametrize("step", [1, 2])
def test_uint8_squared_norms_stay_exact_above_2_24(step: int) -> None:
    # Float32 sums of integers are exact only below 2^24 (times step^2); larger rows must take the float64 path.
    from diffaudit.distances._engine import geometry
    from diffaudit.distances._operand import _sq_norms

    gen = torch.Generator().manual_seed(step)
    body = (torch.randint(-255, 256, (2, 3, 4096), generator=gen) * step).to(torch.float32)
    body[0, 0] = step  # a small row stays on the float32 path
    geom = geometry("l2", 1, np.zeros((1, 4096), np.uint8))
    got = _sq_norms(body, geom, step)
    want = body.double().square().sum(-1)
    assert float(want.max()) > step * step * 2**24  # the fallback is exercised
    np.testing.assert_array_equal(got.numpy(), want.to(torch.float32).numpy())
