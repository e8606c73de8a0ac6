"""Query blocks on parallel threads give the same answers, bit for bit, as one thread and as brute force."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from diffaudit import distances as D
from diffaudit.distances._parallel import balanced_block, run_blocks

# Every test runs on every engine path (int8 and float32 fast passes, fused and torch selections).
pytestmark = pytest.mark.usefixtures("every_engine_path")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _dup_set(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uint8 4x4 images, a third of them copies of 3 images, spread over every block."""
    base = rng.integers(0, 256, (n - n // 3, 1, 4, 4), dtype=np.uint8)
    return np.concatenate([base, np.repeat(base[:3], n // 3 // 3 + 1, axis=0)])[:n][rng.permutation(n)]


def _brute(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    d = q.reshape(len(q), -1).astype(np.int64)[:, None] - r.reshape(len(r), -1).astype(np.int64)[None]
    return np.sqrt((d * d).sum(-1) / d.shape[-1]) / 255.0


def test_balanced_blocks_split_rows_evenly_over_the_workers(two_threads) -> None:
    cpu = torch.device("cpu")
    assert balanced_block(5000, 1024, cpu) == 834  # 6 blocks, not 5 (one worker idle a fifth of the time)
    assert balanced_block(2000, 1024, cpu, blocks_per_worker=2) == 500
    assert balanced_block(500, 1024, cpu, blocks_per_worker=2) == 1024  # too few rows to be worth a thread
    torch.set_num_threads(1)
    assert balanced_block(5000, 1024, cpu) == 1024


def test_run_blocks_restores_threads_and_reraises(two_threads) -> None:
    seen = []

    def work(s: int) -> None:
        if s == 3:
            time.sleep(0.3)  # still running when block 2 fails
        seen.append((s, torch.get_num_threads()))
        if s == 2:
            raise ValueError("block 2")

    with pytest.raises(ValueError, match="block 2"):
        run_blocks([0, 1, 2, 3], work, torch.device("cpu"))
    assert sorted(s for s, _ in seen) == [0, 1, 2, 3]  # every block ended before the error was raised
    assert torch.get_num_threads() == 2
    assert all(threads == 1 for _, threads in seen)  # intra-op threads off while blocks run in parallel


@pytest.mark.parametrize("k", [1, 9, 40])
def test_parallel_knn_equals_one_thread_and_brute_force(two_threads, k: int) -> None:
    rng = np.random.default_rng(0)
    ref = _dup_set(rng, 700)
    q = np.concatenate([ref[:200], rng.integers(0, 256, (120, 1, 4, 4), dtype=np.uint8)])
    par = D.nearest_neighbors(q, ref, k=k, block_q=100, block_r=64)
    torch.set_num_threads(1)
    one = D.nearest_neighbors(q, ref, k=k, block_q=100, block_r=64)
    np.testing.assert_array_equal(par[1], one[1])
    np.testing.assert_array_equal(par[0], one[0])
    full = _brute(q, ref)
    want = np.argsort(full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(par[1], want)


def test_parallel_pairwise_and_counts_equal_one_thread(two_threads) -> None:
    rng = np.random.default_rng(1)
    x = _dup_set(rng, 400)
    y = _dup_set(rng, 300)
    sym = D.pairwise_distances(x, x, metric="l2", block=64)
    two = D.pairwise_distances(x, y, metric="l2", block=64)
    radii = np.full(len(y), 0.3)
    counts = D.count_within_radii(x, y, radii, metric="l2", block_q=64, block_r=64)
    torch.set_num_threads(1)
    np.testing.assert_array_equal(sym, D.pairwise_distances(x, x, metric="l2", block=64))
    np.testing.assert_array_equal(two, D.pairwise_distances(x, y, metric="l2", block=64))
    np.testing.assert_array_equal(counts, D.count_within_radii(x, y, radii, metric="l2", block_q=64, block_r=64))
    np.testing.assert_allclose(sym, _brute(x, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal((_brute(x, y) < 0.3).sum(1), counts)
    assert (np.diag(sym) == 0).all() and (sym == sym.T).all()
