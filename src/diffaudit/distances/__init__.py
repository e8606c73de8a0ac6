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

The fast path is the ``|a|^2 + |b|^2 - 2ab`` identity with one matmul per tile (``_operand``). In float32
that identity cancels catastrophically for near-copies (two 3x512x512 images 0.75 vs 0.75 + 1e-5 come out at
3.75e-3 instead of 1e-5), which are exactly what an audit looks for. So (1) both sets are centred on a
reference mean first, which shrinks the norms that cancel, and (2) every distance that is returned, or
compared with a threshold, and whose fast value is below ``recompute_below`` or within the float32 error band,
is recomputed from direct differences (integer arithmetic for uint8 images, float64 otherwise). uint8 images
on a CPU with a fast int8 matmul (AMX / VNNI) take an exact integer pass instead (``x - 128`` is exactly int8),
with nothing to recompute. Returned distances of :func:`nearest_neighbors` are always exact in that sense,
and ties go to the lower index however many exact copies there are (``_knn_fused`` on the CPU, ``_knn`` on
CUDA).

Everything streams over blocks of rows, so 100,000 x 100,000 image searches run in memory bounded by the
block sizes, not by N x M: the ``block`` arguments are upper bounds, and the engine may use smaller compute
blocks chosen so one (bq, br) product stays within ``_operand.FAST_TILE_BYTES``. Reference sets whose matmul
operand fits in ``REF_CACHE_BYTES`` are converted once and kept.

