"""Untargeted extraction for unconditional generation (Carlini et al. 2023, Sec. 5): the adaptive ratio.

A generation is extracted when its distance to the nearest training image is small *relative to* the mean
distance to its ``n_neighbors`` nearest training images (ratio ``R <= 1`` at ``alpha``), and within ``delta``
in plain normalized L2. Works on an :class:`ImageSet` of generations of any generator.
"""

from __future__ import annotations

import numpy as np

from diffaudit.data.imageset import ImageSet

#: Carlini's defaults for the adaptive ratio.
DEFAULT_ALPHA = 0.5
DEFAULT_NEIGHBORS = 50


def untargeted_extraction(
    generations: ImageSet,
    train: ImageSet,
    delta: float = 0.15,
    grid: int = 4,
    alpha: float = DEFAULT_ALPHA,
    n_neighbors: int = DEFAULT_NEIGHBORS,
) -> dict[str, object]:
    """Carlini's adaptive-ratio filter (Sec. 5) over all generations, summarised per training image.

    Returns ``{"summary": memorization summary, "extracted_train_ids": [...], "within_delta_train_ids": [...],
    "pairs": [{"generation": i, "seed", "train_index", "train_id", "l2", "ratio"}] sorted by l2}`` where
    pairs lists generations extracted by the adaptive ratio (R <= 1) *and* within ``delta``.
    """
    from diffaudit.metrics import memorization as mem

    rep = mem.memorization_report(generations.images, train.images, delta, grid, alpha, n_neighbors)
    return untargeted_from_report(rep, generations.provenance["seed"], train.ids)


def untargeted_from_report(rep: dict[str, object], seeds: np.ndarray, train_ids: np.ndarray) -> dict[str, object]:
    """:func:`untargeted_extraction`'s result from a memorization report (per-sample arrays and summary).

    ``seeds``: int64 ``(N,)`` of the generations, in the report's order; ``train_ids``: str ``(M,)``. A report
    assembled from blocks of generations (their per-sample arrays concatenated, the summary by
    :func:`diffaudit.metrics.memorization.report_summary`) gives the same result as one over all of them.
    """
    from diffaudit.metrics import memorization as mem

    extracted, within = np.asarray(rep[mem.EXTRACTED]), np.asarray(rep[mem.WITHIN_DELTA])
    nn, nn_l2, ratio = np.asarray(rep[mem.NN_INDEX]), np.asarray(rep[mem.NN_L2]), np.asarray(rep[mem.ADAPTIVE_RATIO])
    hits = np.flatnonzero(extracted & within)
    hits = hits[np.argsort(nn_l2[hits], kind="stable")]
    return {
        "summary": rep[mem.SUMMARY],
        "extracted_train_ids": sorted({str(train_ids[i]) for i in nn[extracted]}),
        "extracted_and_within_delta_train_ids": sorted({str(train_ids[nn[i]]) for i in hits}),
        "within_delta_train_ids": sorted({str(train_ids[i]) for i in nn[within]}),
        "pairs": [
            {
                "generation": int(i),
                "seed": int(seeds[i]),
                "train_index": int(nn[i]),
                "train_id": str(train_ids[nn[i]]),
                "l2": float(nn_l2[i]),
                "ratio": float(ratio[i]),
            }
            for i in hits
        ],
    }
