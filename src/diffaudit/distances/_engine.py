"""The fast pass and the exact pass shared by every distance function (internal).

Units: "raw" squared distances. When both sets are ``uint8`` images they stay in 0..255 units (no conversion
pass, and the exact pass is integer arithmetic, exact in float64); otherwise images are float32 in [0, 1] and
features are cast to float32. ``Geometry.scale`` turns a raw squared distance into the metric's squared value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from diffaudit.distances._parallel import ThreadScratch
from diffaudit.errors import ConfigError, DataError

METRICS = ("l2", "tiled", "euclidean")
# Images whose float values leave [0, 1] by more than this are rejected (a [-1, 1] tensor would silently give
# distances twice too large).
_RANGE_TOL = 1e-5
# Elements per chunk when recomputing pairs by direct differences (bounds memory of the exact path).
_PAIR_CHUNK_ELEMS = 1 << 22
# Bytes of the (bq, br) float32 fast-pass product (per tile): small enough to stay near the core between the
# matmul and the reductions that read it (max over tiles, group minima), large enough for an efficient matmul.
FAST_TILE_BYTES = 4 << 20
# Most reference rows per compute block: the selection after the matmul works row by row on this many values.
MAX_BLOCK_R = 2048
# Relative error band of the float32 fast pass at full float32 matmul precision: |fast - exact| is trusted to
# be below _REL_TOL * (|q|^2 + |r|^2) (centred norms, largest tile). Float32 dot products of length n err by
# ~sqrt(n) * 6e-8 in practice, so 1e-4 is a >10x margin up to n ~ 10^5 values per tile.
_REL_TOL = 1e-4


def rel_tol(device: torch.device) -> float:
    """The relative error band for matmuls on ``device`` under the process's float32 matmul precision."""
    reduced = torch.get_float32_matmul_precision() != "highest"
    if device.type == "cuda":
        reduced = reduced or bool(torch.backends.cuda.matmul.allow_tf32)
    # TF32 / bf16 matmuls keep 10 / 7 mantissa bits: widen the band so the exact pass still catches everything.
    return 3e-2 if reduced else _REL_TOL


ArrayLike = np.ndarray | torch.Tensor


def to_tensor(x: object, name: str) -> torch.Tensor:
    """A tensor view of ``x`` on its own device (numpy arrays share memory, on the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        # from_numpy shares memory; negative strides (e.g. x[::-1]) are not supported by torch.
        return torch.from_numpy(np.ascontiguousarray(x) if any(s < 0 for s in x.strides) else x)
    raise DataError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def check_unit_range(t: torch.Tensor, name: str) -> None:
    """Raise DataError unless the float tensor ``t`` is finite and within [0, 1] (up to rounding)."""
    if not t.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(t))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise DataError(
            f"{name} must be float in [0, 1] (or uint8); got values in [{lo:.4g}, {hi:.4g}]"
            " (images in [-1, 1] need (x + 1) / 2 first)"
        )


@dataclass(frozen=True)
class Geometry:
    """Layout of one comparison: ``tiles`` groups of ``tile_dim`` values; raw squared distance x scale = metric's."""

    metric: str
    grid: int
    row_shape: tuple[int, ...]
    tiles: int
    tile_dim: int
    scale: float
    raw_u8: bool  # both sets uint8 images, kept in 0..255 units
    device: torch.device


def _dtype(x: object) -> object:
    return x.dtype


