"""Planted duplicates ("canaries"): chosen training images repeated k times, the ground truth for extraction.

Carlini et al. find memorized images concentrated among those duplicated many times in the training set. Planting
known images at known counts (1, 2, 4, ... copies) makes that measurable at small scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import DataError


def plant_canaries(
    data: ImageSet, copies: Sequence[int], per_count: int = 1, seed: int = 0
) -> tuple[ImageSet, list[dict[str, object]]]:
    """Repeat chosen images of ``data`` so that each appears exactly ``k`` times, for each ``k`` in ``copies``.

    ``per_count`` distinct images are chosen (seeded, without replacement) for every count. Returns the new set
    (originals first, extra copies appended) and a table ``[{"id", "index", "label", "copies"}]``.
    Images that already occur more than once are not chosen, so the count is exact.
    """
    if any(k < 1 for k in copies):
        raise DataError(f"canary copy counts must be >= 1, got {list(copies)}")
    _, first_index, counts = np.unique(data.ids, return_index=True, return_counts=True)
    singles = np.sort(first_index[counts == 1])
    needed = len(copies) * per_count
    if needed > len(singles):
        raise DataError(f"need {needed} distinct canary images but the set has only {len(singles)} unique ones")
    chosen = np.random.default_rng(seed).choice(singles, size=needed, replace=False)
    extra_index: list[int] = []
    table: list[dict[str, object]] = []
    for i, idx in enumerate(chosen):
        k = int(copies[i // per_count])
        extra_index.extend([int(idx)] * (k - 1))
        table.append({"id": str(data.ids[idx]), "index": int(idx), "label": int(data.labels[idx]), "copies": k})
    if not extra_index:
        return data, table
    return ImageSet.concat([data, data.subset(np.array(extra_index))]), table
