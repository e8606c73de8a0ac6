"""Distances between images and between feature vectors: one blocked, exact-where-it-matters engine.

Three metrics share one implementation:

* ``"l2"``: Carlini et al.'s normalized L2 between images in [0, 1], ``sqrt(sum((a - b)^2) / d)``
  with ``d`` the number of values per image. Inputs are ``(N, ...)`` (normally ``(N, C, H, W)``),
  ``uint8`` (scaled by 1/255) or float in [0, 1].
* ``"tiled"``: split each ``(C, H, W)`` image into ``grid x grid`` non-overlapping tiles and take the
  maximum over tiles of the normalized L2 of corresponding tiles (Carlini et al. Sec. 4; ``grid=4``
  gives 16 tiles).
* ``"euclidean"``: plain Euclidean distance between feature vectors ``(N, D)``, no scaling and no
  normalization; this is what the distribution metrics (precision/recall, density/coverage) use.

The fast path is the ``|a|^2 + |b|^2 - 2ab`` identity with a float32 (batched, one batch per tile)
matmul. That identity cancels catastrophically for near-copies (two 3x512x512 images 0.75 vs
0.75 + 1e-5 come out at 3.75e-3 instead of 1e-5), which are exactly what an audit looks for. So
(1) both sets are centred on the reference mean first, which shrinks the norms that cancel, and
(2) every distance that is returned, or compared with a threshold, and whose fast value is below
``recompute_below`` or within the float32 error band, is recomputed from direct differences in
float64. Returned distances of :func:`nearest_neighbors` are always exact in that sense.

Everything streams over blocks of rows, and converts ``uint8`` to float one block at a time, so
100,000 x 100,000 image searches run in memory bounded by the block sizes, not by N x M.
All public functions accept numpy arrays or torch tensors and return numpy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffaudit.errors import ConfigError, DataError

#: Names accepted by the ``metric`` argument.
METRICS = ("l2", "tiled", "euclidean")
#: Default number of rows per block (query and reference).
DEFAULT_BLOCK = 1024
#: Default threshold (in the metric's units) below which fast distances are recomputed exactly.
#: Everything near the extraction threshold delta = 0.15 must be exact.
DEFAULT_RECOMPUTE_BELOW = 0.2
# Relative error band of the fast path: a float32 matmul squared distance is trusted only when it is
# farther than _REL_TOL * (|a|^2 + |b|^2) from the value it is compared with. Typical float32 dot
# errors are ~sqrt(d) * 6e-8, so 1e-4 leaves a wide margin while recomputing few pairs.
_REL_TOL = 1e-4
# Images whose float values leave [0, 1] by more than this are rejected (a [-1, 1] tensor would silently give
# distances twice too large).
_RANGE_TOL = 1e-5
# Elements per chunk when recomputing pairs by direct differences (bounds memory of the exact path).
_PAIR_CHUNK_ELEMS = 1 << 22
#: Reference sets whose float32 matmul operands fit in this many bytes are converted once and kept;
#: larger ones are re-read block by block for every block of queries, so memory stays bounded.
REF_CACHE_BYTES = 512 * 2**20

ArrayLike = np.ndarray | torch.Tensor


def _to_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        # from_numpy shares memory; negative strides (e.g. x[::-1]) are not supported by torch.
        return torch.from_numpy(np.ascontiguousarray(x) if any(s < 0 for s in x.strides) else x)
    raise DataError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def as_unit_float(x: ArrayLike, name: str = "images") -> torch.Tensor:
    """Convert images to float32 in [0, 1].

    Args:
        x: images of any shape; ``uint8`` in [0, 255] (divided by 255) or floating point in [0, 1].
        name: what to call ``x`` in error messages.

    Returns:
        float32 torch tensor of the same shape, values in [0, 1].

    Raises:
        DataError: for other dtypes, or float values outside [0, 1] (e.g. images still in [-1, 1]).
    """
    t = _to_tensor(x, name)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if not t.is_floating_point():
        raise DataError(f"{name} must be uint8 in [0, 255] or float in [0, 1], got dtype {t.dtype}")
    t = t.to(torch.float32)
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise DataError(
                f"{name} must be float in [0, 1] (or uint8); got values in [{lo:.4g}, {hi:.4g}]"
                " (images in [-1, 1] need (x + 1) / 2 first)"
            )
    return t


@dataclass(frozen=True)
class _Geometry:
    """How rows of one metric are laid out: ``tiles`` groups of ``tile_dim`` values, scaled by ``scale``."""

    metric: str
    grid: int
    row_shape: tuple[int, ...]
    tiles: int
    tile_dim: int
    scale: float


def _geometry(metric: str, grid: int, x: ArrayLike, y: ArrayLike | None = None) -> _Geometry:
    if metric not in METRICS:
        raise ConfigError(f"unknown distance metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not isinstance(grid, int | np.integer) or isinstance(grid, bool) or grid < 1:
        raise ConfigError(f"tile grid must be a positive integer, got {grid!r}")
    shapes = [tuple(x.shape)] + ([tuple(y.shape)] if y is not None else [])
    for s in shapes:
        if len(s) < 2:
            raise DataError(f"expected a batch of rows shaped (N, ...), got shape {s}")
    row = shapes[0][1:]
    if y is not None and shapes[1][1:] != row:
        raise DataError(f"the two sets have different item shapes {row} and {shapes[1][1:]}")
    d = int(np.prod(row))
    if d == 0:
        raise DataError(f"items of shape {row} have no values")
    if metric == "euclidean":
        return _Geometry(metric, 1, row, 1, d, 1.0)
    if metric == "l2":
        return _Geometry(metric, 1, row, 1, d, 1.0 / d)
    if len(row) != 3:
        raise DataError(f"tiled L2 needs images shaped (N, C, H, W), got shape {shapes[0]}")
    _, h, w = row
    if h % grid or w % grid:
        raise DataError(
            f"image size {h}x{w} is not divisible by the tile grid {grid}; crop or resize the images "
            f"(tiles must cover every pixel)"
        )
    tile_dim = d // (grid * grid)
    return _Geometry(metric, int(grid), row, grid * grid, tile_dim, 1.0 / tile_dim)


def _load(x: ArrayLike, rows: slice | np.ndarray | torch.Tensor, geom: _Geometry, name: str) -> torch.Tensor:
    """Rows of ``x`` as float32 (images scaled to [0, 1], features cast), shape (b, *row_shape)."""
    if isinstance(x, np.ndarray) and isinstance(rows, torch.Tensor):
        rows = rows.numpy()
    block = x[rows]
    if geom.metric == "euclidean":
        t = _to_tensor(block, name)
        if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise DataError(f"{name} must be numeric, got dtype {t.dtype}")
        return t.to(torch.float32)
    return as_unit_float(block, name)


def _center(x: ArrayLike, geom: _Geometry, block: int, name: str) -> torch.Tensor:
    """A centre for both sets (float32, shape row_shape): the mean of the first block of ``x``.

    Distances are translation invariant, so any centre is correct; one near the data shrinks the norms that
    cancel in the fast path, and the first block's mean does that without a full pass over ``x``.
    """
    return _load(x, slice(0, block), geom, name).mean(0, dtype=torch.float64).to(torch.float32)


@dataclass(frozen=True)
class _Operand:
    """One block ready for the fused matmul: (tiles, b, tile_dim + 2) float32 and its largest tile norm."""

    data: torch.Tensor
    max_norm: float


def _operand(xb: torch.Tensor, geom: _Geometry, center: torch.Tensor, side: str) -> _Operand:
    """Centre a block, cut it into tiles, and append the norm columns of the fused distance matmul.

    Query rows become ``[q, |q|^2, 1]`` and reference rows ``[-2r, 1, |r|^2]``, so one (batched) matmul
    yields ``|q|^2 + |r|^2 - 2 q.r`` per tile with no extra passes over the (bq, br) result.
    """
    b = xb.shape[0]
    out = torch.empty((geom.tiles, b, geom.tile_dim + 2), dtype=torch.float32)
    body = out[:, :, : geom.tile_dim]
    # Centre and re-lay out in one pass, writing straight into the operand (no intermediate copies).
    if geom.metric == "tiled":
        ch, h, w = geom.row_shape
        g = geom.grid
        dst = body.view(g, g, b, ch, h // g, w // g)  # view, never a copy: we write through it
        perm = (2, 4, 0, 1, 3, 5)
        src = xb.reshape(b, ch, g, h // g, g, w // g).permute(perm)
        torch.sub(src, center.reshape(1, ch, g, h // g, g, w // g).permute(perm), out=dst)
    else:
        torch.sub(xb.reshape(1, b, geom.tile_dim), center.reshape(1, 1, geom.tile_dim), out=body)
    norms = (body * body).sum(-1)  # (T, b)
    if side == "query":
        out[:, :, -2] = norms
        out[:, :, -1] = 1.0
    else:
        body.mul_(-2.0)
        out[:, :, -2] = 1.0
        out[:, :, -1] = norms
    return _Operand(out, float(norms.max()) if norms.numel() else 0.0)


def _fast_sq(q: _Operand, r: _Operand, geom: _Geometry) -> tuple[torch.Tensor, float]:
    """Fast squared distances (bq, br) float32, max over tiles, and the scalar error band around them.

    Both are in *unscaled* units: times ``geom.scale`` gives the metric's squared distance.
    """
    prod = torch.bmm(q.data, r.data.transpose(1, 2))  # (T, bq, br)
    sq = prod[0] if geom.tiles == 1 else prod.amax(0)
    return sq, _REL_TOL * (q.max_norm + r.max_norm)


def _exact_rows_sq(a: torch.Tensor, b: torch.Tensor, geom: _Geometry) -> torch.Tensor:
    """Exact squared distances between aligned rows a[p], b[p] (float32, same shape): float64 (P,)."""
    # Differences in float64 too: float32 a - b would round (not cancel) when a and b are far apart.
    diff = a.to(torch.float64) - b.to(torch.float64)
    diff.mul_(diff)
    p = diff.shape[0]
    if geom.metric == "tiled":
        ch, h, w = geom.row_shape
        g = geom.grid
        per_tile = diff.reshape(p, ch, g, h // g, g, w // g).sum(dim=(1, 3, 5))
        return per_tile.reshape(p, -1).amax(1) * geom.scale
    return diff.reshape(p, -1).sum(1) * geom.scale


def _chunk(geom: _Geometry) -> int:
    return max(1, _PAIR_CHUNK_ELEMS // int(np.prod(geom.row_shape)))


def _exact_pairs(qb: torch.Tensor, qi: torch.Tensor, ref: ArrayLike, rj: torch.Tensor, geom: _Geometry) -> torch.Tensor:
    """Exact squared distances for pairs (qb[qi[p]], ref[rj[p]]), loading the ref rows: float64 (P,)."""
    out = torch.empty(len(qi), dtype=torch.float64)
    step = _chunk(geom)
    for s in range(0, len(qi), step):
        sl = slice(s, s + step)
        out[sl] = _exact_rows_sq(qb[qi[sl]], _load(ref, rj[sl], geom, "ref"), geom)
    return out


class _RefBlocks:
    """The reference set as (first row, matmul operand) blocks; converted once if within REF_CACHE_BYTES."""

    def __init__(self, ref: ArrayLike, geom: _Geometry, center: torch.Tensor, block: int) -> None:
        self._ref, self._geom, self._center, self._block = ref, geom, center, block
        size = len(ref) * geom.tiles * (geom.tile_dim + 2) * 4
        self._cache = list(self._load_all()) if size <= REF_CACHE_BYTES else None

    def _load_all(self):  # noqa: ANN202 - a generator of (int, _Operand)
        for j0 in range(0, len(self._ref), self._block):
            rb = _load(self._ref, slice(j0, j0 + self._block), self._geom, "ref")
            yield j0, _operand(rb, self._geom, self._center, "ref")

    def __iter__(self):  # noqa: ANN204
        return iter(self._cache) if self._cache is not None else self._load_all()


def _check_block(block: int, name: str) -> int:
    if not isinstance(block, int | np.integer) or isinstance(block, bool) or block < 1:
        raise ConfigError(f"{name} must be a positive integer, got {block!r}")
    return int(block)


def _check_rows(x: ArrayLike, name: str) -> None:
    if len(x) == 0:
        raise DataError(f"{name} is empty")


def _pairs_same_shape(a: ArrayLike, b: ArrayLike, geom: _Geometry) -> np.ndarray:
    if len(a) != len(b):
        raise DataError(f"elementwise distances need equal batch sizes, got {len(a)} and {len(b)}")
    out = np.empty(len(a), dtype=np.float32)
    step = _chunk(geom)
    for s in range(0, len(a), step):
        sl = slice(s, s + step)
        sq = _exact_rows_sq(_load(a, sl, geom, "a"), _load(b, sl, geom, "b"), geom)
        out[sl] = sq.sqrt().numpy()
    return out


def normalized_l2(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Normalized L2 of corresponding pairs, ``sqrt(sum((a_i - b_i)^2) / d)``, computed by direct differences.

    Args:
        a, b: images ``(N, ...)`` (normally ``(N, C, H, W)``), same shape; ``uint8`` or float in [0, 1].

    Returns:
        float32 array ``(N,)``; 0 for identical images, 1 for black vs white.
    """
    geom = _geometry("l2", 1, a, b)
    return _pairs_same_shape(a, b, geom)


