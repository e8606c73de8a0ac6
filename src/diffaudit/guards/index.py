"""A nearest-neighbour index of a training set, with a copy threshold calibrated on held-out real images.

The index keeps the training images (``uint8`` ``(N, C, H, W)``), their labels and content ids, and, when
built with ``features="classifier"``, their feature vectors. It answers "which training image is nearest to
this image, and how far" (:meth:`TrainingIndex.search`) with :func:`diffaudit.distances.nearest_neighbors`,
whose returned distances are exact, or with faiss when it is installed and asked for (candidates from faiss,
distances then recomputed exactly).

Two blocking rules are recorded side by side (docs/background.md section 1):

* ``calibrated``: block when the distance is below a threshold set on *held-out real images* (images of the
  same source that are not in the index): the threshold is the quantile of their nearest-neighbour distances
  at the target false-block rate (split-conformal), so fresh real images are blocked at most that often. The
  papers leave this threshold open; this rule makes its cost measurable.
* ``absolute``: Carlini et al.'s extraction rule, normalized pixel L2 to the nearest training image
  ``<= delta`` with ``delta = 0.15``. Its false-block rate on the same held-out images is recorded too,
  because on small, similar images (8x8 digits) it can be large.

On disk an index is a directory: ``index.safetensors`` (images, labels, features) and ``index.json`` (ids,
metric, feature extractor, calibration), no pickles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.distances import nearest_neighbors
from diffaudit.errors import ConfigError, DataError
from diffaudit.io import atomic_write_bytes, atomic_write_json

INDEX_WEIGHTS = "index.safetensors"
INDEX_JSON = "index.json"
INDEX_FORMAT = 1

#: Feature spaces an index can search in.
FEATURES = ("pixels", "classifier")
#: Pixel metrics for ``features="pixels"`` (``classifier`` features always use Euclidean distance).
PIXEL_METRICS = ("l2", "tiled")
#: Blocking rules; ``either`` blocks when one of the first two fires; ``robust`` (pixel path or crop/flip/shift
#: aligned match, one calibrated threshold) needs an index built with ``invariant``; ``auto`` is ``robust`` when
#: the index has it, else ``calibrated``.
RULES = ("calibrated", "absolute", "either", "robust", "auto")
BACKENDS = ("exact", "faiss")
#: Carlini et al.'s extraction threshold on normalized L2 (pixels in [0, 1]).
CARLINI_DELTA = 0.15
DEFAULT_TARGET_FPR = 0.01
DEFAULT_HOLDOUT_FRACTION = 0.1
# faiss proposes this many candidates per query before the exact re-ranking (the float32 inner-product
# identity it uses can swap near-equal neighbours; exact recomputation over a few candidates fixes that).
_FAISS_CANDIDATES = 8

# Keys of the calibration record (index.json "calibration"), constants so that a typo is an error.
KEY_RULE = "rule"
KEY_TARGET_FPR = "target_fpr"
KEY_THRESHOLD = "threshold"
KEY_ACHIEVED = "achieved_false_block_rate"
KEY_NUM_HOLDOUT = "num_holdout"
KEY_HOLDOUT = "holdout"
KEY_DELTA = "delta"
KEY_HOLDOUT_QUANTILES = "holdout_distance_quantiles"


def calibrate_threshold(
    holdout_distances: np.ndarray,
    target_fpr: float,
    what: str = "false-block",
    hint: str = "use a larger --holdout-fraction, a --holdout source, or a larger --calibrate-fpr",
) -> tuple[float, float]:
    """Threshold ``T`` with expected false-block rate at most ``target_fpr``, and the rate on the held-out set.

    ``holdout_distances`` are ``(M,)`` nearest-training-image distances of real images that are not in the
    index; blocking is strict (``distance < T``). ``T`` is the ``k``-th smallest with
    ``k = floor(target_fpr * (M + 1))`` (the split-conformal quantile): a fresh real image exchangeable with
    the held-out ones falls below it with probability ``k / (M + 1) <= target_fpr``. The plain empirical
    quantile (``floor(target_fpr * M) + 1``-th smallest) overshoots to ``(m + 1) / (M + 1)``, which on 20
    held-out faces at a 5% target is 9.5%. Needs ``M >= ceil(1 / target_fpr) - 1`` so that ``k >= 1``.
    The second value is the share of held-out distances below ``T`` (``(k - 1) / M`` without ties).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target {what} rate must be in (0, 1); got {target_fpr!r}")
    d = np.sort(np.asarray(holdout_distances, dtype=np.float64).reshape(-1))
    k = math.floor(target_fpr * (d.size + 1) + 1e-9)
    if k < 1:
        needed = math.ceil(1.0 / target_fpr - 1e-9) - 1
        raise DataError(
            f"calibrating a {what} rate of {target_fpr} needs at least {needed} held-out real images; got "
            f"{d.size} ({hint})"
        )
    threshold = float(d[k - 1])
    return threshold, float((d < threshold).mean())


