"""Memorization measures of generated images against the training set, side by side.

* Nearest training image per generated image in normalized L2 and in tiled L2, and the fraction within
  ``delta`` (Carlini et al.'s ``(l2, delta)``-extraction, delta = 0.15).
* Gu et al.'s ratio ``l2(x, NN1) / l2(x, NN2)`` (first and second nearest training images); memorized when
  below 1/3.
* Carlini et al.'s adaptive ratio ``R = l2(x_hat, x_nn) / (alpha * mean_{s in S} l2(x_hat, s))``
  where ``S`` is the set of the ``n`` nearest *training* images *of the generated image* x_hat
  (which includes x_nn); extracted when ``R <= 1``. (One public implementation used the neighbourhood
  of the training image x_nn instead; that is not the paper's definition.)

Generated images come first, training images second. Both are ``(N, C, H, W)``, ``uint8`` or float in [0, 1].
All neighbour searches go through :mod:`diffaudit.distances`, so distances are exact for near-copies.
"""

from __future__ import annotations

import numpy as np

from diffaudit import distances
from diffaudit.errors import ConfigError, DataError

# Per-sample arrays (length = number of generated images).
NN_INDEX = "nn_index"  # int64, nearest training image in normalized L2
NN_L2 = "nn_l2"  # float32, its normalized L2
NN2_L2 = "nn2_l2"  # float32, normalized L2 to the second nearest training image
NN_INDEX_TILED = "nn_index_tiled"  # int64, nearest training image in tiled L2
NN_TILED_L2 = "nn_tiled_l2"  # float32, its tiled L2
WITHIN_DELTA = "within_delta"  # bool, nn_l2 <= delta
WITHIN_DELTA_TILED = "within_delta_tiled"  # bool, nn_tiled_l2 <= delta
GU_RATIO = "gu_ratio"  # float64, nn_l2 / nn2_l2 (0 when nn_l2 == 0)
GU_MEMORIZED = "gu_memorized"  # bool, gu_ratio < 1/3
ADAPTIVE_RATIO = "adaptive_ratio"  # float64, Carlini's R (0 when nn_l2 == 0)
EXTRACTED = "extracted"  # bool, adaptive_ratio <= 1
PER_SAMPLE_KEYS = (
    NN_INDEX,
    NN_L2,
    NN2_L2,
    NN_INDEX_TILED,
    NN_TILED_L2,
    WITHIN_DELTA,
    WITHIN_DELTA_TILED,
    GU_RATIO,
    GU_MEMORIZED,
    ADAPTIVE_RATIO,
    EXTRACTED,
)
#: Key of the summary dict in the report.
SUMMARY = "summary"
# Summary keys.
NUM_GENERATED = "num_generated"
NUM_TRAIN = "num_train"
DELTA = "delta"
GRID = "grid"
ALPHA = "alpha"
N_NEIGHBORS = "n_neighbors"  # as requested
N_NEIGHBORS_USED = "n_neighbors_used"  # min(requested, training set size)
FRAC_WITHIN_DELTA = "frac_within_delta"
FRAC_WITHIN_DELTA_TILED = "frac_within_delta_tiled"
FRAC_GU_MEMORIZED = "frac_gu_memorized"
FRAC_EXTRACTED = "frac_extracted"
NUM_EXTRACTED = "num_extracted"
NUM_TRAIN_EXTRACTED = "num_train_extracted"  # distinct training images matched by an extracted sample
NUM_TRAIN_WITHIN_DELTA = "num_train_within_delta"  # distinct training images matched within delta
GU_THRESHOLD = 1.0 / 3.0


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where num == 0 (an exact copy, even of a duplicated training image, has ratio 0)."""
    num, den = num.astype(np.float64), den.astype(np.float64)
    out = np.zeros_like(num)
    nz = num > 0
    # den > 0 wherever num > 0: den is the 2nd neighbour or a mean over neighbours including the 1st.
    out[nz] = num[nz] / den[nz]
    return out


def memorization_report(
    gen_images: np.ndarray,
    train_images: np.ndarray,
    delta: float = 0.15,
    grid: int = 4,
    alpha: float = 0.5,
    n_neighbors: int = 50,
    block: int = distances.DEFAULT_BLOCK,
) -> dict[str, object]:
    """Per-sample memorization measures of generated images against the training set, plus a summary.

    Args:
        gen_images: generated images ``(N, C, H, W)``, ``uint8`` or float in [0, 1].
        train_images: training images ``(M, C, H, W)``, same item shape, M >= 2.
        delta: extraction threshold on normalized L2 (and on tiled L2 for the tiled column).
        grid: tiles per side for tiled L2 (H and W must be divisible by it).
        alpha: Carlini's adaptive-ratio scale.
        n_neighbors: size of the generated image's training neighbourhood for the adaptive ratio (paper: 50);
            clamped to M and the value used is reported under ``N_NEIGHBORS_USED``.
        block: rows per block of the distance engine.

    Returns:
        ``{key: array (N,)}`` for every key in ``PER_SAMPLE_KEYS`` and ``SUMMARY: {...}`` with fractions
        and counts.
    """
    if not delta > 0:
        raise ConfigError(f"delta must be > 0, got {delta!r}")
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha!r}")
    if not isinstance(n_neighbors, int | np.integer) or n_neighbors < 1:
        raise ConfigError(f"n_neighbors must be a positive integer, got {n_neighbors!r}")
    if len(train_images) < 2:
        raise DataError(f"the training set has {len(train_images)} images; the ratios need at least 2")
    n_used = int(min(n_neighbors, len(train_images)))
    k = max(2, n_used)
    dist, idx = distances.nearest_neighbors(gen_images, train_images, k=k, metric="l2", block_q=block, block_r=block)
    tdist, tidx = distances.nearest_neighbors(
        gen_images, train_images, k=1, metric="tiled", grid=grid, block_q=block, block_r=block
    )
    nn, nn2 = dist[:, 0], dist[:, 1]
    gu = _safe_ratio(nn, nn2)
    neighbourhood = dist[:, :n_used].astype(np.float64).mean(1)  # the generated image's own n nearest
    adaptive = _safe_ratio(nn, alpha * neighbourhood)
    extracted = adaptive <= 1.0
    within, within_t = nn <= delta, tdist[:, 0] <= delta
    gu_mem = gu < GU_THRESHOLD
    report: dict[str, object] = {
        NN_INDEX: idx[:, 0],
        NN_L2: nn,
        NN2_L2: nn2,
        NN_INDEX_TILED: tidx[:, 0],
        NN_TILED_L2: tdist[:, 0],
        WITHIN_DELTA: within,
        WITHIN_DELTA_TILED: within_t,
        GU_RATIO: gu,
        GU_MEMORIZED: gu_mem,
        ADAPTIVE_RATIO: adaptive,
        EXTRACTED: extracted,
    }
    report[SUMMARY] = report_summary(report, len(train_images), delta, grid, alpha, n_neighbors)
    return report


def report_summary(
    per_sample: dict[str, object], num_train: int, delta: float, grid: int, alpha: float, n_neighbors: int
) -> dict[str, object]:
    """The summary of :func:`memorization_report` from its per-sample arrays (``PER_SAMPLE_KEYS``).

    Every per-sample value depends only on its own generated image, so the arrays of several blocks of
    generations (e.g. one per condition of a sharded extraction) concatenated give the whole set's summary.
    """
    within, within_t = np.asarray(per_sample[WITHIN_DELTA]), np.asarray(per_sample[WITHIN_DELTA_TILED])
    gu_mem, extracted = np.asarray(per_sample[GU_MEMORIZED]), np.asarray(per_sample[EXTRACTED])
    nn_index = np.asarray(per_sample[NN_INDEX])
    return {
        NUM_GENERATED: len(nn_index),
        NUM_TRAIN: int(num_train),
        DELTA: float(delta),
        GRID: int(grid),
        ALPHA: float(alpha),
        N_NEIGHBORS: int(n_neighbors),
        N_NEIGHBORS_USED: int(min(n_neighbors, num_train)),
        FRAC_WITHIN_DELTA: float(within.mean()),
        FRAC_WITHIN_DELTA_TILED: float(within_t.mean()),
        FRAC_GU_MEMORIZED: float(gu_mem.mean()),
        FRAC_EXTRACTED: float(extracted.mean()),
        NUM_EXTRACTED: int(extracted.sum()),
        NUM_TRAIN_EXTRACTED: int(np.unique(nn_index[extracted]).size),
        NUM_TRAIN_WITHIN_DELTA: int(np.unique(nn_index[within]).size),
    }