All public functions accept numpy arrays or torch tensors and return numpy arrays. They compute on the
device of the first torch tensor argument (CUDA when the input lives there), the CPU for numpy arrays. On the
CPU, blocks of query rows run on ``torch.get_num_threads()`` threads at once (``_parallel``); results are the
same, bit for bit, for any thread count.
"""

from __future__ import annotations

import numpy as np
import torch

from diffaudit.distances import _engine, _knn_fused
from diffaudit.distances._engine import METRICS, ArrayLike, check_unit_range, geometry, to_tensor
from diffaudit.distances._knn import knn_sq
from diffaudit.distances._pairwise import count_within, pairwise_matrix
from diffaudit.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_RECOMPUTE_BELOW",
    "METRICS",
    "REF_CACHE_BYTES",
    "as_unit_float",
    "count_within_radii",
    "knn_radii",
    "nearest_neighbors",
    "normalized_l2",
    "pairwise_distances",
    "pairwise_l2",
    "pairwise_tiled_l2",
    "tiled_l2",
]

#: Default upper bound on rows per block (query and reference).
DEFAULT_BLOCK = 2048
#: Default threshold (in the metric's units) below which fast distances are recomputed exactly.
#: Everything near the extraction threshold delta = 0.15 must be exact.
DEFAULT_RECOMPUTE_BELOW = 0.2
#: Reference sets whose float32 matmul operands fit in this many bytes are converted once and kept;
#: larger ones are re-read block by block for every block of queries, so memory stays bounded.
#: Read at call time, so it can be changed on this module.
REF_CACHE_BYTES = 512 * 2**20


def as_unit_float(x: ArrayLike, name: str = "images") -> torch.Tensor:
    """Convert images to float32 in [0, 1].

    Args:
        x: images of any shape; ``uint8`` in [0, 255] (divided by 255) or floating point in [0, 1].
        name: what to call ``x`` in error messages.

    Returns:
        float32 torch tensor of the same shape, values in [0, 1], on ``x``'s device.

    Raises:
        DataError: for other dtypes, or float values outside [0, 1] (e.g. images still in [-1, 1]).
    """
    t = to_tensor(x, name)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if not t.is_floating_point():
        raise DataError(f"{name} must be uint8 in [0, 255] or float in [0, 1], got dtype {t.dtype}")
    t = t.to(torch.float32)
    check_unit_range(t, name)
    return t


def _check_block(block: int, name: str) -> int:
    if not isinstance(block, int | np.integer) or isinstance(block, bool) or block < 1:
        raise ConfigError(f"{name} must be a positive integer, got {block!r}")
    return int(block)


def _check_rows(x: ArrayLike, name: str) -> None:
    if len(x) == 0:
        raise DataError(f"{name} is empty")


def _pairs_same_shape(a: ArrayLike, b: ArrayLike, geom: _engine.Geometry) -> np.ndarray:
    if len(a) != len(b):
        raise DataError(f"elementwise distances need equal batch sizes, got {len(a)} and {len(b)}")
    out = np.empty(len(a), dtype=np.float32)
    step = _engine.chunk_rows(geom)
    for s in range(0, len(a), step):
        sl = slice(s, s + step)
        sq = _engine.exact_rows_sq(_engine.load(a, sl, geom, "a"), _engine.load(b, sl, geom, "b"), geom)
        out[sl] = sq.mul_(geom.scale).sqrt_().cpu().numpy()
    return out


def normalized_l2(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Normalized L2 of corresponding pairs, ``sqrt(sum((a_i - b_i)^2) / d)``, computed by direct differences.

    Args:
        a, b: images ``(N, ...)`` (normally ``(N, C, H, W)``), same shape; ``uint8`` or float in [0, 1].

    Returns:
        float32 array ``(N,)``; 0 for identical images, 1 for black vs white.
    """
    return _pairs_same_shape(a, b, geometry("l2", 1, a, b))


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
    return _pairs_same_shape(a, b, geometry("tiled", grid, a, b))


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
        y: ``(M, ...)`` rows with the same item shape. Passing the same object as ``x`` computes each
            symmetric pair once.
        metric: "l2", "tiled" or "euclidean" (see module docstring).
        grid: tiles per side for "tiled".
        block: upper bound on rows per block of ``x`` and of ``y``.
        recompute_below: entries whose fast distance is below this (in the metric's units), or within the
            float32 error band of zero, are recomputed from direct differences.

    Returns:
        float32 array ``(N, M)``.
    """
    geom = geometry(metric, grid, x, y)
    block = _check_block(block, "block")
    _check_rows(x, "x")
    _check_rows(y, "y")
    return pairwise_matrix(x, y, geom, block, recompute_below, REF_CACHE_BYTES)


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
    query: ArrayLike, ref: ArrayLike, k: int, geom: _engine.Geometry, block_q: int, block_r: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact raw squared k-NN distances and indices: the fused selection on the CPU, the torch one elsewhere."""
    if geom.device.type == "cpu" and _knn_fused.ENABLED:
        return _knn_fused.knn_sq_fused(query, ref, k, geom, block_q, block_r, exclude_self, REF_CACHE_BYTES)
    return knn_sq(query, ref, k, geom, block_q, block_r, exclude_self, REF_CACHE_BYTES)


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
    """The k nearest rows of ``ref`` for every row of ``query``, streamed over blocks.

    Memory is bounded by the block sizes (plus the (Nq, k) output), so 100,000 x 100,000 searches fit.
    The result does not depend on the block sizes, however many rows of ``ref`` are exact copies.

    Args:
        query: ``(Nq, ...)`` rows: images (``uint8`` or float in [0, 1]) for "l2"/"tiled", features for
            "euclidean".
        ref: ``(Nr, ...)`` rows with the same item shape.
        k: neighbours per query row.
        metric: "l2" (normalized, images), "tiled" (images, ``grid x grid`` tiles) or "euclidean" (features).
        grid: tiles per side for "tiled".
        block_q, block_r: upper bounds on rows per block of query and ref.
        exclude_self: ``query`` and ``ref`` are the same set; row i is never its own neighbour (an identical
            duplicate at another index still is).

    Returns:
        ``(dist, index)``: float32 ``(Nq, k)`` exact distances, ascending (ties broken by lower index), and
        int64 ``(Nq, k)`` row indices into ``ref``.
    """
    geom = geometry(metric, grid, query, ref)
    block_q, block_r = _check_block(block_q, "block_q"), _check_block(block_r, "block_r")
    _check_rows(query, "query")
    _check_rows(ref, "ref")
    if exclude_self and len(query) != len(ref):
        raise DataError(f"exclude_self needs query and ref to be one set; got {len(query)} and {len(ref)} rows")
    k = _check_k(k, len(ref) - (1 if exclude_self else 0), "ref")
    sq, idx = _knn_sq(query, ref, k, geom, block_q, block_r, exclude_self)
    return sq.mul_(geom.scale).sqrt_().to(torch.float32).cpu().numpy(), idx.cpu().numpy()


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
    geom = geometry(metric, grid, x)
    block = _check_block(block, "block")
    _check_rows(x, "x")
    k = _check_k(k, len(x) - 1, "x (excluding each row itself)")
    sq, _ = _knn_sq(x, x, k, geom, block, block, True)
    return (sq[:, k - 1] * geom.scale).sqrt_().cpu().numpy()


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
    geom = geometry(metric, grid, query, ref)
    block_q, block_r = _check_block(block_q, "block_q"), _check_block(block_r, "block_r")
    _check_rows(query, "query")
    _check_rows(ref, "ref")
    radii64 = torch.as_tensor(np.asarray(ref_radii, dtype=np.float64))
    if radii64.shape != (len(ref),):
        raise DataError(f"ref_radii has shape {tuple(radii64.shape)}, expected ({len(ref)},)")
    return count_within(query, ref, radii64, geom, block_q, block_r, REF_CACHE_BYTES)
