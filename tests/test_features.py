"""Feature extractors: registry, determinism, batch-size independence, classifier accuracy, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.metrics import features as F


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageSet(images, d.target, tuple(str(i) for i in range(10)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def trained(digits: ImageSet, cache_dir) -> F.FeatureExtractor:
    return F.get_extractor(F.CLASSIFIER, digits, cache_dir=str(cache_dir))


def test_registry_names_and_unknown_name(digits: ImageSet) -> None:
    assert {F.CLASSIFIER, F.RANDOM_CNN, F.PIXELS, F.INCEPTION} <= set(F.available_extractors())
    with pytest.raises(ConfigError) as err:
        F.get_extractor("incepton", digits)
    for name in (F.CLASSIFIER, F.RANDOM_CNN, F.PIXELS):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="epoch"):
        F.get_extractor(F.CLASSIFIER, digits, epoch=3)  # typo of `epochs`
    with pytest.raises(ConfigError, match="feature_dim"):
        F.get_extractor(F.RANDOM_CNN, digits, feature_dim=0)
    with pytest.raises(ConfigError, match="mode"):
        F.get_extractor(F.CLASSIFIER, digits, mode="regression")


def test_inception_is_a_clear_config_error(digits: ImageSet) -> None:
    with pytest.raises(ConfigError, match="classifier"):
        F.get_extractor(F.INCEPTION, digits)
    with pytest.raises(ConfigError, match="weights"):
        F.get_extractor(F.INCEPTION, digits, weights="/nonexistent/pt_inception.safetensors")


@pytest.mark.parametrize("name", [F.PIXELS, F.RANDOM_CNN])
def test_untrained_extractors_deterministic_and_batch_independent(digits: ImageSet, name: str) -> None:
    images = digits.images[:300]
    a = F.get_extractor(name, digits)(images, batch_size=300)
    b = F.get_extractor(name, digits)(images, batch_size=7)
    assert a.dtype == np.float32 and a.shape[0] == 300
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.array_equal(a, F.get_extractor(name, digits)(images, batch_size=300))
    assert a.std(axis=0).max() > 0  # not a constant map


def test_pixels_are_flattened_unit_interval(digits: ImageSet) -> None:
    feats = F.get_extractor(F.PIXELS, digits)(digits.images[:5])
    assert feats.shape == (5, 64)
    np.testing.assert_allclose(feats, digits.images[:5].reshape(5, -1) / 255.0, atol=1e-7)


def test_random_cnn_seed_changes_features(digits: ImageSet) -> None:
    a = F.get_extractor(F.RANDOM_CNN, digits, seed=0)(digits.images[:20])
    b = F.get_extractor(F.RANDOM_CNN, digits, seed=1)(digits.images[:20])
    assert not np.allclose(a, b)


def test_random_cnn_colour_and_resolutions() -> None:
    rng = np.random.default_rng(0)
    for shape in [(3, 32, 32), (1, 64, 64), (3, 28, 28), (1, 8, 8)]:
        ref = ImageSet(rng.integers(0, 256, (4, *shape), dtype=np.uint8), np.full(4, -1))
        feats = F.get_extractor(F.RANDOM_CNN, ref)(ref)
        assert feats.shape == (4, 128) and np.isfinite(feats).all()


def test_shape_mismatch_and_bad_input(digits: ImageSet) -> None:
    ex = F.get_extractor(F.PIXELS, digits)
    with pytest.raises(DataError, match=r"\(3, 8, 8\)"):
        ex(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        ex(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="batch_size"):
        ex(digits.images[:2], batch_size=0)


def test_classifier_accuracy_and_description(trained: F.FeatureExtractor, digits: ImageSet) -> None:
    info = trained.describe()
    assert set(F.DESCRIBE_KEYS) <= set(info)
    assert info[F.KEY_MODE] == "classifier"
    assert info[F.KEY_ACCURACY] > 0.90
    assert info[F.KEY_RECON_MSE] is None
    assert info["num_holdout"] + info["num_train"] == len(digits)
    assert info[F.KEY_CACHE_HIT] is False
    json.dumps(info)  # recordable as is
    a = trained(digits, batch_size=1797)
    b = trained(digits, batch_size=100)
    assert a.shape == (1797, 128) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.array_equal(a, trained(digits, batch_size=1797))


def test_cache_hit_is_identical_and_order_independent(trained: F.FeatureExtractor, digits: ImageSet, cache_dir) -> None:
    shuffled = digits.subset(np.random.default_rng(3).permutation(len(digits)))
    again = F.get_extractor(F.CLASSIFIER, shuffled, cache_dir=str(cache_dir))
    assert again.describe()[F.KEY_CACHE_HIT] is True
    assert again.describe()[F.KEY_CACHE_KEY] == trained.describe()[F.KEY_CACHE_KEY]
    assert again.describe()[F.KEY_ACCURACY] == trained.describe()[F.KEY_ACCURACY]
    assert np.array_equal(again(digits.images), trained(digits.images))
    # A different config is a different entry.
    other = F.get_extractor(F.CLASSIFIER, digits, cache_dir=str(cache_dir), epochs=1, seed=5)
    assert other.describe()[F.KEY_CACHE_KEY] != trained.describe()[F.KEY_CACHE_KEY]


def test_cache_dir_from_environment(digits: ImageSet, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFAUDIT_CACHE", str(tmp_path))
    small = digits.subset(np.arange(200))
    ex = F.get_extractor(F.CLASSIFIER, small, epochs=2)
    assert ex.describe()["cache_path"].startswith(str(tmp_path))
    assert list(tmp_path.rglob("model.safetensors")) and list(tmp_path.rglob("meta.json"))
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("damage", ["weights", "meta", "checksum"])
def test_corrupt_cache_entry_is_retrained(digits: ImageSet, tmp_path, damage: str) -> None:
    small = digits.subset(np.arange(300))
    first = F.get_extractor(F.CLASSIFIER, small, cache_dir=str(tmp_path), epochs=3)
    reference = first(small)
    entry = next(tmp_path.rglob("meta.json")).parent
    weights, meta = entry / "model.safetensors", entry / "meta.json"
    if damage == "weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "meta":
        meta.write_text("{not json", encoding="utf-8")
    else:  # same size, flipped bytes in the middle: only the checksum notices
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = F.get_extractor(F.CLASSIFIER, small, cache_dir=str(tmp_path), epochs=3)
    assert again.describe()[F.KEY_CACHE_HIT] is False
    np.testing.assert_allclose(again(small), reference, rtol=0, atol=1e-5)  # training is deterministic
    third = F.get_extractor(F.CLASSIFIER, small, cache_dir=str(tmp_path), epochs=3)  # repaired entry
    assert third.describe()[F.KEY_CACHE_HIT] is True


def test_unlabelled_reference_trains_autoencoder(digits: ImageSet, tmp_path) -> None:
    unlabelled = ImageSet(digits.images[:400], np.full(400, -1))
    ex = F.get_extractor(F.CLASSIFIER, unlabelled, cache_dir=str(tmp_path), epochs=5)
    info = ex.describe()
    assert info[F.KEY_MODE] == "autoencoder"
    assert info[F.KEY_ACCURACY] is None
    # Better than predicting the mean image would be: the bottleneck carries information.
    assert 0 < info[F.KEY_RECON_MSE] < float(digits.to_float()[:400].var(axis=0).mean())
    assert ex(unlabelled).shape == (400, 128)
    with pytest.raises(DataError, match="labelled"):
        F.get_extractor(F.CLASSIFIER, unlabelled, cache_dir=str(tmp_path), mode="classifier")


def test_tiny_reference_is_rejected(digits: ImageSet, tmp_path) -> None:
    with pytest.raises(DataError, match="at least 10"):
        F.get_extractor(F.CLASSIFIER, digits.subset(np.arange(5)), cache_dir=str(tmp_path))
