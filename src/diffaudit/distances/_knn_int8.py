"""Exact k nearest neighbours on the integer fast pass: one int8 matmul and one fused selection pass per block.

With the integer pass (``Geometry.int8``) every squared distance is exact, so the banded candidate
bookkeeping of ``_knn`` is not needed: each query keeps a max-heap of its k best (distance, index) pairs, and
reference rows are visited in increasing index order, so a row enters only if it is *strictly* closer than
the heap's worst. Ties therefore always go to the lower index, whatever the block sizes and however many
exact copies the reference set holds.

The selection is one compiled pass (numba) over each block's int32 product, reading every value once, like
faiss's fused kernels; a chain of torch operations (assemble, compare, nonzero, gather, merge) read the
product five or more times and cost several times the int8 matmul (docs/benchmarks_distances.md). For one
tile the pass also assembles the distance from the dot product: ``|r|^2 - 2 q.r`` ranks the rows of a query
exactly like the squared distance (``|q|^2`` is the same for all of them) and is added back at the end.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from diffaudit.distances._engine import ArrayLike, Geometry, load
from diffaudit.distances._operand import RefBlocks, block_scratch, fast_sq, make_operand, plan_blocks
from diffaudit.distances._parallel import balanced_block, run_blocks

_EMPTY = np.iinfo(np.int64).max  # value and index of an unfilled heap slot: larger than any real pair


@numba.njit(nogil=True, cache=True)
def _sift_in(vals: np.ndarray, idx: np.ndarray, value: int, index: int) -> None:  # pragma: no cover - compiled
    """Replace the root of the max-heap (vals, idx) ordered by (value, index) with a smaller pair."""
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


@numba.njit(nogil=True, cache=True)
def _select_block(
    prod: np.ndarray,
    coef: int,
    ref_terms: np.ndarray,
    base: int,
    self_col: np.ndarray,
    vals: np.ndarray,
    idx: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Fold one block into the heaps: row j of query i scores ``ref_terms[j] + coef * prod[i, j]``.

    prod (b, m) int32, query-major; ref_terms (m,) int64; base: index of the block's first reference row;
    self_col (b,) int64: the column to skip for each query (its own row) or -1; vals, idx (b, k) int64 heaps.
    """
    b, m = prod.shape
    k = vals.shape[1]
    for i in range(b):
        row = prod[i]
        skip = self_col[i]
        top = vals[i, 0]
        if k == 1:  # a running minimum: the min reduction vectorises, the index is found only on improvement
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


def knn_sq_int8(
    query: ArrayLike,
    ref: ArrayLike,
    k: int,
    geom: Geometry,
    block_q: int,
    block_r: int,
    exclude_self: bool,
    cache_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact raw squared distances (Nq, k) float64 and indices (Nq, k) int64 of the k nearest ref rows.

    Needs ``geom.int8``. Ties go to the lower index; ``exclude_self`` skips row i of ``ref`` for query i.
    """
    bq_max, br = plan_blocks(geom, block_q, block_r)
    bq = balanced_block(len(query), bq_max, geom.device)
    refs = RefBlocks(ref, geom, None, br, cache_bytes)
    scratch = block_scratch(geom, min(bq, len(query)), min(br, len(ref)))
    out_sq = torch.empty((len(query), k), dtype=torch.float64)
    out_idx = torch.empty((len(query), k), dtype=torch.int64)
    one_tile = geom.tiles == 1

    def query_block(i0: int) -> None:
        qbuf, pbuf = scratch.get()
        q = make_operand(load(query, slice(i0, i0 + bq), geom, "query"), geom, None, "query", qbuf)
        b = q.data.shape[1]
        vals = np.full((b, k), _EMPTY, dtype=np.int64)
        idx = np.full((b, k), _EMPTY, dtype=np.int64)
        for j0, r in refs:
            m = r.data.shape[1]
            own = np.arange(i0, i0 + b, dtype=np.int64) - j0
            self_col = np.where(exclude_self & (own >= 0) & (own < m), own, -1)
            if one_tile:  # the dot products only; the pass adds |r|^2 (and |q|^2 at the end)
                prod = pbuf[: b * m].view(b, m)
                torch._int_mm(q.data[0], r.data[0].T, out=prod)
                _select_block(prod.numpy(), -2, r.tile_norms[0].numpy().astype(np.int64), j0, self_col, vals, idx)
            else:  # tiles: the running maximum over tiles is the assembled exact distance
                _, exact = fast_sq(q, r, geom, pbuf, selection_copy=False)
                _select_block(exact.numpy(), 1, np.zeros(m, dtype=np.int64), j0, self_col, vals, idx)
        if one_tile:
            vals += q.tile_norms[0].numpy().astype(np.int64)[:, None]
        # Heap order to (distance, index) order: distances are below 2^31 and indices below 2^32.
        order = np.argsort(vals * (1 << 32) + idx, axis=1)
        out_sq[i0 : i0 + b] = torch.from_numpy(np.take_along_axis(vals, order, 1).astype(np.float64))
        out_idx[i0 : i0 + b] = torch.from_numpy(np.take_along_axis(idx, order, 1))

    run_blocks(list(range(0, len(query), bq)), query_block, geom.device)
    return out_sq, out_idx
