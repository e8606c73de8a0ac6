"""Exact k nearest neighbours on the CPU: the fast pass, then one compiled selection pass per block (numba).

Each query keeps a max-heap of its k best (exact distance, index) pairs. Reference rows are visited in
increasing index order, so a row enters only if its exact distance is *strictly* below the heap's worst: ties
always go to the lower index, whatever the block sizes and however many exact copies the reference set holds.

* **Integer pass** (``Geometry.int8``): every fast value is the exact squared distance, so the pass compares
  and inserts directly. For one tile it also assembles the distance from the int8 dot product:
  ``|r|^2 - 2 q.r`` ranks the rows of a query exactly like the squared distance (``|q|^2`` is the same for all
  of them) and is added back at the end.
* **Float pass**: a fast value ``f`` is within ``tol (|q|^2 + |r|^2)`` of the exact one, so a row whose
  ``f - band`` is not below the heap's worst can never enter; the few rows that pass (the first k, then the
  rows near the running k-th) are recomputed exactly in the pass, from the raw rows in float64.

One pass reads every value of the product once, like faiss's fused kernels; the torch selection (``_knn``,
kept for CUDA tensors) reads it five or more times and cost several times the matmul on the CPU
(docs/benchmarks_distances.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
import torch

from diffaudit.distances._engine import ArrayLike, Geometry, load
from diffaudit.distances._operand import (
    Comparison,
    exact_norm_sum,
    fast_sq,
    int8_dots,
    plan_blocks,
)
from diffaudit.distances._parallel import balanced_block, run_blocks

# Use the fused selection for CPU inputs (tests switch it off to run the torch selection that CUDA uses).
ENABLED = True


def _jit(**options: object) -> Callable[[Callable], Callable]:
    """numba.njit without the GIL, cached on disk where numba finds a writable place (next to this file, or
    NUMBA_CACHE_DIR, or the user's cache directory), compiled in each process otherwise (about 0.7 s)."""

    def decorate(fn: Callable) -> Callable:
        try:
            return numba.njit(nogil=True, cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install, no home)
            return numba.njit(nogil=True, **options)(fn)

    return decorate


_INT_MAX = np.iinfo(np.int64).max


@_jit()
def _sift_in(vals: np.ndarray, idx: np.ndarray, value: float, index: int) -> None:  # pragma: no cover - compiled
    """Replace the root of the max-heap (vals, idx), ordered by (value, index), with a smaller pair."""
    k = vals.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        right = child + 1
        if right < k and (vals[right] > vals[child] or (vals[right] == vals[child] and idx[right] > idx[child])):
            child = right
        if vals[child] > value or (vals[child] == value and idx[child] > index):
            vals[pos] = vals[child]
            idx[pos] = idx[child]
            pos = child
        else:
            break
    vals[pos] = value
    idx[pos] = index


@_jit()
def _select_exact(
    prod: np.ndarray,
    coef: int,
    ref_terms: np.ndarray,
    base: int,
    self_col: np.ndarray,
    vals: np.ndarray,
    idx: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Fold a block of exact values into the heaps: row j of query i scores ``ref_terms[j] + coef * prod[i, j]``.

    prod (b, m) int32 or int64, query-major; ref_terms (m,) int64; base: index of the block's first reference row;
    self_col (b,) int64: the column to skip for each query (its own row) or -1; vals, idx (b, k) int64 heaps.
    """
    b, m = prod.shape
    k = vals.shape[1]
    for i in range(b):
        row = prod[i]
        skip = self_col[i]
        top = vals[i, 0]
        if k == 1:  # a running minimum: the integer min reduction vectorises; the index is found on improvement
            best = top
            for j in range(m):
                s = ref_terms[j] + coef * np.int64(row[j])
                if s < best and j != skip:
                    best = s
            if best < top:
                for j in range(m):
                    if j != skip and ref_terms[j] + coef * np.int64(row[j]) == best:
                        vals[i, 0] = best
                        idx[i, 0] = base + j
                        break
            continue
        hv = vals[i]
        hi = idx[i]
        for j in range(m):
            s = ref_terms[j] + coef * np.int64(row[j])
            if s < top and j != skip:
                _sift_in(hv, hi, s, base + j)
                top = hv[0]


# Values per chunk of a float product row: only chunks whose minimum can enter a heap are scanned value by
# value. The minima are taken over the float32 bit patterns as int32: for values >= 0 the integer order is the
# float order, and a negative value makes the chunk's integer minimum negative, so the chunk is scanned; the
# test only ever compares with a non-negative bound. An integer min vectorises in numba (0.23 ns per value);
# a float32 one does not (1.2 ns, measured), and a separate torch pass read the product once more.
_CHUNK = 256


@_jit(inline="always")
def _chunk_minima(bits: np.ndarray, lows: np.ndarray) -> None:  # pragma: no cover - compiled
    """lows[c] = min(bits[c * _CHUNK : (c + 1) * _CHUNK]) of an int32 row."""
    m = bits.shape[0]
    full = m - m % _CHUNK
    for c in range(full // _CHUNK):
        low = bits[c * _CHUNK]
        for j in range(c * _CHUNK, c * _CHUNK + _CHUNK):
            low = min(low, bits[j])
        lows[c] = low
    if full < m:
        low = bits[full]
        for j in range(full, m):
            low = min(low, bits[j])
        lows[full // _CHUNK] = low


@_jit(inline="always")
def _bits_at_least(bound: float) -> np.int32:  # pragma: no cover - compiled
    """The int32 bit pattern of a float32 >= ``bound`` (>= 0): rounded up, +inf beyond the float32 range."""
    if bound >= 3.4e38:
        return np.int32(0x7F800000)
    return np.float32(bound * (1.0 + 1e-6)).view(np.int32)


@_jit(inline="always")
def _exact_sq(a: np.ndarray, b: np.ndarray, tile_of: np.ndarray, acc: np.ndarray) -> float:  # pragma: no cover
    """Exact raw squared distance of two raw rows (D,): float64 differences, summed per tile, max over tiles."""
    if acc.shape[0] == 1:  # one tile: a plain sum (4x faster than the per-tile bookkeeping, measured)
        total = 0.0
        for d in range(a.shape[0]):
            diff = np.float64(a[d]) - np.float64(b[d])
            total += diff * diff
        return total
    acc[:] = 0.0
    for d in range(a.shape[0]):
        diff = np.float64(a[d]) - np.float64(b[d])
        acc[tile_of[d]] += diff * diff
    return acc.max()


@_jit()
def _select_banded(
    prod: np.ndarray,
    qnorm: np.ndarray,
    rnorm: np.ndarray,
    tol: float,
    exact_sum: float,
    qraw: np.ndarray,
    rraw: np.ndarray,
    tile_of: np.ndarray,
    n_tiles: int,
    base: int,
    self_col: np.ndarray,
    vals: np.ndarray,
    idx: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Fold a block of fast values into the heaps, recomputing exactly only the rows that may enter.

    prod (b, m) float32 fast values, query-major; qnorm (b,), rnorm (m,) float64: the operands' squared
    norms, so ``tol * (qnorm + rnorm)`` bounds a pair's error, and a pair whose norms sum below ``exact_sum``
    has an exact fast value (no recompute); qraw (b, D), rraw (m, D): the rows in raw units; tile_of (D,)
    int64: the tile of each value; vals (b, k) float64 and idx (b, k) int64: the heaps.
    """
    b, m = prod.shape
    acc = np.empty(n_tiles)
    qband = tol * qnorm
    rband = tol * rnorm
    rmax = rband.max() if m else 0.0
    lows = np.empty((m + _CHUNK - 1) // _CHUNK, dtype=np.int32)
    bits = prod.view(np.int32)
    for i in range(b):
        row = prod[i]
        _chunk_minima(bits[i], lows)
        skip = self_col[i]
        hv = vals[i]
        hi = idx[i]
        top = hv[0]
        loose = top + qband[i] + rmax  # a first test on the widest band of the block
        # The chunk with the smallest minimum first: it holds the block's best row, so the heap is tight at
        # once and the other chunks usually fail the chunk test. Out of index order, a pair enters by
        # (distance, index) order, so ties still go to the lower index.
        limit = _bits_at_least(loose)
        first = np.argmin(lows)
        for n in range(lows.shape[0]):
            c = first if n == 0 else (n - 1 if n <= first else n)
            if lows[c] > limit:
                continue
            c0 = c * _CHUNK
            for j in range(c0, min(c0 + _CHUNK, m)):
                f = np.float64(row[j])
                if f <= loose and j != skip and f - qband[i] - rband[j] <= top:
                    exact = qnorm[i] + rnorm[j] < exact_sum
                    e = f if exact else _exact_sq(qraw[i], rraw[j], tile_of, acc)
                    if e < top or (e == top and base + j < hi[0]):
                        _sift_in(hv, hi, e, base + j)
                        top = hv[0]
                        loose = top + qband[i] + rmax
                        limit = _bits_at_least(loose)


def _tile_of(geom: Geometry) -> np.ndarray:
    """(D,) int64: the tile of every value of a flattened row."""
    if geom.metric != "tiled":
        return np.zeros(int(np.prod(geom.row_shape)), dtype=np.int64)
    ch, h, w = geom.row_shape
    g = geom.grid
    ty = np.arange(h) // (h // g)
    tx = np.arange(w) // (w // g)
    return np.broadcast_to((ty[:, None] * g + tx[None, :])[None], (ch, h, w)).reshape(-1).astype(np.int64)


def _raw_rows(x: ArrayLike, rows: slice, geom: Geometry, name: str) -> np.ndarray:
    """Rows (b, D) in raw units as a numpy view where possible (the exact pass reads them)."""
    return load(x, rows, geom, name).reshape(-1, int(np.prod(geom.row_shape))).numpy()


def knn_sq_fused(
    query: ArrayLike,
    ref: ArrayLike,
    k: int,
    geom: Geometry,
    block_q: int,
    block_r: int,
    exclude_self: bool,
    cache_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact raw squared distances (Nq, k) float64 and indices (Nq, k) int64 of the k nearest ref rows (CPU).

    Ties go to the lower index; ``exclude_self`` skips row i of ``ref`` for query i.
    """
    bq_max, br = plan_blocks(geom, block_q, block_r)
    bq = balanced_block(len(query), bq_max, geom.device)
    cmp = Comparison(ref, len(query), geom, bq, br, cache_bytes)
    tol = cmp.tol
    exact_sum = exact_norm_sum(geom, tol)
    tile_of = _tile_of(geom)
    out_sq = torch.empty((len(query), k), dtype=torch.float64)
    out_idx = torch.empty((len(query), k), dtype=torch.int64)
    dot_only = geom.int8 and geom.tiles == 1

    def query_block(i0: int) -> None:
        qb, q, pbuf = cmp.query(query, i0, "query")
        b = len(qb)
        # Unfilled heap slots: (largest value, largest index), behind every real pair.
        vals = np.full((b, k), _INT_MAX, dtype=np.int64) if geom.int8 else np.full((b, k), np.inf)
        idx = np.full((b, k), _INT_MAX, dtype=np.int64)
        qraw = None if geom.int8 else qb.reshape(b, -1).numpy()
        qnorm = q.norm.double().numpy()
        for j0, r in cmp.refs:
            m = r.data.shape[1]
            own = np.arange(i0, i0 + b, dtype=np.int64) - j0
            self_col = np.where(exclude_self & (own >= 0) & (own < m), own, -1)
            if dot_only:  # the int8 dot products only; the pass adds |r|^2 (and |q|^2 at the end)
                prod = int8_dots(q, r, pbuf)
                _select_exact(prod.numpy(), -2, r.tile_norms[0].numpy().astype(np.int64), j0, self_col, vals, idx)
            elif geom.int8:  # tiles: the running maximum over tiles is the assembled exact distance
                _, exact = fast_sq(q, r, geom, pbuf, selection_copy=False)
                _select_exact(exact.numpy(), 1, np.zeros(m, dtype=np.int64), j0, self_col, vals, idx)
            else:
                sq, _ = fast_sq(q, r, geom, pbuf)  # (b, m), query-major
                rnorm = r.norm.double().numpy()
                rraw = _raw_rows(ref, slice(j0, j0 + m), geom, "ref")
                _select_banded(
                    sq.numpy(), qnorm, rnorm, tol, exact_sum, qraw, rraw, tile_of, geom.tiles, j0, self_col, vals, idx
                )
        if dot_only:
            vals += q.tile_norms[0].numpy().astype(np.int64)[:, None]
        order = _order(vals, idx)  # heap order to (distance, index) order
        out_sq[i0 : i0 + b] = torch.from_numpy(np.take_along_axis(vals, order, 1).astype(np.float64))
        out_idx[i0 : i0 + b] = torch.from_numpy(np.take_along_axis(idx, order, 1))

    run_blocks(list(range(0, len(query), bq)), query_block, geom.device)
    return out_sq, out_idx


def _order(vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per row, the permutation sorting (vals, idx) pairs lexicographically: (b, k) int64."""
    by_index = np.argsort(idx, axis=1, kind="stable")
    by_value = np.argsort(np.take_along_axis(vals, by_index, 1), axis=1, kind="stable")
    return np.take_along_axis(by_index, by_value, 1)
