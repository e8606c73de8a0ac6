"""The fast pass and the exact pass shared by every distance function (internal).

Units: "raw" squared distances. When both sets are ``uint8`` images they stay in 0..255 units (no conversion
pass, and the exact pass is integer arithmetic, exact in float64); otherwise images are float32 in [0, 1] and
features are cast to float32. ``Geometry.scale`` turns a raw squared distance into the metric's squared value.
``Geometry.int8`` says whether the fast pass is the exact integer one (``_operand``).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from diffaudit.errors import ConfigError, DataError

METRICS = ("l2", "tiled", "euclidean")
# Images whose float values leave [0, 1] by more than this are rejected (a [-1, 1] tensor would silently give
# distances twice too large).
_RANGE_TOL = 1e-5
# Elements per chunk when recomputing pairs by direct differences (bounds memory of the exact path).
_PAIR_CHUNK_ELEMS = 1 << 22
# Relative error band of the float32 fast pass at full float32 matmul precision: |fast - exact| is trusted to
# be below FLOAT_REL_TOL * (|q|^2 + |r|^2) (centred norms, largest tile). Float32 dot products of length n err
# by ~sqrt(n) * 6e-8 in practice, so 1e-4 is a >10x margin up to n ~ 10^5 values per tile.
FLOAT_REL_TOL = 1e-4
# The integer fast pass is exact; its only error is the float32 rounding of squared distances above 2^24 for
# the selection (at most 2^-24 relative). A squared distance is at most 2 (|q|^2 + |r|^2), so this band covers
# that rounding twice over.
INT8_TOL = 2.0**-22
# Largest tile length of the integer pass: int8 dot products (at most 128^2 per value) must fit in int32.
MAX_INT8_TILE_DIM = (2**31 - 1) // (128 * 128)
# Longer tiles assemble squared distances (at most 255^2 per value) in int64 instead of int32.
MAX_INT32_SQ_TILE_DIM = (2**31 - 1) // (255 * 255)
# Force the integer fast pass on (True) or off (False); None decides once per process by measurement.
INT8_FAST_PASS: bool | None = None


def rel_tol(geom: Geometry) -> float:
    """The relative error band of ``geom``'s fast pass (on its device, under the float32 matmul precision)."""
    if geom.int8:
        return INT8_TOL
    reduced = torch.get_float32_matmul_precision() != "highest"
    if geom.device.type == "cuda":
        reduced = reduced or bool(torch.backends.cuda.matmul.allow_tf32)
    # TF32 / bf16 matmuls keep 10 / 7 mantissa bits: widen the band so the exact pass still catches everything.
    return 3e-2 if reduced else FLOAT_REL_TOL


@functools.cache
def _int8_matmul_is_faster() -> bool:
    """Whether an int8 x int8 -> int32 matmul beats the float32 one on this CPU (measured once per process).

    CPUs with AMX or VNNI run it 4-10x faster (measured on a Sapphire-Rapids-class Xeon); without them
    torch's fallback may be slower than float32, and the float pass is kept.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (256, 768), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (256, 768), dtype=torch.int8, generator=gen)
    af, bf = a.float(), b.float()

    def best(fn) -> float:  # noqa: ANN001 - a callable
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    try:
        exact = torch.equal(torch._int_mm(a, b.T).double(), af.double() @ bf.double().T)  # exact in float64
        t_int = best(lambda: torch._int_mm(a, b.T))
    except (AttributeError, RuntimeError, NotImplementedError):  # no int8 matmul kernel in this torch build
        return False
    return exact and t_int < best(lambda: torch.matmul(af, bf.T))


def _use_int8(device: torch.device, u8: bool, tile_dim: int) -> bool:
    if not u8 or device.type != "cpu" or tile_dim > MAX_INT8_TILE_DIM:
        return False  # CUDA keeps the float pass: int8 matmul there has shape rules and is untested here
    return _int8_matmul_is_faster() if INT8_FAST_PASS is None else INT8_FAST_PASS


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
    int8: bool = False  # the fast pass is the exact integer one (uint8 images on a CPU with fast int8 matmul)


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
        return Geometry(metric, 1, row, 1, d, raw / d, u8, device, _use_int8(device, u8, d))
    if len(row) != 3:
        raise DataError(f"tiled L2 needs images shaped (N, C, H, W), got shape {(len(x), *row)}")
    _, h, w = row
    if h % grid or w % grid:
        raise DataError(
            f"image size {h}x{w} is not divisible by the tile grid {grid}; crop or resize the images "
            f"(tiles must cover every pixel)"
        )
    tile_dim = d // (grid * grid)
    tiles = grid * grid
    return Geometry(
        metric, int(grid), row, tiles, tile_dim, raw / tile_dim, u8, device, _use_int8(device, u8, tile_dim)
    )


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


def tile_view(t: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(b, *row) -> (tiles, b, tile_dim) as a view for the flat metrics, a strided view for "tiled"."""
    b = t.shape[0]
    if geom.metric != "tiled":
        return t.reshape(1, b, geom.tile_dim)
    ch, h, w = geom.row_shape
    g = geom.grid
    return t.reshape(b, ch, g, h // g, g, w // g).permute(2, 4, 0, 1, 3, 5)


# Rows averaged for the centre: enough to land near the data, and few enough for exact float32 sums of uint8.
_CENTER_ROWS = 256


def center_of(x: ArrayLike, geom: Geometry, rows: int) -> torch.Tensor | None:
    """A centre for both sets, (tiles, 1, tile_dim) float32: the mean of the first ``rows`` rows of ``x``.

    Distances are translation invariant, so any centre is correct; one near the data shrinks the norms that
    cancel in the fast path. For uint8 it is rounded to integers, so centred values stay exact in float32.
    None for the integer pass, which always centres on 128 (the shift that maps uint8 onto int8).
    """
    if geom.int8:
        return None
    first = load(x, slice(0, min(rows, _CENTER_ROWS)), geom, "ref")
    # uint8: at most 256 rows of 0..255 sum exactly in float32 (no float64 copy of the rows).
    mean = first.reshape(len(first), -1).sum(0, dtype=torch.float32).div_(len(first))
    if geom.raw_u8:
        mean = mean.round_()
    tiled = tile_view(mean.to(torch.float32).reshape(1, *geom.row_shape), geom)
    return tiled.reshape(geom.tiles, 1, geom.tile_dim).contiguous()


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