def tiled_l2(a: ArrayLike, b: ArrayLike, grid: int = 4) -> np.ndarray:
    """Tiled L2 of corresponding pairs: max over ``grid x grid`` tiles of the tiles' normalized L2.

    Args:
        a, b: images ``(N, C, H, W)``, same shape, ``uint8`` or float in [0, 1];
            H and W divisible by ``grid``.
        grid: tiles per side (4 gives Carlini et al.'s 16 tiles).

    Returns:
        float32 array ``(N,)``.

    Raises:
        DataError: if H or W is not divisible by ``grid`` (pixels are never dropped silently).
    """
    geom = _geometry("tiled", grid, a, b)
    return _pairs_same_shape(a, b, geom)


def pairwise_distances(
    x: ArrayLike,
    y: ArrayLike,
    metric: str = "l2",
    grid: int = 4,
    block: int = DEFAULT_BLOCK,
    recompute_below: float = DEFAULT_RECOMPUTE_BELOW,
) -> np.ndarray:
    """All-pairs distance matrix, blocked fast matmul plus exact recompute of small entries.

    Args:
        x: ``(N, ...)`` rows (images for "l2"/"tiled", features ``(N, D)`` for "euclidean").
        y: ``(M, ...)`` rows with the same item shape.
        metric: "l2", "tiled" or "euclidean" (see module docstring).
        grid: tiles per side for "tiled".
        block: rows per block of ``x`` and of ``y``.
        recompute_below: entries whose fast distance is below this (in the metric's units), or within the
            float32 error band of zero, are recomputed from direct differences.

    Returns:
        float32 array ``(N, M)``.
    """
    geom = _geometry(metric, grid, x, y)
    block = _check_block(block, "block")
    _check_rows(x, "x")
    _check_rows(y, "y")
    center = _center(y, geom, block, "y")
    ref_blocks = _RefBlocks(y, geom, center, block)
    out = np.empty((len(x), len(y)), dtype=np.float32)
    thr_sq = float(recompute_below) ** 2 / geom.scale  # in the unscaled units of _fast_sq
    for i0 in range(0, len(x), block):
        qb = _load(x, slice(i0, i0 + block), geom, "x")
        q = _operand(qb, geom, center, "query")
        for j0, r in ref_blocks:
            sq, band = _fast_sq(q, r, geom)
            sq.clamp_min_(0.0).mul_(geom.scale)
            qi, rj = torch.nonzero(sq < max(thr_sq, band) * geom.scale, as_tuple=True)
            if len(qi):
                sq[qi, rj] = _exact_pairs(qb, qi, y, rj + j0, geom).to(torch.float32)
            out[i0 : i0 + len(qb), j0 : j0 + sq.shape[1]] = sq.sqrt_().numpy()
    return out


