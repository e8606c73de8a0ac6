"""Exact k nearest neighbours with torch operations only: the path for CUDA tensors (the CPU uses the compiled
selection of ``_knn_fused``). A float32 fast pass keeps every row that can still matter, then exact ranks.

Correctness argument (what makes the result independent of block sizes, duplicates included):

* Every fast value ``f`` of a pair is within ``b = tol * (|q|^2 + |r|^2)`` of the exact raw squared distance
  ``e``, so each candidate carries an interval ``lo <= e <= hi``.
* Let ``U`` be the k-th smallest ``hi`` among a query's candidates. The k-th smallest exact distance is at most
  ``U``, so a row whose ``lo`` exceeds ``U`` can never be returned, and a row is selected from a block whenever
  ``f - b <= U``. Nothing else is ever dropped, except rows whose exact value is known and which have k rows
  before them in (exact, index) order: they cannot be returned either. There is no fixed number of candidates,
  so any number of exact copies survive to the final (exact distance, index) sort.
* Only when a query's candidates exceed ``_CAP`` (many rows tied within the band: copies) are its candidates
  recomputed early, which bounds memory without changing the answer.
"""

from __future__ import annotations

import numpy as np
import torch

from diffaudit.distances._engine import ArrayLike, Geometry, exact_pairs
from diffaudit.distances._operand import Comparison, fast_sq, pair_band, plan_blocks
from diffaudit.distances._parallel import balanced_block, run_blocks

# Reference rows per group of the two-level selection. The fast product is laid out reference-major (br, bq),
# so the minimum over a group of 16 reference rows is an elementwise minimum of contiguous rows: one cheap
# vectorised pass. Only groups whose minimum passes a query's threshold are then compared element by element
# (elementwise comparisons with a bool result, and nonzero, cost several times a min-reduction on CPU).
_GROUP = 16
_FMAX = torch.finfo(torch.float32).max


