"""Distance matrices and radius counts on top of the fast pass, exact where it matters (internal)."""

from __future__ import annotations

import numpy as np
import torch

from diffaudit.distances._engine import ArrayLike, Geometry, exact_pairs
from diffaudit.distances._knn import select_le
from diffaudit.distances._operand import (
    Comparison,
    fast_sq,
    pair_band,
    plan_blocks,
    query_from_ref,
)
from diffaudit.distances._parallel import balanced_block, run_blocks


def pairwise_matrix(
    x: ArrayLike, y: ArrayLike, geom: Geometry, block: int, recompute_below: float, cache_bytes: int
) -> np.ndarray:
    """float32 (N, M) distances; entries below ``recompute_below`` or within the error band of 0 are exact.

    When ``x is y`` only blocks on or above the diagonal are computed and mirrored (distances are symmetric;
    the exact entries are symmetric bit for bit, fast ones up to float32 rounding).
    """
    bq, br = plan_blocks(geom, block, block)
    symmetric = x is y
    dev = geom.device
    if symmetric:
        # Aligned blocks, so a block and its mirror image cover the same pairs; more blocks than workers,
        # because the rows of the upper triangle hold unequal work.
        bq = br = balanced_block(len(x), min(bq, br), dev, blocks_per_worker=2)
    else:
        bq = balanced_block(len(x), bq, dev)
    cmp = Comparison(y, len(x), geom, bq, br, cache_bytes)
    refs, tol = cmp.refs, cmp.tol
    out = np.empty((len(x), len(y)), dtype=np.float32)
    thr_raw = float(recompute_below) ** 2 / geom.scale

    def query_block(i0: int) -> None:
        same = refs.cached_block(i0) if symmetric else None
        if same is not None:
            qbuf, pbuf = cmp.scratch()
            q = query_from_ref(same, geom, qbuf)
        else:
            _, q, pbuf = cmp.query(x, i0, "x")
        for j0, r in refs:
            if symmetric and j0 + br <= i0:
                continue  # filled from the mirrored block
            sq, exact_sq = fast_sq(r, q, geom, pbuf)  # (m, b), reference-major
            # Recompute what is below the threshold or within the query's error band of zero.
            band = pair_band(q.norm, r.norm.max(), geom, tol)
            thr = (torch.clamp_min(band, thr_raw) * (1 + 1e-6)).to(torch.float32)
            qi, rj = select_le(sq, thr)
            if len(qi) and exact_sq is None:  # exact fast values need no recompute; nor does a row against itself
                keep = pair_band(q.norm[qi], r.norm[rj], geom, tol) > 0
                if symmetric and i0 == j0:
                    keep &= qi != rj
                qi, rj = qi[keep], rj[keep]
            # The integer pass's exact values, read before the float32 copy is turned into distances in place.
            exact_vals = exact_sq[rj, qi].double() if exact_sq is not None and len(qi) else None
            sq.clamp_min_(0.0).mul_(geom.scale).sqrt_()
            if symmetric and i0 == j0:
                sq.diagonal().zero_()
            if len(qi):
                if exact_vals is None:
                    exact_vals = exact_pairs(x, qi + i0, y, rj + j0, geom)
                sq[rj, qi] = exact_vals.mul_(geom.scale).sqrt_().to(torch.float32)
            block_np = sq.cpu().numpy()
            m, b = block_np.shape
            out[i0 : i0 + b, j0 : j0 + m] = block_np.T
            if symmetric and j0 > i0:
                out[j0 : j0 + m, i0 : i0 + b] = block_np

    run_blocks(list(range(0, len(x), bq)), query_block, dev)
    return out


def count_within(
    query: ArrayLike,
    ref: ArrayLike,
    radii64: torch.Tensor,
    geom: Geometry,
    block_q: int,
    block_r: int,
    cache_bytes: int,
) -> np.ndarray:
    """int64 (Nq,): ref rows j with exact distance < ``radii64[j]`` (metric units); undecided pairs are exact."""
    bq, br = plan_blocks(geom, block_q, block_r)
    dev = geom.device
    bq = balanced_block(len(query), bq, dev)
    radii64 = radii64.to(dev)
    radii_sq = radii64 * radii64 / geom.scale  # raw units, float64
    cmp = Comparison(ref, len(query), geom, bq, br, cache_bytes)
    counts = torch.zeros(len(query), dtype=torch.int64, device=dev)

    def query_block(i0: int) -> None:
        _, q, pbuf = cmp.query(query, i0, "query")
        qmax = float(q.norm.max())
        for j0, r in cmp.refs:
            sq, exact_sq = fast_sq(r, q, geom, pbuf)  # (m, b), reference-major
            r2 = radii_sq[j0 : j0 + sq.shape[0]]
            # Per reference row: below `lower` is surely inside, above `upper` surely outside, in between is
            # decided exactly. The margin also covers the float32 rounding of the squared radii themselves.
            margin = cmp.tol * (qmax + r.norm.double()) + 1e-6 * r2
            lower = (r2 - margin).to(torch.float32)[:, None]
            upper = (r2 + margin).to(torch.float32)[:, None]
            c = (sq < lower).sum(0)
            rj, qi = torch.nonzero((sq >= lower) & (sq <= upper), as_tuple=True)
            if len(qi):
                e = exact_pairs(query, qi + i0, ref, rj + j0, geom) if exact_sq is None else exact_sq[rj, qi].double()
                # The same formula as knn_radii, so a pair exactly at a k-NN radius is consistently outside.
                inside = (e * geom.scale).sqrt_() < radii64[j0 + rj]
                c.index_add_(0, qi[inside], torch.ones(int(inside.sum()), dtype=c.dtype, device=dev))
            counts[i0 : i0 + sq.shape[1]] += c  # this block's rows only: no other thread writes them

    run_blocks(list(range(0, len(query), bq)), query_block, dev)
    return counts.cpu().numpy()
