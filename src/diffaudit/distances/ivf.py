"""Approximate shortlist, exact answer: a faiss IVF index for reference sets too large for the exact search.

The exact blocked search (:func:`diffaudit.distances.nearest_neighbors`) stays the default: it reads the whole
reference set for every block of queries, which is right up to a few million rows. Above ~10 M rows an inverted
file index (faiss ``IndexIVF``) is built once, saved, and searched per block of queries: each query visits the
``nprobe`` nearest of ``nlist`` k-means cells, faiss returns a ``shortlist`` of candidates, and the shortlist is
**re-ranked by exact distances** (the engine's direct-difference pass, ``_engine.exact_rows_sq``) reading only
the shortlisted reference rows (a memory-mapped ``.npy`` when the index was saved with its reference). So:

* returned distances are exact (integer arithmetic for uint8 images, float64 otherwise), as in
  ``nearest_neighbors``, ties to the lower index among the shortlisted rows;
* returned neighbours are approximate only in *which* rows were shortlisted: a true neighbour in an unprobed
  cell is missed (recall < 1). With ``nprobe = nlist`` and a shortlist covering every tie, the result equals
  ``nearest_neighbors`` exactly.

Metrics: ``"l2"`` (normalized L2 on flattened images, uint8 or float in [0, 1]) and ``"euclidean"`` (flattened
features). Both rank like plain L2 on the flattened rows, which is what IVF indexes. Tiled L2 (a max over tiles)
has no such index and stays exact-only.

Storage in faiss: uint8 images use the 8-bit direct scalar quantizer (the pixel values themselves, 1 byte per
value: lossless, 4x smaller than float32); floats use ``IndexIVFFlat`` (float32 rows).

faiss-cpu is optional (``pip install faiss-cpu``, or the ``dev`` extra); it is imported on first use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffaudit.distances import as_unit_float
from diffaudit.distances._engine import ArrayLike, exact_rows_sq, geometry, load
from diffaudit.errors import CheckpointError, ConfigError, DataError

__all__ = ["IVF_METRICS", "IvfIndex", "IvfMeta", "query_shard"]

IVF_METRICS = ("l2", "euclidean")
_FORMAT = 1
_INDEX_FILE = "index.faiss"
_META_FILE = "ivf.json"
_IDS_FILE = "ref_ids.npy"
_REF_FILE = "reference.npy"
# Rows converted to float32 at a time while training/adding/searching: bounds memory for any reference size.
_ADD_ROWS = 65536
# Rows hashed into the reference fingerprint (evenly spaced): catches a different source at load time cheaply.
_FINGERPRINT_ROWS = 16


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(
            "the IVF nearest-neighbour index needs faiss: pip install faiss-cpu (or the 'dev' extra); "
            "the exact search diffaudit.distances.nearest_neighbors needs nothing extra"
        ) from exc
    return faiss


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise DataError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _vectors(x: np.ndarray, rows: slice | np.ndarray, u8: bool, metric: str, name: str) -> np.ndarray:
    """Rows of ``x`` flattened to float32 (n, d) in the index's units.

    ``u8``: the raw 0..255 values (the 8-bit direct codec). Otherwise "l2" rows in [0, 1] (uint8 scaled by 1/255,
    floats range-checked) and "euclidean" rows cast to float32.
    """
    flat = np.asarray(x[rows])
    flat = flat.reshape(len(flat), -1)
    if u8:
        return flat.astype(np.float32)
    if metric == "l2":
        return np.ascontiguousarray(as_unit_float(flat, name).numpy())
    if not np.issubdtype(flat.dtype, np.number) or np.iscomplexobj(flat):
        raise DataError(f"{name} must be numeric, got dtype {flat.dtype}")
    return np.ascontiguousarray(flat, dtype=np.float32)


def _geom_for(metric: str, x: np.ndarray, y: np.ndarray | None = None) -> Any:
    return geometry(metric, 1, x, y)


def _fingerprint(ref: np.ndarray) -> str:
    """sha256 of the shape, dtype and ``_FINGERPRINT_ROWS`` evenly spaced rows (reads only those rows)."""
    h = hashlib.sha256(f"{ref.shape}|{ref.dtype}".encode())
    for i in np.unique(np.linspace(0, len(ref) - 1, _FINGERPRINT_ROWS).astype(np.int64)):
        h.update(np.ascontiguousarray(ref[i]).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class IvfMeta:
    """What ``ivf.json`` records next to ``index.faiss``."""

    format: int
    metric: str
    item_shape: tuple[int, ...]
    dtype: str  # of the reference rows: "uint8" or a float dtype
    count: int  # reference rows
    nlist: int
    train_size: int
    seed: int
    codec: str  # "sq8direct" (uint8 images) or "flat" (float32)
    fingerprint: str  # of the reference rows (see _fingerprint)
    reference_stored: bool  # reference.npy is in the index directory


class IvfIndex:
    """A faiss IVF index over a reference set plus what the exact re-rank needs (the reference rows).

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with :meth:`search`. Indices
    returned by :meth:`search` are row positions in the reference set; ``ids`` maps them to the caller's ids.
    """

    def __init__(self, index: Any, meta: IvfMeta, reference: np.ndarray, ids: np.ndarray) -> None:
        self.index, self.meta, self.reference, self.ids = index, meta, reference, ids

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        reference: ArrayLike,
        nlist: int,
        train_size: int,
        seed: int = 0,
        metric: str = "l2",
        ids: np.ndarray | None = None,
    ) -> IvfIndex:
        """Train the coarse k-means on ``train_size`` random rows, then add every row (in chunks).

        Args:
            reference: ``(M, ...)`` rows: images (``uint8``, or float in [0, 1]) for "l2", features for
                "euclidean". May be a memory-mapped array (read ``_ADD_ROWS`` rows at a time); it is kept by
                reference (not copied) for the exact re-rank.
            nlist: k-means cells (rule of thumb: ~4 sqrt(M)); at most ``train_size``.
            train_size: rows sampled (without replacement, by ``seed``) to train the cells; faiss wants
                >= 39 per cell.
            seed: seeds the training sample and faiss' k-means, so a rebuild gives the same index.
            metric: "l2" or "euclidean" ("tiled" has no IVF index: use ``nearest_neighbors``).
            ids: optional ``(M,)`` ids of the rows (ints or strings; saved as ``ref_ids.npy``), default 0..M-1.

        Raises:
            ConfigError: faiss missing, unknown metric, bad nlist / train_size.
            DataError: empty or mis-shaped reference, ids of the wrong length.
        """
        faiss = _faiss()
        if metric not in IVF_METRICS:
            raise ConfigError(
                f"the IVF index supports metrics {', '.join(IVF_METRICS)}, not {metric!r}; tiled L2 is exact-only "
                "(diffaudit.distances.nearest_neighbors)"
            )
        ref = _as_numpy(reference, "reference")
        if ref.ndim < 2 or len(ref) == 0:
            raise DataError(f"reference must be a non-empty batch of rows shaped (M, ...), got shape {ref.shape}")
        m = len(ref)
        nlist, train_size = _positive_int(nlist, "nlist"), _positive_int(train_size, "train_size")
        train_size = min(train_size, m)
        if nlist > train_size:
            raise ConfigError(f"nlist={nlist} cells need at least as many training rows; train_size is {train_size}")
        geom = _geom_for(metric, ref[:1])
        u8 = geom.raw_u8 and metric == "l2"
        ids = np.arange(m, dtype=np.int64) if ids is None else np.asarray(ids)
        if ids.shape != (m,) or ids.dtype == object:
            raise DataError(f"ids must be an int or str array of shape ({m},), got {ids.dtype} {ids.shape}")
        d = int(np.prod(ref.shape[1:]))

        quantizer = faiss.IndexFlatL2(d)
        if u8:
            # The pixel values themselves, 1 byte each: lossless. Not by residual (residuals leave 0..255).
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit_direct, faiss.METRIC_L2, False
            )
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        index.cp.seed = int(seed)
        index.own_fields = True
        quantizer.this.disown()  # the index owns (and frees) its quantizer
        rng = np.random.default_rng(seed)
        # Sorted rows: sequential reads of a memory-mapped reference.
        sample = np.sort(rng.choice(m, size=train_size, replace=False))
        index.train(_vectors(ref, sample, u8, metric, "reference"))
        for s in range(0, m, _ADD_ROWS):
            index.add(_vectors(ref, slice(s, s + _ADD_ROWS), u8, metric, "reference"))
        meta = IvfMeta(
            _FORMAT,
            metric,
            tuple(int(v) for v in ref.shape[1:]),
            str(ref.dtype),
            m,
            nlist,
            train_size,
            int(seed),
            "sq8direct" if u8 else "flat",
            _fingerprint(ref),
            False,
        )
        return cls(index, meta, ref, ids)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, store_reference: bool = True) -> Path:
        """Write ``index.faiss``, ``ivf.json``, ``ref_ids.npy`` and (by default) ``reference.npy``; no pickles.

        With ``store_reference=False`` the re-rank rows are not copied: :meth:`load` must then be given the
        same reference (checked by shape, dtype and a fingerprint of 16 rows).
        """
        faiss = _faiss()
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"IVF index directory {out} is a file")
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / _INDEX_FILE))
        np.save(out / _IDS_FILE, self.ids, allow_pickle=False)
        if store_reference:
            # Streamed into an .npy memory map: no second in-memory copy of a large reference.
            dst = np.lib.format.open_memmap(
                out / _REF_FILE, mode="w+", dtype=self.reference.dtype, shape=self.reference.shape
            )
            for s in range(0, len(dst), _ADD_ROWS):
                dst[s : s + _ADD_ROWS] = self.reference[s : s + _ADD_ROWS]
            dst.flush()
            del dst
        elif (out / _REF_FILE).exists():
            (out / _REF_FILE).unlink()
        meta = asdict(self.meta) | {"reference_stored": bool(store_reference)}
        (out / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path, reference: ArrayLike | None = None) -> IvfIndex:
        """Open a saved index; the reference is memory-mapped from ``reference.npy`` unless given.

        Raises:
            CheckpointError: missing or unreadable files, another format, or a ``reference`` that is not the one
                the index was built on.
        """
        faiss = _faiss()
        src = Path(directory)
        for name in (_INDEX_FILE, _META_FILE, _IDS_FILE):
            if not (src / name).is_file():
                raise CheckpointError(f"{src} is not an IVF index directory: {name} is missing")
        try:
            raw = json.loads((src / _META_FILE).read_text())
            raw["item_shape"] = tuple(raw["item_shape"])
            meta = IvfMeta(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{src / _META_FILE} is not valid IVF index metadata: {exc}") from exc
        if meta.format != _FORMAT:
            raise CheckpointError(f"{src / _META_FILE} has format {meta.format}; this diffaudit reads {_FORMAT}")
        if reference is None:
            if not meta.reference_stored:
                raise CheckpointError(
                    f"{src} was saved without its reference rows; pass reference= (the array it was built on)"
                )
            ref = np.load(src / _REF_FILE, mmap_mode="r", allow_pickle=False)
        else:
            ref = _as_numpy(reference, "reference")
        if (
            ref.shape != (meta.count, *meta.item_shape)
            or str(ref.dtype) != meta.dtype
            or _fingerprint(ref) != meta.fingerprint
        ):
            raise CheckpointError(
                f"the reference ({ref.dtype} {ref.shape}) is not the one {src} was built on "
                f"({meta.dtype} {(meta.count, *meta.item_shape)}, fingerprint {meta.fingerprint[:12]})"
            )
        ids = np.load(src / _IDS_FILE, allow_pickle=False)
        index = faiss.read_index(str(src / _INDEX_FILE))
        if index.ntotal != meta.count:
            raise CheckpointError(f"{src / _INDEX_FILE} holds {index.ntotal} rows; ivf.json says {meta.count}")
        return cls(index, meta, ref, ids)

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: ArrayLike,
        k: int = 1,
        nprobe: int = 8,
        shortlist: int | None = None,
        block: int = 4096,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest reference rows of each query: IVF shortlist, then exact re-rank of the shortlist.

        Args:
            queries: ``(Nq, *item_shape)`` rows of the kind the index was built on (uint8 images may be searched
                with float images in [0, 1] and vice versa for "l2").
            k: neighbours per query.
            nprobe: cells visited per query (1..nlist); ``nprobe = nlist`` visits every row.
            shortlist: candidates re-ranked exactly per query (>= k); default ``max(4 k, k + 32)``. It must
                exceed the number of exact ties at the k-th distance for the tie-break to match the exact search.
            block: queries per faiss call (bounds the (block, shortlist) candidate arrays).

        Returns:
            ``(dist, index)``: float32 ``(Nq, k)`` exact distances ascending (ties to the lower index) and int64
            ``(Nq, k)`` row positions in the reference. Where the probed cells hold fewer than k rows, the missing
            entries are ``inf`` and ``-1``.
        """
        k = _positive_int(k, "k")
        nprobe = _positive_int(nprobe, "nprobe")
        block = _positive_int(block, "block")
        shortlist = max(4 * k, k + 32) if shortlist is None else _positive_int(shortlist, "shortlist")
        if shortlist < k:
            raise ConfigError(f"shortlist={shortlist} must be at least k={k}")
        if k > self.meta.count:
            raise DataError(f"k={k} neighbours requested but the index holds only {self.meta.count} rows")
        shortlist = min(shortlist, self.meta.count)
        q = _as_numpy(queries, "queries")
        if q.ndim < 2 or tuple(q.shape[1:]) != self.meta.item_shape:
            raise DataError(f"queries must be shaped (N, {self.meta.item_shape}), got {q.shape}")
        self.index.nprobe = min(nprobe, self.meta.nlist)
        dist = np.full((len(q), k), np.inf, dtype=np.float32)
        idx = np.full((len(q), k), -1, dtype=np.int64)
        for s in range(0, len(q), block):
            sl = slice(s, s + block)
            dist[sl], idx[sl] = self._search_block(q[sl], k, shortlist)
        return dist, idx

    def _search_block(self, q: np.ndarray, k: int, shortlist: int) -> tuple[np.ndarray, np.ndarray]:
        geom = _geom_for(self.meta.metric, q, self.reference[:1])
        # Query vectors in the index's units: 0..255 for the uint8 codec (whatever the queries' dtype), else as
        # the engine loads them (uint8 images scaled to [0, 1] for "l2", features cast to float32).
        if self.meta.codec == "sq8direct" and q.dtype == np.uint8:
            qv = q.reshape(len(q), -1).astype(np.float32)
        else:
            qv = _vectors(q, slice(None), False, self.meta.metric, "queries")
            if self.meta.codec == "sq8direct":
                qv = qv * 255.0  # a new array: qv may share memory with the caller's queries
        _, cand = self.index.search(qv, shortlist)  # (b, shortlist) int64, -1 where cells ran out
        b = len(q)
        qi, slot = np.nonzero(cand >= 0)
        rj = cand[qi, slot]
        # Exact pass over the shortlisted pairs only. Reference rows are read in sorted order (a memory map reads
        # each page once) and scattered back.
        rows = np.unique(rj)
        ref_rows = load(self.reference, rows, geom, "reference")
        pos = np.searchsorted(rows, rj)
        q_rows = load(q, slice(None), geom, "queries")
        exact = torch.empty(len(rj), dtype=torch.float64)
        step = max(1, (1 << 22) // max(1, int(np.prod(self.meta.item_shape))))
        for s0 in range(0, len(rj), step):
            sl = slice(s0, s0 + step)
            exact[sl] = exact_rows_sq(q_rows[torch.from_numpy(qi[sl])], ref_rows[torch.from_numpy(pos[sl])], geom)
        sq = np.full(cand.shape, np.inf, dtype=np.float64)
        sq[qi, slot] = exact.numpy()
        big = np.iinfo(np.int64).max
        keys = np.where(cand >= 0, cand, big)
        # (exact distance, index) order: lexsort's last key is the primary one.
        order = np.lexsort((keys, sq), axis=1)[:, :k]
        top_sq = np.take_along_axis(sq, order, 1)
        top_idx = np.take_along_axis(cand, order, 1)
        top_idx[~np.isfinite(top_sq)] = -1
        d = torch.from_numpy(top_sq).mul_(geom.scale).sqrt_().to(torch.float32).numpy()
        return d.reshape(b, k), top_idx.reshape(b, k)

    def search_shard(
        self, queries: ArrayLike, shard: int, shards: int, **kwargs: Any
    ) -> tuple[slice, tuple[np.ndarray, np.ndarray]]:
        """Search shard ``shard/shards`` of the queries (see :func:`query_shard`): the unit of sharded work.

        Returns the query slice and :meth:`search`'s result for it; concatenating the shards' results in shard
        order gives the one-call result (each query's answer depends only on that query).
        """
        sl = query_shard(len(queries), shard, shards)
        return sl, self.search(queries[sl], **kwargs)


def query_shard(n_queries: int, shard: int, shards: int) -> slice:
    """Queries ``[i*N//n, (i+1)*N//n)`` of shard ``i/n``: the same contiguous split as every sharded stage."""
    from diffaudit.scale.shards import ShardSpec

    start, stop = ShardSpec(int(shard), int(shards)).range(int(n_queries))
    return slice(start, stop)
