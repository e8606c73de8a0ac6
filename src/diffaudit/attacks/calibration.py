"""ROC calibration of the clique-graph edge threshold (Carlini et al. 2023, Sec. 4 step 4).

The paper joins two generations of one prompt by an edge when their tiled L2 is below a threshold it does not
publish (public re-implementations use 0.05 to 0.15). We calibrate it on the training data itself:

* **positive pairs** ("two generations of one memorized image"): one training image with two independent draws
  of small Gaussian pixel noise (std ``noise_std`` on the [0, 1] scale), each clipped and rounded to uint8 as a
  generation is;
* **negative pairs** ("two different images"): two training images with different content ids, drawn from the
  same label when the set is labelled (the clique graph is built inside one label, so those are the hard
  negatives), with the same noise applied.

The threshold is the largest value whose false-edge rate on the negatives (fraction with distance strictly below
it) is at most ``target_fpr``. The full ROC, its AUC and the true-edge rate at the chosen value are returned so
that a run can record them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.distances import tiled_l2
from diffaudit.errors import ConfigError, DataError

#: Default target false-edge rate. With 500 generations of a prompt that is *not* memorized, a chance clique of
#: 10 needs 45 false edges among 10 vertices; at a 0.1% edge rate that is astronomically unlikely.
DEFAULT_TARGET_FPR = 1e-3
#: Default pixel-noise std (on [0, 1]) of a planted near-copy; two such copies are ~0.03 * sqrt(2) = 0.042 apart
#: in normalized L2, close to the l2 = 0.031 of the copy in Carlini et al.'s Fig. 1.
DEFAULT_NOISE_STD = 0.03
DEFAULT_NUM_PAIRS = 2000


@dataclass(frozen=True)
class EdgeCalibration:
    """Outcome of :func:`calibrate_edge_threshold`.

    Attributes:
        threshold: chosen edge threshold (edge when tiled L2 < threshold).
        target_fpr: the false-edge rate asked for.
        fpr: false-edge rate on the negatives at ``threshold``.
        tpr: true-edge rate on the positives at ``threshold``.
        auc: area under the ROC (distance as a score, smaller = more alike).
        roc_fpr, roc_tpr, roc_thresholds: the ROC as float64 arrays ``(P,)`` (edge when distance < threshold).
        num_positive, num_negative: pair counts; noise_std, grid, seed: how the pairs were made.
    """

    threshold: float
    target_fpr: float
    fpr: float
    tpr: float
    auc: float
    roc_fpr: np.ndarray
    roc_tpr: np.ndarray
    roc_thresholds: np.ndarray
    num_positive: int
    num_negative: int
    noise_std: float
    grid: int
    seed: int

    def to_dict(self, roc_points: int = 200) -> dict[str, object]:
        """JSON-ready summary; the ROC is thinned to at most ``roc_points`` points (ends kept)."""
        n = len(self.roc_fpr)
        keep = np.unique(np.linspace(0, n - 1, min(n, roc_points)).round().astype(int)) if n else np.zeros(0, int)
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "fpr_at_threshold": self.fpr,
            "tpr_at_threshold": self.tpr,
            "auc": self.auc,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "noise_std": self.noise_std,
            "grid": self.grid,
            "seed": self.seed,
            "roc": {
                "fpr": self.roc_fpr[keep].tolist(),
                "tpr": self.roc_tpr[keep].tolist(),
                "threshold": self.roc_thresholds[keep].tolist(),
            },
        }


def _noisy(images: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 images ``(N, C, H, W)`` plus Gaussian noise (std on the [0, 1] scale), clipped and rounded to uint8."""
    x = images.astype(np.float32) + rng.normal(0.0, noise_std * 255.0, size=images.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _negative_partners(data: ImageSet, first: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each index in ``first``, another index with a different id (same label when possible)."""
    partners = np.empty_like(first)
    by_label: dict[int, np.ndarray] = {}
    for lab in np.unique(data.labels):
        by_label[int(lab)] = np.flatnonzero(data.labels == lab)
    everything = np.arange(len(data))
    for p, i in enumerate(first):
        pool = by_label[int(data.labels[i])]
        pool = pool[data.ids[pool] != data.ids[i]]
        if pool.size == 0:  # a label with one distinct image: fall back to any other image
            pool = everything[data.ids != data.ids[i]]
        partners[p] = pool[rng.integers(pool.size)]
    return partners


def planted_pair_distances(
    train: ImageSet,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    noise_std: float = DEFAULT_NOISE_STD,
    grid: int = 4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Tiled L2 of planted near-copy pairs and of different-image pairs from ``train``.

    Args:
        train: the training images (uint8 ``(N, C, H, W)``), at least two distinct ids.
        num_pairs: pairs of each kind.
        noise_std: pixel noise std on the [0, 1] scale applied to every image of every pair.
        grid: tiles per side.
        seed: seeds the one ``np.random.Generator`` used.

    Returns:
        ``(positive, negative)``: float32 arrays ``(num_pairs,)``.
    """
    if num_pairs < 1:
        raise ConfigError(f"num_pairs must be >= 1, got {num_pairs}")
    if not noise_std >= 0:
        raise ConfigError(f"noise_std must be >= 0, got {noise_std}")
    if np.unique(train.ids).size < 2:
        raise DataError(f"calibration needs at least 2 distinct training images, got {np.unique(train.ids).size}")
    rng = np.random.default_rng(seed)
    pos_idx = rng.integers(len(train), size=num_pairs)
    img = train.images
    positive = tiled_l2(_noisy(img[pos_idx], noise_std, rng), _noisy(img[pos_idx], noise_std, rng), grid=grid)
    neg_a = rng.integers(len(train), size=num_pairs)
    neg_b = _negative_partners(train, neg_a, rng)
    negative = tiled_l2(_noisy(img[neg_a], noise_std, rng), _noisy(img[neg_b], noise_std, rng), grid=grid)
    return positive, negative


def roc_from_distances(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "edge when distance < t" over every distinct t.

    Returns float64 ``(fpr, tpr, thresholds)`` of equal length, thresholds ascending; the first point is
    (0, 0) at the smallest distance, the last (1, 1) just above the largest.
    """
    pos = np.sort(np.asarray(positive, dtype=np.float64))
    neg = np.sort(np.asarray(negative, dtype=np.float64))
    cuts = np.unique(np.concatenate([pos, neg]))
    cuts = np.append(cuts, np.nextafter(cuts[-1], np.inf))
    # searchsorted(left) counts values strictly below each cut.
    tpr = np.searchsorted(pos, cuts, side="left") / len(pos)
    fpr = np.searchsorted(neg, cuts, side="left") / len(neg)
    return fpr, tpr, cuts


def threshold_at_fpr(negative: np.ndarray, target_fpr: float) -> float:
    """Largest t with ``mean(negative < t) <= target_fpr`` (the ``floor(target * n)``-th smallest negative)."""
    if not 0 <= target_fpr < 1:
        raise ConfigError(f"target false-edge rate must be in [0, 1), got {target_fpr}")
    neg = np.sort(np.asarray(negative, dtype=np.float64))
    k = int(np.floor(target_fpr * len(neg)))
    return float(neg[k])


def calibrate_edge_threshold(
    train: ImageSet,
    grid: int = 4,
    target_fpr: float = DEFAULT_TARGET_FPR,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    noise_std: float = DEFAULT_NOISE_STD,
    seed: int = 0,
) -> EdgeCalibration:
    """Pick the edge threshold at ``target_fpr`` false edges on planted pairs from ``train`` (see module doc)."""
    positive, negative = planted_pair_distances(train, num_pairs, noise_std, grid, seed)
    threshold = threshold_at_fpr(negative, target_fpr)
    fpr, tpr, cuts = roc_from_distances(positive, negative)
    auc = float(np.trapezoid(tpr, fpr))
    return EdgeCalibration(
        threshold=threshold,
        target_fpr=float(target_fpr),
        fpr=float(np.mean(negative < threshold)),
        tpr=float(np.mean(positive < threshold)),
        auc=auc,
        roc_fpr=fpr,
        roc_tpr=tpr,
        roc_thresholds=cuts,
        num_positive=len(positive),
        num_negative=len(negative),
        noise_std=float(noise_std),
        grid=int(grid),
        seed=int(seed),
    )