def group_min(sq_t: torch.Tensor) -> torch.Tensor:
    """(ng, b) minima over groups of ``_GROUP`` consecutive rows of ``sq_t`` (m, b); the last group may be short."""
    m, b = sq_t.shape
    mg = m - m % _GROUP
    parts = []
    if mg:
        parts.append(sq_t[:mg].view(mg // _GROUP, _GROUP, b).amin(1))
    if mg < m:
        parts.append(sq_t[mg:].amin(0, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def select_le(
    sq_t: torch.Tensor, thr: torch.Tensor, gmin: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and reference indices (int64) of the entries of ``sq_t`` (m, b) with ``sq_t[j, i] <= thr[i]``.

    Sorted by query index (then reference index). ``sq_t`` is reference-major and contiguous; ``gmin`` is its
    :func:`group_min` when already computed.
    """
    m, b = sq_t.shape
    if gmin is None:
        gmin = group_min(sq_t)
    mg = m - m % _GROUP
    passed = gmin[: mg // _GROUP] <= thr[None, :]  # (ng, b)
    g, i = torch.nonzero(passed, as_tuple=True)  # group-major: the gather below walks memory in order
    qs, rs = [], []
    if len(g):
        # One advanced-indexing gather of the passing groups' (P, G) values: no (P, G) index arithmetic.
        vals = sq_t[:mg].view(mg // _GROUP, _GROUP, b)[g, :, i]
        # Reorder the (small) gathered rows query-major without a sort: a passing group's group-major
        # position is the running count of passing groups before it.
        qmaj = passed.T.nonzero(as_tuple=True)
        rank = torch.cumsum(passed.view(-1), 0).sub_(1)[qmaj[1] * b + qmaj[0]]
        i, g, vals = qmaj[0], qmaj[1], vals[rank]
        p, t = torch.nonzero(vals <= thr[i][:, None], as_tuple=True)
        qs.append(i[p])
        rs.append(g[p] * _GROUP + t)
    if mg < m and bool((gmin[-1] <= thr).any()):  # the short last group: compared directly
        it, rt = torch.nonzero((sq_t[mg:] <= thr[None, :]).T, as_tuple=True)
        qs.append(it)
        rs.append(rt + mg)
    if not qs:
        empty = torch.empty(0, dtype=torch.int64, device=sq_t.device)
        return empty, empty
    if len(qs) == 1:
        return qs[0], rs[0]
    qi, rj = torch.cat(qs), torch.cat(rs)
    order = torch.argsort(qi, stable=True)  # only when the block has a short last group
    return qi[order], rj[order]


def k_smallest_rows(pool: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest values of every row of ``pool`` (b, n), unordered: (b, min(k, n)).

    On the CPU numpy's introselect is ~30x faster than ``torch.topk`` for short rows (measured: 0.3 ms vs
    9.5 ms for 1024 rows of 114 values), and this runs once per block.
    """
    if pool.shape[1] <= k:
        return pool
    if pool.device.type == "cpu":
        return torch.from_numpy(np.partition(pool.numpy(), k - 1, axis=1)[:, :k])
    return pool.topk(k, dim=1, largest=False, sorted=False).values


def _rank_in_rows(keys: list[torch.Tensor]) -> torch.Tensor:
    """Per row of (b, C) tensors, the position of each entry when sorted by keys[0], then keys[1], ... ."""
    order = torch.argsort(keys[-1], dim=1, stable=True)
    for key in reversed(keys[:-1]):
        order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


class _Candidates:
    """The candidate rows of one block of queries.

    New entries are appended flat (cheap); :meth:`compact` lays them out as padded (b, C) tensors, valid entries
    first in each row. ``lo``/``hi`` bound the exact raw squared distance (inf in padding); ``ex`` is the exact
    value once known (NaN before). ``exact(qrows, refcols)`` computes exact values for flat index pairs.
    """

    def __init__(self, b: int, k: int, device: torch.device, exact) -> None:  # noqa: ANN001 - a callable
        self.k, self.exact, self.b = k, exact, b
        self.idx = torch.empty((b, 0), dtype=torch.int64, device=device)
        self.lo = torch.empty((b, 0), dtype=torch.float64, device=device)
        self.hi, self.ex = self.lo.clone(), self.lo.clone()
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self.size = 0

    def add(self, rows: torch.Tensor, cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ex: torch.Tensor) -> None:
        """Append flat entries (ideally sorted by row); ``ex`` is the exact value where already known, else NaN."""
        self._pending.append((rows, cols, lo, hi, ex))
        self.size += len(rows)

    def prune(self, tau: torch.Tensor) -> None:
        """Drop appended entries whose ``lo`` exceeds ``tau`` (b,) float64, an upper bound on each query's k-th
        nearest exact distance: they can never be returned. Flat and order-preserving (cheap), unlike
        :meth:`compact`, which lays everything out padded."""
        pending, self.size = [], self.size - sum(len(p[0]) for p in self._pending)
        for piece in self._pending:
            keep = torch.nonzero(piece[2] <= tau[piece[0]]).squeeze(1)  # one nonzero for the five gathers
            pending.append(tuple(t.index_select(0, keep) for t in piece))
            self.size += len(keep)
        self._pending = pending

    def _merge(self) -> None:
        """Lay the padded entries and the pending flat ones out as new padded (b, C) tensors.

        A counting placement, not a sort: each piece is sorted by row (padded entries come row-major from
        ``nonzero``; :func:`select_le` output is query-sorted), so an entry's slot is the count of its row's
        entries in earlier pieces plus its rank within its piece's run of that row.
        """
        if not self._pending:
            return
        qi, cj = torch.nonzero(self.lo < torch.inf, as_tuple=True)
        pieces = [(qi, self.idx[qi, cj], self.lo[qi, cj], self.hi[qi, cj], self.ex[qi, cj]), *self._pending]
        dev = qi.device
        filled = torch.zeros(self.b, dtype=torch.int64, device=dev)
        placed = []
        for piece in pieces:
            rows = piece[0]
            if len(rows) > 1 and not bool((rows[1:] >= rows[:-1]).all()):
                order = torch.argsort(rows, stable=True)
                piece = tuple(t[order] for t in piece)
                rows = piece[0]
            count = torch.bincount(rows, minlength=self.b)
            pos = torch.arange(len(rows), device=dev) - (torch.cumsum(count, 0) - count)[rows] + filled[rows]
            filled += count
            placed.append((pos, piece))
        width = int(filled.max()) if self.b else 0
        shape = (self.b, width)
        self.idx = torch.full(shape, -1, dtype=torch.int64, device=dev)
        self.lo, self.hi, self.ex = (torch.full(shape, torch.inf, dtype=torch.float64, device=dev) for _ in range(3))
        for pos, (rows, cols, lo, hi, ex) in placed:
            for dst, src in ((self.idx, cols), (self.lo, lo), (self.hi, hi), (self.ex, ex)):
                dst[rows, pos] = src
        self._pending = []

    def _kth_hi(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        hi = self.hi if keep is None else torch.where(keep, self.hi, torch.inf)
        if hi.shape[1] < self.k:
            return torch.full((hi.shape[0],), torch.inf, dtype=torch.float64, device=hi.device)
        return hi.kthvalue(self.k, dim=1).values

    def _resolve(self, mask: torch.Tensor) -> None:
        """Compute exact values of the entries in ``mask`` that do not have one yet."""
        qi, cj = torch.nonzero(mask & torch.isnan(self.ex), as_tuple=True)
        if len(qi):
            e = self.exact(qi, self.idx[qi, cj])
            self.ex[qi, cj] = e
            self.lo[qi, cj] = e
            self.hi[qi, cj] = e

    def _drop_ranked_out(self, keep: torch.Tensor) -> torch.Tensor:
        """Drop exact-known entries with k entries before them in (exact, index) order."""
        known = keep & ~torch.isnan(self.ex)
        key = torch.where(known, self.ex, torch.inf)
        rank = _rank_in_rows([key, self.idx])
        return keep & ~(known & (rank >= self.k))

    def compact(self, cap: int) -> torch.Tensor:
        """Drop entries that cannot be among the k nearest; returns U (b,) float64, the bound for later rows."""
        self._merge()
        u = self._kth_hi()
        keep = self.lo <= u[:, None]
        crowded = keep.sum(1) > cap
        if bool(crowded.any()):
            self._resolve(keep & crowded[:, None])
            keep = self._drop_ranked_out(keep)
            u = self._kth_hi(keep)
            keep &= self.lo <= u[:, None]
        self._pack(keep)
        return u

    def _pack(self, keep: torch.Tensor) -> None:
        """Keep the entries in ``keep`` (b, C), moved to the front of their rows in order (no sort)."""
        rows, cols = torch.nonzero(keep, as_tuple=True)  # row-major
        pos = torch.cumsum(keep, dim=1)[rows, cols] - 1
        count = keep.sum(1)
        width = int(count.max()) if len(count) else 0
        shape = (keep.shape[0], width)
        idx = torch.full(shape, -1, dtype=torch.int64, device=keep.device)
        idx[rows, pos] = self.idx[rows, cols]
        self.idx = idx
        for name in ("lo", "hi", "ex"):
            new = torch.full(shape, torch.inf, dtype=torch.float64, device=keep.device)
            new[rows, pos] = getattr(self, name)[rows, cols]
            setattr(self, name, new)
        self.size = int(count.sum())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact raw squared distances (b, k) float64 and indices (b, k), by (distance, index)."""
        valid = self.lo < torch.inf
        self._resolve(valid)
        key = torch.where(valid, self.ex, torch.inf)
        rank = _rank_in_rows([key, torch.where(valid, self.idx, torch.iinfo(torch.int64).max)])
        order = torch.argsort(rank, dim=1)[:, : self.k]
        return key.gather(1, order), self.idx.gather(1, order)


def _pad_by_row(rows: torch.Tensor, vals: torch.Tensor, b: int) -> torch.Tensor:
    """(b, W) float32 with each row's ``vals`` (``rows`` sorted ascending) first, +inf after: a ragged-to-padded
    placement by counting, no sort."""
    count = torch.bincount(rows, minlength=b)
    width = int(count.max()) if len(rows) else 0
    pad = torch.full((b, width), torch.inf, dtype=torch.float32, device=vals.device)
    if len(rows):
        pos = torch.arange(len(rows), device=rows.device) - (torch.cumsum(count, 0) - count)[rows]
        pad[rows, pos] = vals
    return pad


class _RunningBound:
    """Per query, the k smallest fast values of two pools of *distinct* rows, and the bound they give.

    ``groups`` holds group minima (each a different row, the :func:`group_min` of a group of ``_GROUP``), and
    ``values`` the fast values of rows selected so far. Each pool alone names k distinct rows whose exact
    distances are at most (k-th smallest fast value + band), so either pool bounds the k-th nearest; they are
    never mixed, because a row's group minimum and its selected value would count the same row twice.
    """

    def __init__(self, b: int, k: int, device: torch.device) -> None:
        self.k = k
        self.groups = torch.empty((b, 0), dtype=torch.float32, device=device)
        self.values = torch.empty((b, 0), dtype=torch.float32, device=device)
        self.tau = torch.full((b,), torch.inf, dtype=torch.float64, device=device)

    def _tighten(self, pool: torch.Tensor, band: torch.Tensor) -> None:
        if pool.shape[1] >= self.k:
            self.tau = torch.minimum(self.tau, pool.amax(1).double() + band)

    def add_groups(self, gmin_t: torch.Tensor, band: torch.Tensor) -> None:
        """Add a block's group minima, query-major (b, ng)."""
        self.groups = k_smallest_rows(torch.cat([self.groups, gmin_t], dim=1), self.k)
        self._tighten(self.groups, band)

    def add_values(self, padded: torch.Tensor, band: torch.Tensor) -> None:
        """Add fast values of rows not seen before, (b, W) with +inf padding."""
        self.values = k_smallest_rows(torch.cat([self.values, padded], dim=1), self.k)
        self._tighten(self.values, band)


# Which blocks are compared whole. The group minima bound the k-th nearest loosely while fewer than ~k groups
# have been seen (the k-th smallest of 64 group minima is near the top of a block), and while ~k / seen of a
# block's values pass, many groups pass and are gathered element by element. Measured on a 1024 x 1024 block
# (1 thread): the group test costs ~2 ms at 0.3% passing, ~4 ms at 1% and ~14 ms at 5%; one dense,
# query-major threshold test ~5 ms whatever passes. So for k >= _DENSE_MIN_K the first block is dense (its own
# k-th smallest value, by numpy introselect, is the first tight bound), and so is every block while the
# expected passing share k / rows-seen is at least _DENSE_SHARE. For small k the group minima are tight at
# once (k = 1: the smallest group minimum is the block's minimum).
_DENSE_MIN_K = 8
_DENSE_SHARE = 0.02


def _thr32(thr: torch.Tensor) -> torch.Tensor:
    """A float64 threshold as float32, rounded up (never below the float64 value): +inf becomes float32 max."""
    return torch.where(torch.isinf(thr), _FMAX, thr * (1 + 1e-6)).to(torch.float32)


def knn_sq(
    query: ArrayLike,
    ref: ArrayLike,
    k: int,
    geom: Geometry,
    block_q: int,
    block_r: int,
    exclude_self: bool,
    cache_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact raw squared distances (Nq, k) float64 and indices (Nq, k) int64 of the k nearest ref rows."""
    bq_max, br = plan_blocks(geom, block_q, block_r)
    dev = geom.device
    bq = balanced_block(len(query), bq_max, dev)
    cmp = Comparison(ref, len(query), geom, bq, br, cache_bytes)
    tol = cmp.tol
    # Candidates per query before an early exact prune: room for the k plus a block's worth of near-ties.
    cap = 2 * k + 64
    out_sq = torch.empty((len(query), k), dtype=torch.float64, device=dev)
    out_idx = torch.empty((len(query), k), dtype=torch.int64, device=dev)

    def query_block(i0: int) -> None:
        qb, q, pbuf = cmp.query(query, i0, "query")
        b = len(qb)

        def exact(qi: torch.Tensor, rj: torch.Tensor) -> torch.Tensor:
            return exact_pairs(query, qi + i0, ref, rj, geom)

        cands = _Candidates(b, k, dev, exact)
        bound = _RunningBound(b, k, dev)
        rmax, seen = 0.0, 0
        for j0, r in cmp.refs:
            m = r.data.shape[1]
            rmax = max(rmax, float(r.norm.max()))
            band = pair_band(q.norm, torch.tensor(rmax), geom, tol)  # (b,): widest band of each query so far
            diag = None
            if exclude_self and max(i0, j0) < min(i0 + b, j0 + m):
                diag = torch.arange(max(i0, j0), min(i0 + b, j0 + m), device=dev)
            dense = k >= _DENSE_MIN_K and k >= _DENSE_SHARE * seen
            seen += m
            if dense:
                sq, _ = fast_sq(q, r, geom, pbuf)  # (b, m), query-major
                if diag is not None:
                    sq[diag - i0, diag - j0] = torch.inf
                first = bool(torch.isinf(bound.tau).any())
                if first:  # every row of the block: its k-th smallest value is the bound
                    bound.add_values(sq, band)
                qi, rj = torch.nonzero(sq <= _thr32(bound.tau + band)[:, None], as_tuple=True)
                f = sq[qi, rj].double()
                if len(qi) and not first:
                    bound.add_values(_pad_by_row(qi, f.float(), b), band)
            else:
                sq, _ = fast_sq(r, q, geom, pbuf)  # (m, b), reference-major
                if diag is not None:
                    sq[diag - j0, diag - i0] = torch.inf
                gmin = group_min(sq)
                # k group minima are k distinct rows, so the k-th smallest minimum (plus the band) bounds U.
                bound.add_groups(gmin.T, band)  # query-major: contiguous rows
                qi, rj = select_le(sq, _thr32(bound.tau + band), gmin)
                f = sq[rj, qi].double()
                if len(qi) and k > 1:  # k = 1: the smallest group minimum is already the block's minimum
                    bound.add_values(_pad_by_row(qi, f.float(), b), band)
            if len(qi):
                b_ij = pair_band(q.norm[qi], r.norm[rj], geom, tol)
                cands.add(qi, rj + j0, (f - b_ij).clamp_min_(0.0), f + b_ij, torch.where(b_ij == 0, f, torch.nan))
                if cands.size > cap * b:
                    cands.prune(bound.tau)  # early candidates mostly fall behind the tightened bound
                if cands.size > cap * b:
                    bound.tau = torch.minimum(bound.tau, cands.compact(cap))
        cands.prune(bound.tau)
        cands.compact(cap)
        out_sq[i0 : i0 + b], out_idx[i0 : i0 + b] = cands.result()

    run_blocks(list(range(0, len(query), bq)), query_block, dev)
    return out_sq, out_idx