def pairwise_l2(
    x: ArrayLike, y: ArrayLike, block: int = DEFAULT_BLOCK, recompute_below: float = DEFAULT_RECOMPUTE_BELOW
) -> np.ndarray:
    """Normalized L2 matrix ``(N, M)`` float32 between images ``x (N, ...)`` and ``y (M, ...)``.

    ``uint8`` or float in [0, 1]. See :func:`pairwise_distances`.
    """
    return pairwise_distances(x, y, "l2", 1, block, recompute_below)


def pairwise_tiled_l2(
    x: ArrayLike,
    y: ArrayLike,
    grid: int = 4,
    block: int = DEFAULT_BLOCK,
    recompute_below: float = DEFAULT_RECOMPUTE_BELOW,
) -> np.ndarray:
    """Tiled L2 matrix ``(N, M)`` float32 between images ``x (N, C, H, W)`` and ``y (M, C, H, W)``.

    One batched matmul per tile position, max over tiles. See :func:`pairwise_distances`.
    """
    return pairwise_distances(x, y, "tiled", grid, block, recompute_below)


def _knn_sq(
    query: ArrayLike,
    ref: ArrayLike,
    k: int,
    geom: _Geometry,
    block_q: int,
    block_r: int,
    exclude_self: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared distances (Nq, k) float64 and indices (Nq, k) int64 of the k nearest ref rows."""
    center = _center(ref, geom, block_r, "ref")
    ref_blocks = _RefBlocks(ref, geom, center, block_r)
    available = len(ref) - (1 if exclude_self else 0)
    # Keep extra candidates from the fast pass, then rank them by exact distance: the fast pass can misorder
    # near-copies whose distances differ by less than its float32 error.
    keep = min(k + max(k, 4), available)
    out_sq = np.empty((len(query), k), dtype=np.float64)
    out_idx = np.empty((len(query), k), dtype=np.int64)
    for i0 in range(0, len(query), block_q):
        qb = _load(query, slice(i0, i0 + block_q), geom, "query")
        bq = len(qb)
        q = _operand(qb, geom, center, "query")
        best_sq = torch.empty((bq, 0), dtype=torch.float32)
        best_idx = torch.empty((bq, 0), dtype=torch.int64)
        band = 0.0
        for j0, r in ref_blocks:
            sq, block_band = _fast_sq(q, r, geom)
            band = max(band, block_band)
            if exclude_self:
                lo, hi = max(i0, j0), min(i0 + bq, j0 + sq.shape[1])
                if lo < hi:
                    diag = torch.arange(lo, hi)
                    sq[diag - i0, diag - j0] = math.inf
            # Top-k inside the block, then merge with the running top-k (small): no (bq, br) index matrix.
            top = torch.topk(sq, min(keep, sq.shape[1]), dim=1, largest=False, sorted=False)
            cand_sq = torch.cat([best_sq, top.values], 1)
            cand_idx = torch.cat([best_idx, top.indices + j0], 1)
            if cand_sq.shape[1] > keep:
                top = torch.topk(cand_sq, keep, dim=1, largest=False, sorted=False)
                cand_sq, cand_idx = top.values, torch.gather(cand_idx, 1, top.indices)
            best_sq, best_idx = cand_sq, cand_idx
        # Exact recompute of the candidates that can still be among the k nearest: those whose fast distance
        # is within twice the error band of the k-th fast distance (usually just k of them), chunked.
        kth = best_sq.kthvalue(k, dim=1).values
        need_q, need_c = torch.nonzero(best_sq <= (kth + 2 * band).unsqueeze(1), as_tuple=True)
        flat_r = best_idx[need_q, need_c]
        exact = torch.full((bq, keep), math.inf, dtype=torch.float64)
        exact[need_q, need_c] = _exact_pairs(qb, need_q, ref, flat_r, geom)
        ex = exact.numpy()
        ids = best_idx.numpy()
        order = np.lexsort((ids, ex), axis=-1)[:, :k]  # by distance, ties by index (deterministic)
        out_sq[i0 : i0 + bq] = np.take_along_axis(ex, order, 1)
        out_idx[i0 : i0 + bq] = np.take_along_axis(ids, order, 1)
    return out_sq, out_idx


def _check_k(k: int, available: int, what: str) -> int:
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k > available:
        raise DataError(f"k={k} neighbours requested but {what} has only {available} candidates")
    return int(k)


def nearest_neighbors(
    query: ArrayLike,
    ref: ArrayLike,
    k: int = 1,
    metric: str = "l2",
    grid: int = 4,
    block_q: int = DEFAULT_BLOCK,
    block_r: int = DEFAULT_BLOCK,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of ``ref`` for every row of ``query``, streamed with a running top-k.

    Memory is bounded by the block sizes (plus the (Nq, k) output), so 100,000 x 100,000 searches fit.

    Args:
        query: ``(Nq, ...)`` rows: images (``uint8`` or float in [0, 1]) for "l2"/"tiled", features for
            "euclidean".
        ref: ``(Nr, ...)`` rows with the same item shape.
        k: neighbours per query row.
        metric: "l2" (normalized, images), "tiled" (images, ``grid x grid`` tiles) or "euclidean" (features).
        grid: tiles per side for "tiled".
        block_q, block_r: rows per block of query and ref.
        exclude_self: ``query`` and ``ref`` are the same set; row i is never its own neighbour (an identical
            duplicate at another index still is).

    Returns:
        ``(dist, index)``: float32 ``(Nq, k)`` exact distances, ascending (ties broken by lower index), and
        int64 ``(Nq, k)`` row indices into ``ref``.
    """
    geom = _geometry(metric, grid, query, ref)
    block_q, block_r = _check_block(block_q, "block_q"), _check_block(block_r, "block_r")
    _check_rows(query, "query")
    _check_rows(ref, "ref")
    if exclude_self and len(query) != len(ref):
        raise DataError(f"exclude_self needs query and ref to be one set; got {len(query)} and {len(ref)} rows")
    k = _check_k(k, len(ref) - (1 if exclude_self else 0), "ref")
    sq, idx = _knn_sq(query, ref, k, geom, block_q, block_r, exclude_self)
    return np.sqrt(sq).astype(np.float32), idx


def knn_radii(
    x: ArrayLike,
    k: int,
    metric: str = "euclidean",
    grid: int = 4,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest *other* row (the row itself excluded).

    This is the radius of the k-NN ball used by precision/recall (Kynkaanniemi et al.) and density/coverage
    (Naeem et al.); it matches ``prdc.compute_nearest_neighbour_distances``.

    Args:
        x: ``(N, ...)`` rows, N > k.
        k: which neighbour.
        metric, grid, block: as in :func:`nearest_neighbors`.

    Returns:
        float64 array ``(N,)`` of exact distances (float64, so comparisons with other exact
        distances are consistent).
    """
    geom = _geometry(metric, grid, x)
    block = _check_block(block, "block")
    _check_rows(x, "x")
    k = _check_k(k, len(x) - 1, "x (excluding each row itself)")
    sq, _ = _knn_sq(x, x, k, geom, block, block, exclude_self=True)
    return np.sqrt(sq[:, k - 1])


def count_within_radii(
    query: ArrayLike,
    ref: ArrayLike,
    ref_radii: np.ndarray,
    metric: str = "euclidean",
    grid: int = 4,
    block_q: int = DEFAULT_BLOCK,
    block_r: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """For each query row, how many ref rows j have ``dist(query_i, ref_j) < ref_radii[j]`` (strictly).

    Pairs whose fast distance lies within the float32 error band of the radius are decided on exact distances,
    so the counts equal those of a brute-force float64 computation.

    Args:
        query: ``(Nq, ...)`` rows.
        ref: ``(Nr, ...)`` rows with the same item shape.
        ref_radii: ``(Nr,)`` radii, e.g. from :func:`knn_radii` of ``ref``.
        metric, grid, block_q, block_r: as in :func:`nearest_neighbors`.

    Returns:
        int64 array ``(Nq,)``.
    """
    geom = _geometry(metric, grid, query, ref)
    block_q, block_r = _check_block(block_q, "block_q"), _check_block(block_r, "block_r")
    _check_rows(query, "query")
    _check_rows(ref, "ref")
    radii64 = torch.as_tensor(np.asarray(ref_radii, dtype=np.float64))
    if radii64.shape != (len(ref),):
        raise DataError(f"ref_radii has shape {tuple(radii64.shape)}, expected ({len(ref)},)")
    radii_sq = (radii64 * radii64 / geom.scale).to(torch.float32)  # unscaled units of _fast_sq
    center = _center(ref, geom, block_r, "ref")
    ref_blocks = _RefBlocks(ref, geom, center, block_r)
    counts = np.zeros(len(query), dtype=np.int64)
    for i0 in range(0, len(query), block_q):
        qb = _load(query, slice(i0, i0 + block_q), geom, "query")
        q = _operand(qb, geom, center, "query")
        for j0, r in ref_blocks:
            sq, band = _fast_sq(q, r, geom)
            r2 = radii_sq[j0 : j0 + sq.shape[1]].unsqueeze(0)
            # Widen the band by the float32 rounding of the squared radii themselves.
            unsure = (sq - r2).abs_() <= band + 1e-6 * r2
            sure_in = (sq < r2) & ~unsure
            c = sure_in.sum(1)
            qi, rj = torch.nonzero(unsure, as_tuple=True)
            if len(qi):
                d = _exact_pairs(qb, qi, ref, rj + j0, geom).sqrt()
                inside = d < radii64[j0 + rj]
                c.index_add_(0, qi[inside], torch.ones(int(inside.sum()), dtype=c.dtype))
            counts[i0 : i0 + len(qb)] += c.numpy()
    return counts