def geometry(metric: str, grid: int, x: ArrayLike, y: ArrayLike | None = None) -> Geometry:
    """Validate metric, grid and shapes of ``x`` (and ``y``) and describe their layout."""
    if metric not in METRICS:
        raise ConfigError(f"unknown distance metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not isinstance(grid, int | np.integer) or isinstance(grid, bool) or grid < 1:
        raise ConfigError(f"tile grid must be a positive integer, got {grid!r}")
    sets = [x] + ([y] if y is not None else [])
    for s in sets:
        if not isinstance(s, np.ndarray | torch.Tensor):
            raise DataError(f"inputs must be numpy arrays or torch tensors, got {type(s).__name__}")
        if s.ndim < 2:
            raise DataError(f"expected a batch of rows shaped (N, ...), got shape {tuple(s.shape)}")
    row = tuple(x.shape[1:])
    if y is not None and tuple(y.shape[1:]) != row:
        raise DataError(f"the two sets have different item shapes {row} and {tuple(y.shape[1:])}")
    d = int(np.prod(row))
    if d == 0:
        raise DataError(f"items of shape {row} have no values")
    # Computation follows the data: the first torch tensor's device (CUDA when the input lives there).
    devices = [s.device for s in sets if isinstance(s, torch.Tensor)]
    device = devices[0] if devices else torch.device("cpu")
    u8 = all(str(_dtype(s)) in ("uint8", "torch.uint8") for s in sets)
    if metric == "euclidean":
        return Geometry(metric, 1, row, 1, d, 1.0, False, device)
    raw = 1.0 / 255.0**2 if u8 else 1.0
    if metric == "l2":
        return Geometry(metric, 1, row, 1, d, raw / d, u8, device)
    if len(row) != 3:
        raise DataError(f"tiled L2 needs images shaped (N, C, H, W), got shape {(len(x), *row)}")
    _, h, w = row
    if h % grid or w % grid:
        raise DataError(
            f"image size {h}x{w} is not divisible by the tile grid {grid}; crop or resize the images "
            f"(tiles must cover every pixel)"
        )
    tile_dim = d // (grid * grid)
    return Geometry(metric, int(grid), row, grid * grid, tile_dim, raw / tile_dim, u8, device)


def load(x: ArrayLike, rows: slice | torch.Tensor, geom: Geometry, name: str) -> torch.Tensor:
    """Rows of ``x`` in raw units on ``geom.device``: uint8 as is when ``geom.raw_u8``, else float32."""
    if isinstance(x, np.ndarray) and isinstance(rows, torch.Tensor):
        rows = rows.cpu().numpy()
    elif isinstance(x, torch.Tensor) and isinstance(rows, torch.Tensor):
        rows = rows.to(x.device)
    t = to_tensor(x[rows], name).to(geom.device)
    if geom.raw_u8:
        return t
    if geom.metric == "euclidean":
        if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise DataError(f"{name} must be numeric, got dtype {t.dtype}")
        return t.to(torch.float32)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if not t.is_floating_point():
        raise DataError(f"{name} must be uint8 in [0, 255] or float in [0, 1], got dtype {t.dtype}")
    t = t.to(torch.float32)
    check_unit_range(t, name)
    return t


def _tile_view(t: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(b, *row) -> (tiles, b, tile_dim) as a view for the flat metrics, a strided view for "tiled"."""
    b = t.shape[0]
    if geom.metric != "tiled":
        return t.reshape(1, b, geom.tile_dim)
    ch, h, w = geom.row_shape
    g = geom.grid
    return t.reshape(b, ch, g, h // g, g, w // g).permute(2, 4, 0, 1, 3, 5)


# Rows averaged for the centre: enough to land near the data, and few enough for exact float32 sums of uint8.
_CENTER_ROWS = 256


def center_of(x: ArrayLike, geom: Geometry, rows: int) -> torch.Tensor:
    """A centre for both sets, (tiles, 1, tile_dim) float32: the mean of the first ``rows`` rows of ``x``.

    Distances are translation invariant, so any centre is correct; one near the data shrinks the norms that
    cancel in the fast path. For uint8 it is rounded to integers, so centred values stay exact in float32.
    """
    first = load(x, slice(0, min(rows, _CENTER_ROWS)), geom, "ref")
    # uint8: at most 256 rows of 0..255 sum exactly in float32 (no float64 copy of the rows).
    mean = first.reshape(len(first), -1).sum(0, dtype=torch.float32).div_(len(first))
    if geom.raw_u8:
        mean = mean.round_()
    tiled = _tile_view(mean.to(torch.float32).reshape(1, *geom.row_shape), geom)
    return tiled.reshape(geom.tiles, 1, geom.tile_dim).contiguous()


# With uint8 images centred on an integer, every value, product and partial sum of the fused float32 dot
# product is an integer; all are exact while the sum of absolute terms, at most 2 (|q|^2 + |r|^2), stays below
# 2^24. Pairs with |q|^2 + |r|^2 < EXACT_NORM_SUM therefore have exact fast values: no band, no recompute.
EXACT_NORM_SUM = float(2**23)


def _sq_norms(body: torch.Tensor, geom: Geometry, step: int = 1) -> torch.Tensor:
    """Squared norms (tiles, b) float32 of the rows of ``body``; exact for uint8 images (integers, multiples of
    ``step`` squared: ``step`` = 2 for the reference side's -2 (r - c)), correctly rounded above 2^24."""
    # Measured: mul + sum is 3x faster than linalg.vecdot, 2x faster than square() and 6x faster than a
    # float64 vector_norm (the float32 vector_norm is faster still, but its sqrt loses the exact integer).
    sq = torch.mul(body, body)
    chunk = 2**24 // (step * step * 255 * 255)  # centred uint8 terms per float32 partial sum that stays exact
    n = sq.shape[-1]
    if not geom.raw_u8 or n <= chunk:
        return sq.sum(-1)
    # Terms are non-negative integers, so every partial sum of a chunk is exact in float32; the partial sums
    # add up exactly in float64. (Rows of 3x32x32 random images pass 2^24 about half the time: a float64
    # redo of those rows cost 15% of a 3x32x32 nearest-neighbour search.)
    main = n - n % chunk
    total = sq[..., :main].unflatten(-1, (main // chunk, chunk)).sum(-1).double().sum(-1)
    if main < n:
        total += sq[..., main:].sum(-1).double()
    return total.to(torch.float32)


def pair_band(qn: torch.Tensor, rn: torch.Tensor, geom: Geometry, tol: float) -> torch.Tensor:
    """Error bound (float64, broadcast shape of ``qn``, ``rn``) of fast values; 0 where they are provably exact."""
    total = qn.double() + rn.double()
    band = tol * total
    if geom.raw_u8 and tol == _REL_TOL:  # full float32 matmul precision only (never under TF32 / bf16)
        band = torch.where(total < EXACT_NORM_SUM, 0.0, band)
    return band


@dataclass
class Operand:
    """A block ready for the fused matmul: ``data`` (tiles, b, tile_dim + 2) float32 and ``norm`` (b,) float32.

    ``norm`` is the largest centred squared tile norm of each row: the error band of a pair is
    ``tol * (norm_q + norm_r)``.
    """

    data: torch.Tensor
    norm: torch.Tensor


def make_operand(xb: torch.Tensor, geom: Geometry, center: torch.Tensor, side: str, out: torch.Tensor) -> Operand:
    """Centre a block, cut it into tiles, and append the norm columns of the fused distance matmul.

    Query rows become ``[q, |q|^2, 1]`` and reference rows ``[-2r, 1, |r|^2]``, so one (batched) matmul gives
    ``|q|^2 + |r|^2 - 2 q.r`` per tile. ``out`` (tiles, >= b, tile_dim + 2) is a reused buffer: fresh large
    allocations cost page faults on every block. The uint8 -> float32 conversion is fused into the tile copy.
    """
    b = xb.shape[0]
    data = out[:, :b]
    body = data[:, :, : geom.tile_dim]
    if geom.metric == "tiled":
        ch, h, w = geom.row_shape
        g = geom.grid
        body.view(g, g, b, ch, h // g, w // g).copy_(_tile_view(xb, geom))
    else:
        body.copy_(xb.reshape(1, b, geom.tile_dim))
    if side == "query":
        body.sub_(center)
    else:
        torch.add(center * 2.0, body, alpha=-2.0, out=body)  # -2 (r - c) in one pass
    norms = _sq_norms(body, geom, 1 if side == "query" else 2)
    if side == "ref":
        norms.mul_(0.25)  # of -2 (r - c): exact, a power of two
    data[:, :, -2] = norms if side == "query" else 1.0
    data[:, :, -1] = 1.0 if side == "query" else norms
    return Operand(data, norms.amax(0) if geom.tiles > 1 else norms[0])


def product_buffer(geom: Geometry, bq: int, br: int) -> torch.Tensor:
    """The reused float32 buffer of :func:`fast_sq` for blocks of up to ``bq`` x ``br`` rows."""
    return torch.empty((2 if geom.tiles > 1 else 1) * bq * br, dtype=torch.float32, device=geom.device)


def block_scratch(geom: Geometry, bq: int, br: int) -> ThreadScratch:
    """Per-thread buffers of a blocked comparison: the query operand (tiles, bq, tile_dim + 2) float32 and the
    :func:`product_buffer` for (bq, br) blocks, made once by each thread that asks (``.get()``)."""
    return ThreadScratch(
        lambda: (
            torch.empty((geom.tiles, bq, geom.tile_dim + 2), dtype=torch.float32, device=geom.device),
            product_buffer(geom, bq, br),
        )
    )


def query_from_ref(r: Operand, geom: Geometry, out: torch.Tensor) -> Operand:
    """The query operand of the same rows as the reference operand ``r`` (symmetric comparisons).

    ``[-2 (r - c), 1, |r - c|^2]`` becomes ``[r - c, |r - c|^2, 1]``: a scaling by -1/2 (exact) instead of a
    second tile copy and conversion of the input rows.
    """
    b = r.data.shape[1]
    data = out[:, :b]
    torch.mul(r.data[:, :, : geom.tile_dim], -0.5, out=data[:, :, : geom.tile_dim])
    data[:, :, -2] = r.data[:, :, -1]
    data[:, :, -1] = 1.0
    return Operand(data, r.norm)


def fast_sq(r: Operand, q: Operand, geom: Geometry, out: torch.Tensor) -> torch.Tensor:
    """Fast raw squared distances, reference-major (br, bq) float32 (max over tiles), not clamped at 0.

    Reference-major so that reductions over groups of reference rows run over contiguous query rows. ``out`` is
    a :func:`product_buffer`. Tiles are one large matmul each into a scratch half of ``out``, folded into a
    running maximum: the product never holds every tile at once, so blocks can be tiles times larger (one
    (16, 64, 64) batched product of small matmuls was 4x slower per value than 1024 x 1024 ones, and worse
    with 2 threads, where every small kernel pays for a barrier).
    """
    br, bq = r.data.shape[1], q.data.shape[1]
    acc = out[: br * bq].view(br, bq)
    torch.matmul(r.data[0], q.data[0].T, out=acc)
    if geom.tiles > 1:
        tmp = out[br * bq : 2 * br * bq].view(br, bq)
        for t in range(1, geom.tiles):
            torch.matmul(r.data[t], q.data[t].T, out=tmp)
            torch.maximum(acc, tmp, out=acc)
    return acc


def exact_rows_sq(a: torch.Tensor, b: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Exact raw squared distances between aligned rows a[p], b[p] (raw units, same shape): float64 (P,).

    uint8: integer differences, squares and sums, all exact in float64, so equal rows give bit-equal values in
    any order. Float: differences in float64 (a float32 a - b rounds when a and b are far apart).
    """
    if geom.raw_u8:
        diff = a.to(torch.float32) - b.to(torch.float32)  # integers in [-255, 255]: exact
        sq = diff.mul_(diff).to(torch.float64)
    else:
        diff = a.to(torch.float64) - b.to(torch.float64)
        sq = diff.mul_(diff)
    p = sq.shape[0]
    if geom.metric == "tiled":
        ch, h, w = geom.row_shape
        g = geom.grid
        per_tile = sq.reshape(p, ch, g, h // g, g, w // g).sum(dim=(1, 3, 5))
        return per_tile.reshape(p, -1).amax(1)
    return sq.reshape(p, -1).sum(1)


def chunk_rows(geom: Geometry) -> int:
    """Rows per chunk of the exact pass, bounding its memory."""
    return max(1, _PAIR_CHUNK_ELEMS // int(np.prod(geom.row_shape)))


def exact_pairs(qsrc: ArrayLike, qi: torch.Tensor, ref: ArrayLike, rj: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Exact raw squared distances for pairs (qsrc[qi[p]], ref[rj[p]]), rows loaded from the inputs: float64 (P,)."""
    out = torch.empty(len(qi), dtype=torch.float64, device=geom.device)
    step = chunk_rows(geom)
    for s in range(0, len(qi), step):
        sl = slice(s, s + step)
        out[sl] = exact_rows_sq(load(qsrc, qi[sl], geom, "query"), load(ref, rj[sl], geom, "ref"), geom)
    return out


def plan_blocks(geom: Geometry, block_q: int, block_r: int) -> tuple[int, int]:
    """Compute block sizes: at most the caller's (the memory bound), and the (br, bq) product within FAST_TILE_BYTES.

    Tiles do not enter: :func:`fast_sq` folds them one at a time into a running maximum.
    """
    br = min(block_r, MAX_BLOCK_R)
    bq = min(block_q, max(16, FAST_TILE_BYTES // (4 * br)))
    return bq, br


class RefBlocks:
    """The reference set as (first row, Operand) blocks, converted once if within ``cache_bytes``, else streamed.

    The streamed form re-reads (and re-converts) the reference for every block of queries: that is the price
    of memory bounded by the block sizes.
    """

    def __init__(self, ref: ArrayLike, geom: Geometry, center: torch.Tensor, block: int, cache_bytes: int) -> None:
        self._ref, self._geom, self._center, self._block = ref, geom, center, block
        width = geom.tile_dim + 2
        self.cached = len(ref) * geom.tiles * width * 4 <= cache_bytes
        rows = len(ref) if self.cached else min(block, len(ref))
        # Streamed blocks are converted into a buffer of the iterating thread (query blocks run in parallel).
        self._buf = ThreadScratch(
            lambda: torch.empty((geom.tiles, rows, width), dtype=torch.float32, device=geom.device)
        )
        self._blocks: list[tuple[int, Operand]] | None = None
        if self.cached:
            buf = self._buf.get()
            self._blocks = [(j0, make_operand(rb, geom, center, "ref", buf[:, j0:])) for j0, rb in self._raw_blocks()]

    def _raw_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for j0 in range(0, len(self._ref), self._block):
            yield j0, load(self._ref, slice(j0, j0 + self._block), self._geom, "ref")

    def cached_block(self, j0: int) -> Operand | None:
        """The converted block starting at row ``j0`` when the set is cached, else None."""
        if self._blocks is None:
            return None
        return next((r for start, r in self._blocks if start == j0), None)

    def __iter__(self) -> Iterator[tuple[int, Operand]]:
        if self._blocks is not None:
            return iter(self._blocks)
        buf = self._buf.get()
        return ((j0, make_operand(rb, self._geom, self._center, "ref", buf)) for j0, rb in self._raw_blocks())
