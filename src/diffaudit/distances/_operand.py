"""The fast pass: matmul operands, the blocked product of squared distances, the converted reference set.

Two fast passes share one interface (:func:`make_operand`, :func:`fast_sq`, :class:`RefBlocks`):

* **float32** (features, float images, CUDA): rows are centred and extended to ``[q, |q|^2, 1]`` and
  ``[-2r, 1, |r|^2]``, so one matmul per tile gives ``|q|^2 + |r|^2 - 2 q.r``, within an error band of the
  exact value (``_engine.rel_tol``).
* **int8** (uint8 images on a CPU whose int8 matmul is faster, ``Geometry.int8``): ``x - 128`` fits int8
  exactly, an int8 x int8 -> int32 matmul is exact integer arithmetic (tiles of at most
  ``MAX_INT8_TILE_DIM`` = 131,071 values), and so is ``|q|^2 + |r|^2 - 2 q.r``, assembled in int32 up to
  33,025 values per tile and in int64 beyond (a 3x512x512 image in 4x4 tiles has 49,152). Every fast value is
  the exact squared distance, so nothing is recomputed; it also ran 4-11x faster than the float32 matmul on
  AMX/VNNI CPUs (docs/benchmarks_distances.md). The selection still reads a float32 copy of the product;
  its rounding above 2^24 is covered by ``_engine.INT8_TOL``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from diffaudit.distances._engine import (
    FLOAT_REL_TOL,
    MAX_INT32_SQ_TILE_DIM,
    ArrayLike,
    Geometry,
    center_of,
    load,
    rel_tol,
    tile_view,
)
from diffaudit.distances._parallel import ThreadScratch

# Bytes of one (bq, br) float32 fast-pass product. Larger blocks amortise the per-block work around the matmul:
# 1024 x 2048 blocks beat 1024 x 1024 by ~10% on the feature search (measured; cache residency mattered less).
FAST_TILE_BYTES = 16 << 20
# Most reference rows per compute block: the selection after the matmul works row by row on this many values.
MAX_BLOCK_R = 2048
# Bytes of one block's operand (query or streamed reference): bounds memory for large images.
OPERAND_BYTES = 256 << 20

# With uint8 images centred on an integer, every value, product and partial sum of the fused float32 dot
# product is an integer; all are exact while the sum of absolute terms, at most 2 (|q|^2 + |r|^2), stays below
# 2^24. Pairs with |q|^2 + |r|^2 < EXACT_NORM_SUM therefore have exact fast values: no band, no recompute.
# The same bound makes the integer pass's squared distances (< 2^24) exact in the float32 copy.
EXACT_NORM_SUM = float(2**23)


# Bytes of float32 temporaries of a norm pass: rows are taken in slices so that converting a whole cached
# reference operand (393 MB of int8 for 500 images of 3x512x512) never makes a full-size float32 copy.
_NORM_TEMP_BYTES = 32 << 20


def _by_rows(norms: Callable[[torch.Tensor], torch.Tensor], body: torch.Tensor) -> torch.Tensor:
    """``norms(body)`` (tiles, b) computed on slices of rows of ``body`` (tiles, b, n), bounding its temporaries."""
    tiles, b, n = body.shape
    step = max(1, _NORM_TEMP_BYTES // (4 * tiles * n))
    if step >= b:
        return norms(body)
    return torch.cat([norms(body[:, i : i + step]) for i in range(0, b, step)], dim=1)


def _sq_norms(body: torch.Tensor, geom: Geometry, step: int = 1) -> torch.Tensor:
    """Squared norms (tiles, b) float32 of the rows of ``body``; exact for uint8 images (integers, multiples of
    ``step`` squared: ``step`` = 2 for the reference side's -2 (r - c)), correctly rounded above 2^24."""
    return _by_rows(lambda rows: _sq_norms_of(rows, geom, step), body)


def _sq_norms_of(body: torch.Tensor, geom: Geometry, step: int) -> torch.Tensor:
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


def _int8_sq_norms(body: torch.Tensor) -> torch.Tensor:
    """Exact squared norms (tiles, b) int32 of int8 rows ``body`` (tiles, b, n); n <= MAX_INT8_TILE_DIM."""
    return _by_rows(_int8_sq_norms_of, body)


def _int8_sq_norms_of(body: torch.Tensor) -> torch.Tensor:
    tiles, b, n = body.shape
    # Float32 sums of up to 1024 squares of int8 values (each <= 2^14) are integers <= 2^24: exact in any
    # order. A batched (1 x chunk) @ (chunk x 1) product computes them 2.3x faster than square + sum (measured,
    # 500 x 16 tiles of 768 values).
    chunk = next(c for c in range(min(n, 1024), 0, -1) if n % c == 0)
    f = body.to(torch.float32).reshape(-1, 1, chunk)
    partial = torch.bmm(f, f.transpose(1, 2)).view(tiles, b, n // chunk)
    return partial.sum(-1, dtype=torch.float64).to(torch.int32)


def exact_norm_sum(geom: Geometry, tol: float) -> float:
    """Pairs whose squared norms sum below this have exact fast values (uint8 images at full float32
    precision, or the integer pass; never under TF32 / bf16 float matmuls); 0 when none do."""
    return EXACT_NORM_SUM if geom.raw_u8 and (geom.int8 or tol == FLOAT_REL_TOL) else 0.0


def pair_band(qn: torch.Tensor, rn: torch.Tensor, geom: Geometry, tol: float) -> torch.Tensor:
    """Error bound (float64, broadcast shape of ``qn``, ``rn``) of fast values; 0 where they are provably exact."""
    total = qn.double() + rn.double()
    return torch.where(total < exact_norm_sum(geom, tol), 0.0, tol * total)


@dataclass
class Operand:
    """A block ready for the fast pass.

    ``data``: float32 (tiles, b, tile_dim + 2) with the fused norm columns, or int8 (tiles, b, tile_dim) for
    the integer pass. ``norm`` (b,) float32: the largest centred squared tile norm of each row (the error
    band of a pair is ``tol * (norm_q + norm_r)``). ``tile_norms`` (tiles, b) :func:`exact_dtype`: the exact
    squared tile norms of the integer pass, else None.
    """

    data: torch.Tensor
    norm: torch.Tensor
    tile_norms: torch.Tensor | None = None


def operand_buffer(geom: Geometry, rows: int) -> torch.Tensor:
    """A reusable buffer for the operand of up to ``rows`` rows: uint8 (integer pass) or float32."""
    if geom.int8:
        return torch.empty((geom.tiles, rows, geom.tile_dim), dtype=torch.uint8, device=geom.device)
    return torch.empty((geom.tiles, rows, geom.tile_dim + 2), dtype=torch.float32, device=geom.device)


def _tile_copy(xb: torch.Tensor, geom: Geometry, body: torch.Tensor) -> None:
    """Copy rows ``xb`` (b, *row) into ``body`` (tiles, b, tile_dim), converting dtype on the way."""
    if geom.metric == "tiled":
        ch, h, w = geom.row_shape
        g = geom.grid
        body.view(g, g, len(xb), ch, h // g, w // g).copy_(tile_view(xb, geom))
    else:
        body.copy_(xb.reshape(1, len(xb), geom.tile_dim))


def make_operand(
    xb: torch.Tensor, geom: Geometry, center: torch.Tensor | None, side: str, out: torch.Tensor
) -> Operand:
    """Centre a block (b, *row), cut it into tiles, and lay it out for :func:`fast_sq`.

    Float pass: query rows become ``[q, |q|^2, 1]`` and reference rows ``[-2r, 1, |r|^2]``, so one (batched)
    matmul gives ``|q|^2 + |r|^2 - 2 q.r`` per tile. Integer pass: both sides become ``x - 128`` as int8
    (``center`` is None) with exact int32 tile norms. ``out`` is an :func:`operand_buffer` (fresh large
    allocations cost page faults on every block); the dtype conversion is fused into the tile copy.
    """
    b = xb.shape[0]
    if geom.int8:
        body = out[:, :b]
        _tile_copy(xb, geom, body)
        data = body.bitwise_xor_(128).view(torch.int8)  # uint8 v -> int8 v - 128: flip the top bit
        norms = _int8_sq_norms(data).to(exact_dtype(geom))
        return Operand(data, norms.amax(0).to(torch.float32), norms)
    data = out[:, :b]
    body = data[:, :, : geom.tile_dim]
    _tile_copy(xb, geom, body)
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


def exact_dtype(geom: Geometry) -> torch.dtype:
    """The integer pass's dtype for squared distances and norms: int32, or int64 for long tiles."""
    return torch.int64 if geom.tile_dim > MAX_INT32_SQ_TILE_DIM else torch.int32


@dataclass
class ProductBuffers:
    """Flat buffers of :func:`fast_sq`, reused for every block of up to ``bq`` x ``br`` rows.

    ``acc``: the result (float32 on the float pass; exact :func:`exact_dtype` on the integer pass); ``tmp``:
    one tile's product (tiles > 1); ``dots``: the int8 matmul's int32 output where the assembly is int64;
    ``sel``: the float32 copy the selection reads (integer pass).
    """

    acc: torch.Tensor
    tmp: torch.Tensor | None
    dots: torch.Tensor | None
    sel: torch.Tensor | None


def product_buffer(geom: Geometry, bq: int, br: int) -> ProductBuffers:
    """The :class:`ProductBuffers` for blocks of up to ``bq`` x ``br`` rows."""
    n = bq * br

    def new(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device=geom.device)

    dtype = exact_dtype(geom) if geom.int8 else torch.float32
    wide = geom.int8 and dtype == torch.int64
    return ProductBuffers(
        acc=new(dtype),
        tmp=new(dtype) if geom.tiles > 1 else None,
        dots=new(torch.int32) if wide else None,
        sel=new(torch.float32) if geom.int8 else None,
    )


def block_scratch(geom: Geometry, bq: int, br: int) -> ThreadScratch:
    """Per-thread buffers of a blocked comparison: the :func:`operand_buffer` of ``bq`` query rows and the
    :func:`product_buffer` for (bq, br) blocks, made once by each thread that asks (``.get()``)."""
    return ThreadScratch(lambda: (operand_buffer(geom, bq), product_buffer(geom, bq, br)))


def query_from_ref(r: Operand, geom: Geometry, out: torch.Tensor) -> Operand:
    """The query operand of the same rows as the reference operand ``r`` (symmetric comparisons).

    The integer pass uses one operand for both sides. Float: ``[-2 (r - c), 1, |r - c|^2]`` becomes
    ``[r - c, |r - c|^2, 1]``: a scaling by -1/2 (exact) instead of a second tile copy and conversion.
    """
    if geom.int8:
        return r
    b = r.data.shape[1]
    data = out[:, :b]
    torch.mul(r.data[:, :, : geom.tile_dim], -0.5, out=data[:, :, : geom.tile_dim])
    data[:, :, -2] = r.data[:, :, -1]
    data[:, :, -1] = 1.0
    return Operand(data, r.norm)


def fast_sq(
    a: Operand, b: Operand, geom: Geometry, out: ProductBuffers, selection_copy: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fast raw squared distances (len a, len b) float32 (max over tiles, not clamped at 0), and the exact
    values of the integer pass (same layout, :func:`exact_dtype`; None for the float pass).
    ``selection_copy=False`` skips the float32 copy of the integer pass (returned as None) for callers that
    read the exact values only.

    Callers pass the reference operand first for a reference-major product (reductions over groups of
    reference rows then run over contiguous query rows). Tiles are one large matmul each folded into a
    running maximum: the product never holds every tile at once, so blocks can be tiles times larger (one
    (16, 64, 64) batched product of small matmuls was 4x slower per value than 1024 x 1024 ones, and worse
    with 2 threads, where every small kernel pays for a barrier).
    """
    n1, n2 = a.data.shape[1], b.data.shape[1]
    size = n1 * n2
    acc = out.acc[:size].view(n1, n2)
    tmp = out.tmp[:size].view(n1, n2) if out.tmp is not None else None
    if not geom.int8:
        torch.matmul(a.data[0], b.data[0].T, out=acc)
        for t in range(1, geom.tiles):
            torch.matmul(a.data[t], b.data[t].T, out=tmp)
            torch.maximum(acc, tmp, out=acc)
        return acc, None
    for t in range(geom.tiles):
        dst = acc if t == 0 else tmp
        dots = dst if out.dots is None else out.dots[:size].view(n1, n2)
        torch._int_mm(a.data[t], b.data[t].T, out=dots)  # exact int32 dot products
        # In the norms' dtype (int64 for long tiles, where the squared distance leaves int32).
        torch.add(b.tile_norms[t][None, :], dots, alpha=-2, out=dst)
        dst.add_(a.tile_norms[t][:, None])
        if t:
            torch.maximum(acc, tmp, out=acc)
    if not selection_copy:
        return None, acc
    sq = out.sel[:size].view(n1, n2)
    sq.copy_(acc)
    return sq, acc


def int8_dots(a: Operand, b: Operand, out: ProductBuffers) -> torch.Tensor:
    """The int32 dot products (len a, len b) of one-tile integer operands (exact), in a buffer of ``out``."""
    n1, n2 = a.data.shape[1], b.data.shape[1]
    dots = (out.dots if out.dots is not None else out.acc)[: n1 * n2].view(n1, n2)
    return torch._int_mm(a.data[0], b.data[0].T, out=dots)


def operand_row_bytes(geom: Geometry) -> int:
    """Bytes of one row of an operand: tiles x tile_dim int8 values, or tiles x (tile_dim + 2) float32."""
    return geom.tiles * (geom.tile_dim if geom.int8 else (geom.tile_dim + 2) * 4)


def plan_blocks(geom: Geometry, block_q: int, block_r: int) -> tuple[int, int]:
    """Compute block sizes: at most the caller's, each block's operand within OPERAND_BYTES (the memory bound:
    2,048 rows of 3x512x512 float32 would be 6.4 GB), and the (bq, br) product within FAST_TILE_BYTES.

    Tiles do not enter the product's size: :func:`fast_sq` folds them one at a time into a running maximum.
    """
    rows = max(16, OPERAND_BYTES // operand_row_bytes(geom))
    br = min(block_r, MAX_BLOCK_R, rows)
    bq = min(block_q, rows, max(16, FAST_TILE_BYTES // (4 * br)))
    return bq, br


class RefBlocks:
    """The reference set as (first row, Operand) blocks, converted once if within ``cache_bytes``, else streamed.

    The streamed form re-reads (and re-converts) the reference for every block of queries: that is the price
    of memory bounded by the block sizes.
    """

    def __init__(
        self, ref: ArrayLike, geom: Geometry, center: torch.Tensor | None, block: int, cache_bytes: int
    ) -> None:
        self._ref, self._geom, self._center, self._block = ref, geom, center, block
        self.cached = len(ref) * operand_row_bytes(geom) <= cache_bytes
        rows = len(ref) if self.cached else min(block, len(ref))
        # Streamed blocks are converted into a buffer of the iterating thread (query blocks run in parallel).
        self._buf = ThreadScratch(lambda: operand_buffer(geom, rows))
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


class Comparison:
    """What every blocked comparison of query rows against ``ref`` sets up once per call: the shared centre,
    the reference blocks, the error band ``tol``, and each worker thread's scratch buffers for query blocks of
    up to ``bq`` rows against reference blocks of ``br`` rows."""

    def __init__(self, ref: ArrayLike, n_query: int, geom: Geometry, bq: int, br: int, cache_bytes: int) -> None:
        self.geom = geom
        self.center = center_of(ref, geom, min(br, len(ref)))
        self.refs = RefBlocks(ref, geom, self.center, br, cache_bytes)
        self.tol = rel_tol(geom)
        self._bq = bq
        self._scratch = block_scratch(geom, min(bq, n_query), min(br, len(ref)))

    def scratch(self) -> tuple[torch.Tensor, ProductBuffers]:
        """This thread's query operand buffer and product buffers."""
        return self._scratch.get()

    def query(self, x: ArrayLike, i0: int, name: str) -> tuple[torch.Tensor, Operand, ProductBuffers]:
        """The query block starting at row ``i0`` of ``x``: its rows in raw units (b, *row), its operand in this
        thread's buffer, and this thread's product buffers."""
        qbuf, pbuf = self._scratch.get()
        qb = load(x, slice(i0, i0 + self._bq), self.geom, name)
        return qb, make_operand(qb, self.geom, self.center, "query", qbuf), pbuf