def split_holdout(data: ImageSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``data`` into (index rows, held-out rows), ``int64`` index arrays.

    Split by content id, so that every copy of a duplicated image lands on the same side: a held-out image
    with a copy in the index would sit at distance 0 and drag the threshold to 0.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"holdout fraction must be in (0, 1); got {fraction!r}")
    unique = np.unique(data.ids)
    rng = np.random.default_rng(seed)
    n_hold = int(round(fraction * unique.size))
    if n_hold < 1 or n_hold >= unique.size:
        raise DataError(f"cannot hold out {fraction} of {unique.size} distinct images (need at least 1 on each side)")
    held_ids = set(rng.permutation(unique)[:n_hold].tolist())
    held = np.array([i in held_ids for i in data.ids.tolist()])
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


@dataclass
class TrainingIndex:
    """A searchable training set.

    Attributes:
        images: ``uint8`` ``(N, C, H, W)`` training images.
        labels: ``int64`` ``(N,)`` (-1 unlabelled).
        ids: content ids ``(N,)`` (str).
        class_names: label names.
        features: ``pixels`` or ``classifier``.
        metric: ``l2`` or ``tiled`` for pixels, ``euclidean`` for classifier features.
        grid: tiles per side for ``tiled``.
        feature_vectors: ``float32`` ``(N, D)`` when ``features == "classifier"``, else None.
        calibration: the JSON record of both rules (see the ``KEY_*`` constants), empty until calibrated.
        info: free-form build record (source, extractor description, seed).
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    class_names: tuple[str, ...] = ()
    features: str = "pixels"
    metric: str = "l2"
    grid: int = 4
    feature_vectors: np.ndarray | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _extractor: Any = field(default=None, repr=False)
    _variants: Any = field(default=None, repr=False)  # the robust rule's VariantIndex, built on first use

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def imageset(self) -> ImageSet:
        """The indexed training images as an ImageSet (ids preserved)."""
        return ImageSet(self.images, self.labels, self.class_names, {}, self.ids)

    # ---- search -----------------------------------------------------------------------------------------
    def _check_query(self, images: np.ndarray) -> np.ndarray:
        if isinstance(images, ImageSet):
            images = images.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"query images must be uint8 (N, C, H, W); got {getattr(images, 'dtype', type(images))} "
                f"with shape {getattr(images, 'shape', None)}"
            )
        if tuple(images.shape[1:]) != self.shape:
            raise DataError(
                f"query images of shape {tuple(images.shape[1:])} (C, H, W) do not match the index's {self.shape}"
            )
        return images

    def extractor(self) -> Any:
        """The feature extractor of a ``classifier`` index, rebuilt from the stored training images.

        The classifier trains deterministically from its seed on these exact images (and is cached on disk by
        their hash), so the rebuilt extractor gives the features stored at build time.
        """
        if self.features != "classifier":
            raise ConfigError(f"a {self.features!r} index has no feature extractor")
        if self._extractor is None:
            from diffaudit.metrics.features import get_extractor

            self._extractor = get_extractor("classifier", self.imageset(), seed=int(self.info.get("seed", 0)))
        return self._extractor

    def search(self, images: np.ndarray | ImageSet, backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """Nearest training image of each query in the index's own space.

        Args:
            images: ``uint8`` ``(M, C, H, W)`` (or an ImageSet) of the index's shape.
            backend: ``exact`` (blocked brute force) or ``faiss`` (candidates, then exact distances; not for
                ``tiled``, whose max over tiles is not an inner product).

        Returns:
            ``(distance, index)``: ``float64`` ``(M,)`` and ``int64`` ``(M,)`` rows of the index.
        """
        images = self._check_query(images)
        if self.features == "classifier":
            query, ref, metric = self.extractor()(images), self.feature_vectors, "euclidean"
        else:
            query, ref, metric = images, self.images, self.metric
        return _nearest(query, ref, metric, self.grid, backend)

    def pixel_l2(self, images: np.ndarray | ImageSet, backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """Normalized pixel L2 to the nearest training image (absolute rule): float64, int64 ``(M,)``."""
        images = self._check_query(images)
        return _nearest(images, self.images, "l2", self.grid, backend)

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.safetensors`` and ``index.json`` into ``directory`` (atomically, each file)."""
        from safetensors.numpy import save as st_save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"images": np.ascontiguousarray(self.images), "labels": np.ascontiguousarray(self.labels)}
        if self.feature_vectors is not None:
            tensors["features"] = np.ascontiguousarray(self.feature_vectors, dtype=np.float32)
        atomic_write_bytes(directory / INDEX_WEIGHTS, st_save(tensors))
        meta = {
            "format": INDEX_FORMAT,
            "num_images": len(self),
            "shape": list(self.shape),
            "features": self.features,
            "metric": self.metric,
            "grid": self.grid,
            "class_names": list(self.class_names),
            "calibration": self.calibration,
            "info": self.info,
            "ids": self.ids.tolist(),
        }
        atomic_write_json(directory / INDEX_JSON, meta)
        return directory

    @staticmethod
    def load(directory: str | Path) -> TrainingIndex:
        """Read an index directory written by :meth:`save` (DataError naming the file when it is not one)."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta_path, weights_path = directory / INDEX_JSON, directory / INDEX_WEIGHTS
        if not meta_path.is_file() or not weights_path.is_file():
            raise DataError(f"{directory}: not a guard index (needs {INDEX_JSON} and {INDEX_WEIGHTS})")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(weights_path))
        except Exception as exc:  # json, OSError and safetensors' own error types
            raise DataError(f"{directory}: unreadable guard index ({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != INDEX_FORMAT:
            raise DataError(f"{meta_path}: unsupported index format {meta.get('format')!r}")
        images = tensors.get("images")
        if images is None or images.dtype != np.uint8 or images.ndim != 4 or len(meta["ids"]) != images.shape[0]:
            raise DataError(f"{weights_path}: images missing or inconsistent with {INDEX_JSON}")
        return TrainingIndex(
            images=images,
            labels=tensors["labels"].astype(np.int64),
            ids=np.asarray(meta["ids"], dtype=np.str_),
            class_names=tuple(meta.get("class_names", [])),
            features=meta["features"],
            metric=meta["metric"],
            grid=int(meta["grid"]),
            feature_vectors=tensors.get("features"),
            calibration=meta.get("calibration", {}),
            info=meta.get("info", {}),
        )


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _nearest(query: np.ndarray, ref: np.ndarray, metric: str, grid: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "exact" or metric == "tiled":
        if backend == "faiss":
            raise ConfigError("the faiss backend cannot search tiled L2 (a max over tiles); use backend='exact'")
        dist, idx = nearest_neighbors(query, ref, k=1, metric=metric, grid=grid)
        return dist[:, 0].astype(np.float64), idx[:, 0]
    if not _faiss_available():
        raise ConfigError("backend 'faiss' needs the faiss package (pip install faiss-cpu); use backend='exact'")
    import faiss

    def rows(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float32)
        return x / 255.0 if metric == "l2" else x

    q, r = rows(query), rows(ref)
    k = min(_FAISS_CANDIDATES, len(r))
    flat = faiss.IndexFlatL2(r.shape[1])
    flat.add(r)
    _, cand = flat.search(q, k)
    # Exact re-ranking in float64 over the candidates (faiss' distances cancel badly for near-copies).
    diff = q[:, None, :].astype(np.float64) - r[cand].astype(np.float64)
    sq = (diff**2).sum(axis=2) / (q.shape[1] if metric == "l2" else 1.0)
    best = np.argmin(sq, axis=1)
    return np.sqrt(sq[np.arange(len(q)), best]), cand[np.arange(len(q)), best].astype(np.int64)


def build_index(
    data: ImageSet,
    holdout: ImageSet | None = None,
    features: str = "pixels",
    metric: str = "l2",
    grid: int = 4,
    target_fpr: float = DEFAULT_TARGET_FPR,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    delta: float = CARLINI_DELTA,
    seed: int = 0,
    backend: str = "exact",
    invariant: Any = None,
) -> TrainingIndex:
    """Index ``data`` and calibrate both blocking rules on held-out real images.

    Args:
        data: the training set.
        holdout: real images not used for training; when None, ``holdout_fraction`` of ``data``'s distinct
            images are held out (seeded, by id) and only the rest is indexed.
        features, metric, grid: search space (``classifier`` implies Euclidean distance on its features).
        target_fpr: the calibrated rule's target false-block rate on held-out real images.
        delta: the absolute rule's normalized-L2 threshold (Carlini et al.: 0.15).
        seed: holdout split and classifier seed.
        invariant: an :class:`~diffaudit.guards.invariant.InvariantConfig` to also calibrate the ``robust`` rule
            (copies after resize, crop, flip and small shifts; see :mod:`diffaudit.guards.invariant`).

    Returns a :class:`TrainingIndex` whose ``calibration`` records, for each rule, its threshold and the
    false-block rate it achieves on the held-out images, and quantiles of the held-out distances.
    """
    if features not in FEATURES:
        raise ConfigError(f"unknown index features {features!r}; choose one of {', '.join(FEATURES)}")
    if features == "pixels" and metric not in PIXEL_METRICS:
        raise ConfigError(f"unknown pixel metric {metric!r}; choose one of {', '.join(PIXEL_METRICS)}")
    if not 0.0 < delta <= 1.0:
        raise ConfigError(f"delta must be in (0, 1] (normalized L2); got {delta!r}")
    if holdout is None:
        keep, held = split_holdout(data, holdout_fraction, seed)
        train, holdout = data.subset(keep), data.subset(held)
        holdout_desc: dict[str, Any] = {"kind": "split", "fraction": holdout_fraction, "seed": seed}
    else:
        train = data
        if holdout.shape != data.shape:
            raise DataError(f"held-out images of shape {holdout.shape} do not match the training set's {data.shape}")
        overlap = np.isin(holdout.ids, data.ids)
        if overlap.any():
            # A held-out image that is also a training image is at distance 0; it says nothing about fresh images.
            holdout = holdout.subset(~overlap)
        holdout_desc = {"kind": "source", "dropped_in_training_set": int(overlap.sum())}
    index = TrainingIndex(
        images=train.images,
        labels=train.labels,
        ids=train.ids,
        class_names=train.class_names,
        features=features,
        metric="euclidean" if features == "classifier" else metric,
        grid=int(grid),
        info={"seed": int(seed), "backend_at_build": backend},
    )
    if features == "classifier":
        extractor = index.extractor()
        index.feature_vectors = extractor(train.images)
        index.info["extractor"] = extractor.describe()
    dist, _ = index.search(holdout.images, backend)
    threshold, achieved = calibrate_threshold(dist, target_fpr)
    l2 = dist if index.metric == "l2" else index.pixel_l2(holdout.images, backend)[0]
    holdout_desc["num_images"] = len(holdout)
    index.calibration = {
        KEY_HOLDOUT: holdout_desc,
        KEY_NUM_HOLDOUT: len(holdout),
        "calibrated": {
            KEY_RULE: f"{index.metric} distance to the nearest training image < threshold",
            KEY_TARGET_FPR: float(target_fpr),
            KEY_THRESHOLD: threshold,
            KEY_ACHIEVED: achieved,
            KEY_HOLDOUT_QUANTILES: _quantiles(dist),
        },
        "absolute": {
            KEY_RULE: "normalized pixel L2 to the nearest training image <= delta (Carlini et al. 2023)",
            KEY_DELTA: float(delta),
            KEY_THRESHOLD: float(delta),
            KEY_ACHIEVED: float((l2 <= delta).mean()),
            KEY_HOLDOUT_QUANTILES: _quantiles(l2),
        },
    }
    if invariant is not None:
        from diffaudit.guards.invariant import ROBUST, calibrate_robust

        index.calibration[ROBUST] = calibrate_robust(index, holdout.images, dist, target_fpr, invariant)
    return index


def _quantiles(d: np.ndarray) -> dict[str, float]:
    qs = (0.0, 0.01, 0.05, 0.5, 0.95, 1.0)
    return {f"q{q:g}": float(np.quantile(d, q)) for q in qs}
