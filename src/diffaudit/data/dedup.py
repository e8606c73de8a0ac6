"""Deduplicating a training set before training: the first mitigation of memorization.

Carlini et al. (2023, Sec. 7) found that images duplicated in the training set are the ones a diffusion model
regurgitates, and that removing near-duplicates before training cut extractions on CIFAR-10 from 1,280 to 986.
:func:`deduplicate` keeps one image of each group of near-duplicates: two images are linked when their distance
(``metric``: Carlini's normalized ``l2`` or ``tiled`` L2, pixels in [0, 1]) is at most ``threshold``; a group is a
connected component of links (so a chain of slightly different copies is one group), and its first image (lowest
position) is kept. Exact copies (equal content ids) are always one group, whatever ``k``.

Links come from each image's ``k`` nearest neighbours (:func:`diffaudit.distances.nearest_neighbors`, exact
distances), so memory stays ``O(N k)``; a group larger than ``k + 1`` is still found whole as long as its members
are linked through chains of nearest neighbours, which copies of one image are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError

#: Default link threshold on normalized L2: near-exact copies (re-encoded, lightly noised), not look-alikes.
#: Distinct 8x8 digits of one class sit at 0.15 and above; copies with sigma-4 noise at about 0.016.
DEFAULT_THRESHOLD = 0.05
DEFAULT_K = 8


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = int(parent[i])
    return i


def near_duplicate_groups(
    data: ImageSet, threshold: float = DEFAULT_THRESHOLD, metric: str = "l2", grid: int = 4, k: int = DEFAULT_K
) -> np.ndarray:
    """Group id per image, ``int64 (N,)``: the position of the group's first image (its own position if unique)."""
    if not threshold >= 0:
        raise ConfigError(f"dedup threshold must be >= 0 (normalized L2); got {threshold!r}")
    if k < 1:
        raise ConfigError(f"dedup neighbours k must be >= 1; got {k}")
    n = len(data)
    parent = np.arange(n, dtype=np.int64)

    def union(a: int, b: int) -> None:
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the lower position becomes the root: it is the one kept

    _, first = np.unique(data.ids, return_index=True)
    by_id = {str(data.ids[f]): int(f) for f in first}
    for i, image_id in enumerate(data.ids.tolist()):
        union(by_id[image_id], i)
    if n > 1:
        from diffaudit.distances import nearest_neighbors

        kk = min(k + 1, n)  # + 1: an image is its own nearest neighbour
        dist, idx = nearest_neighbors(data.images, data.images, k=kk, metric=metric, grid=grid)
        rows, cols = np.nonzero(dist <= threshold)
        for i, j in zip(rows.tolist(), idx[rows, cols].tolist(), strict=True):
            if i != j:
                union(i, int(j))
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def deduplicate(
    data: ImageSet, threshold: float = DEFAULT_THRESHOLD, metric: str = "l2", grid: int = 4, k: int = DEFAULT_K
) -> tuple[ImageSet, dict[str, Any]]:
    """Keep the first image of each near-duplicate group; returns the kept set and a JSON-ready record.

    The record holds ``num_in``, ``num_kept``, ``num_removed``, ``num_groups`` (groups with more than one image),
    ``largest_group``, the settings, and ``removed``: ``[{"id", "index", "kept_id", "kept_index"}]``.
    """
    groups = near_duplicate_groups(data, threshold, metric, grid, k)
    keep = groups == np.arange(len(data))
    sizes = np.bincount(groups, minlength=len(data)) if len(data) else np.zeros(0, np.int64)
    removed = [
        {"id": str(data.ids[i]), "index": int(i), "kept_id": str(data.ids[groups[i]]), "kept_index": int(groups[i])}
        for i in np.flatnonzero(~keep).tolist()
    ]
    record = {
        "threshold": float(threshold),
        "metric": metric,
        "k": int(k),
        "num_in": len(data),
        "num_kept": int(keep.sum()),
        "num_removed": int((~keep).sum()),
        "num_groups": int((sizes > 1).sum()),
        "largest_group": int(sizes.max()) if len(data) else 0,
        "removed": removed,
    }
    return data.subset(keep), record
