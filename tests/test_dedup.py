"""Deduplication before training removes planted duplicates (exact and noisy) and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from diffaudit.data.canaries import plant_canaries
from diffaudit.data.dedup import deduplicate, near_duplicate_groups
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError
from diffaudit.guards.perturb import gaussian_noise


@pytest.fixture(scope="module")
def base() -> ImageSet:
    digits = load_source("digits")
    return digits.subset(np.arange(400))  # 400 distinct digits, no near-duplicates at 0.05 among them


def test_dedup_removes_planted_duplicates_only(base):
    planted, table = plant_canaries(base, [2, 4, 8, 16], per_count=2, seed=1)
    # Noisy copies too (sigma 3 uint8 levels): distinct ids, normalized L2 about 0.012 from their source.
    noisy = ImageSet(gaussian_noise(base.images[:5], sigma=3.0, seed=4), base.labels[:5], base.class_names)
    data = ImageSet.concat([planted, noisy])
    kept, record = deduplicate(data)
    assert len(planted) == 400 + 2 * (1 + 3 + 7 + 15)
    assert record["num_removed"] == 2 * (1 + 3 + 7 + 15) + 5 and len(kept) == 400
    assert sorted(kept.ids) == sorted(base.ids)  # every original kept once: the first of each group
    assert record["largest_group"] == 16 and record["num_groups"] == 8 + 5
    noisy_rows = [r for r in record["removed"] if r["index"] >= len(planted)]
    assert [r["kept_index"] for r in noisy_rows] == [0, 1, 2, 3, 4]


def test_groups_are_connected_components_and_threshold_matters(base):
    a = base.images[:1].astype(np.int16)
    # A chain: each step 10 levels brighter (normalized L2 ~0.04 per step), ends 0.08 apart.
    chain = np.concatenate([np.clip(a + 10 * s, 0, 255) for s in range(3)]).astype(np.uint8)
    data = ImageSet(np.concatenate([chain, base.images[1:3]]), np.full(5, -1))
    assert near_duplicate_groups(data, 0.05).tolist() == [0, 0, 0, 3, 4]
    assert near_duplicate_groups(data, 0.01).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="threshold"):
        deduplicate(data, -1.0)


def test_dedup_as_source_option():
    data = load_source("digits", dedup=0.05)
    assert len(data) == 1796  # digits holds one near-duplicate pair at this threshold
    assert len(load_source("digits")) == 1797
