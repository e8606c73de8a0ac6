"""Memorization measures: hand-computed adaptive and Gu ratios, planted copies found at distance 0."""

from __future__ import annotations

import numpy as np
import pytest

from diffaudit.errors import ConfigError, DataError
from diffaudit.metrics import memorization as mem


def _flat(values: list[int]) -> np.ndarray:
    """Constant 1x4x4 uint8 images: the normalized L2 between two of them is |a - b| / 255 exactly."""
    return np.array(values, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 4, 4), dtype=np.uint8)


def test_adaptive_ratio_uses_the_generated_images_neighbourhood() -> None:
    train = _flat([130, 131, 132, 75, 200])
    gen = _flat([128, 73])
    rep = mem.memorization_report(gen, train, alpha=0.5, n_neighbors=3)
    # gen 128: distances 2, 3, 4, 53, 72 (/255); its 3 nearest have mean 3; R = 2 / (0.5 * 3) = 4/3: kept.
    # The wrong neighbourhood (of the training image 130: 1, 2, 55 away) would give R = 6/29 and flag it.
    # gen 73: distances 2, 57, 58, 59, 127; mean of 3 nearest = 39; R = 2 / (0.5 * 39) = 4/39: extracted.
    np.testing.assert_allclose(rep[mem.ADAPTIVE_RATIO], [4 / 3, 4 / 39], rtol=1e-5)
    np.testing.assert_array_equal(rep[mem.EXTRACTED], [False, True])
    np.testing.assert_allclose(rep[mem.GU_RATIO], [2 / 3, 2 / 57], rtol=1e-5)
    np.testing.assert_array_equal(rep[mem.GU_MEMORIZED], [False, True])
    np.testing.assert_array_equal(rep[mem.NN_INDEX], [0, 3])
    np.testing.assert_allclose(rep[mem.NN_L2], [2 / 255, 2 / 255], rtol=1e-5)
    s = rep[mem.SUMMARY]
    assert s[mem.NUM_EXTRACTED] == 1 and s[mem.FRAC_EXTRACTED] == 0.5
    assert s[mem.N_NEIGHBORS_USED] == 3
    # Both within delta = 0.15, so the plain threshold flags both: the ratio is what tells them apart.
    assert s[mem.FRAC_WITHIN_DELTA] == 1.0


def test_planted_copy_found_at_distance_zero() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    gen = rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    gen[4] = train[17]
    gen[6] = np.clip(train[3].astype(int) + 2, 0, 255)  # a near-copy, 2/255 away in most pixels
    rep = mem.memorization_report(gen.astype(np.float32) / 255, train, n_neighbors=50)
    assert rep[mem.NN_INDEX][4] == 17 and rep[mem.NN_L2][4] == 0.0
    assert rep[mem.NN_INDEX_TILED][4] == 17 and rep[mem.NN_TILED_L2][4] == 0.0
    assert rep[mem.NN_INDEX][6] == 3 and 0 < rep[mem.NN_L2][6] <= 2 / 255 + 1e-6
    assert rep[mem.ADAPTIVE_RATIO][4] == 0.0 and rep[mem.GU_RATIO][4] == 0.0
    np.testing.assert_array_equal(np.flatnonzero(rep[mem.WITHIN_DELTA]), [4, 6])
    np.testing.assert_array_equal(np.flatnonzero(rep[mem.EXTRACTED]), [4, 6])
    np.testing.assert_array_equal(np.flatnonzero(rep[mem.WITHIN_DELTA_TILED]), [4, 6])
    s = rep[mem.SUMMARY]
    assert s[mem.N_NEIGHBORS_USED] == 40 and s[mem.NUM_TRAIN_EXTRACTED] == 2
    for key in mem.PER_SAMPLE_KEYS:
        assert len(rep[key]) == 10


def test_duplicated_training_image_copy_has_ratio_zero() -> None:
    train = _flat([10, 10, 200])
    rep = mem.memorization_report(_flat([10]), train, n_neighbors=2)
    assert rep[mem.GU_RATIO][0] == 0.0 and rep[mem.GU_MEMORIZED][0]
    assert rep[mem.EXTRACTED][0]


def test_bad_inputs() -> None:
    img = _flat([1, 2])
    with pytest.raises(DataError, match="at least 2"):
        mem.memorization_report(img, img[:1])
    with pytest.raises(ConfigError, match="alpha"):
        mem.memorization_report(img, img, alpha=0)
    with pytest.raises(DataError, match="divisible"):
        mem.memorization_report(img, img, grid=3)
