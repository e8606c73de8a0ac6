"""evaluate(): result layout, ordering of real > degraded > noise, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.metrics import distribution as D
from diffaudit.metrics import evaluate as ev
from diffaudit.metrics import features as F
from diffaudit.metrics import memorization as M

# 10 KID subsets instead of 100: the ordering below is far larger than the KID noise, and tests stay fast.
FAST = {"kid_subsets": 10, "kid_subset_size": 200}
NAMES = tuple(str(i) for i in range(10))


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    # The CI machine is shared: BLAS threads spinning against each other cost far more than they gain.
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def split() -> tuple[ImageSet, ImageSet]:
    """Real digits split into a reference part (1,200) and held-out real images (597)."""
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    perm = np.random.default_rng(0).permutation(len(images))
    ref = ImageSet(images[perm[:1200]], d.target[perm[:1200]], NAMES)
    held = ImageSet(images[perm[1200:]], d.target[perm[1200:]], NAMES)
    return ref, held


def _unlabelled(images: np.ndarray) -> ImageSet:
    return ImageSet(images, np.full(len(images), -1))


@pytest.fixture(scope="module")
def candidates(split) -> dict[str, ImageSet]:
    _, held = split
    rng = np.random.default_rng(1)
    x = held.to_float()
    blurred = gaussian_filter(x, sigma=(0, 0, 0.6, 0.6)) + rng.normal(0, 0.08, x.shape)
    return {
        "real": _unlabelled(held.images),
        "degraded": _unlabelled(np.round(np.clip(blurred, 0, 1) * 255).astype(np.uint8)),
        "noise": _unlabelled(rng.integers(0, 256, held.images.shape, dtype=np.uint8)),
    }


@pytest.mark.parametrize("features", [F.CLASSIFIER, F.RANDOM_CNN, F.PIXELS])
def test_real_beats_degraded_beats_noise(split, candidates, features: str) -> None:
    ref, _ = split
    m = {
        name: ev.evaluate(s, ref, features=features, metric_options=FAST, memorization=False)[ev.KEY_METRICS]
        for name, s in candidates.items()
    }
    assert m["real"][D.FID] < m["degraded"][D.FID] < m["noise"][D.FID]
    assert m["real"][D.PRECISION] > m["degraded"][D.PRECISION] > m["noise"][D.PRECISION]
    assert m["real"][D.RECALL] > m["degraded"][D.RECALL]
    assert m["real"][D.RECALL] > m["noise"][D.RECALL]
    assert m["real"][D.COVERAGE] > m["degraded"][D.COVERAGE] > m["noise"][D.COVERAGE]
    assert m["real"][D.PRECISION] > 0.8 and m["real"][D.RECALL] > 0.8  # held-out real data looks real


def test_result_layout_and_memorization(split) -> None:
    ref, held = split
    samples = held.subset(np.arange(100))
    # Plant 5 exact training copies: memorization must find them.
    samples = ImageSet.concat([samples, ref.subset(np.arange(5))])
    res = ev.evaluate(samples, ref, features=F.RANDOM_CNN, metric_options=FAST, num_bootstrap=2, seed=3)
    assert tuple(res) == ev.RESULT_KEYS
    json.dumps(res)  # JSON-ready as returned
    assert res[ev.KEY_FEATURES][F.KEY_NAME] == F.RANDOM_CNN
    assert res[ev.KEY_SIZES] == {"samples": 105, "reference": 1200, "train": 1200}
    assert res[ev.KEY_TRAIN_IS_REFERENCE] is True and res[ev.KEY_SEED] == 3
    metrics = res[ev.KEY_METRICS]
    assert set(D.METRIC_KEYS) <= set(metrics) and D.CI in metrics and D.PER_CLASS in metrics
    mem = res[ev.KEY_MEMORIZATION]
    assert M.NN_L2 not in mem  # summary only by default
    assert mem[M.NUM_GENERATED] == 105 and mem[M.NUM_TRAIN_WITHIN_DELTA] >= 5
    # Against a training set without those copies, the planted ones are no longer within delta of anything
    # identical; the per-sample arrays come back only on request.
    full = ev.evaluate(
        samples, ref, features=F.PIXELS, train=ref.subset(np.arange(5, 1200)), metric_options=FAST, per_sample=True
    )
    assert full[ev.KEY_TRAIN_IS_REFERENCE] is False and full[ev.KEY_SIZES]["train"] == 1195
    assert len(full[ev.KEY_MEMORIZATION][M.NN_L2]) == 105
    assert min(full[ev.KEY_MEMORIZATION][M.NN_L2][-5:]) > 0


def test_evaluate_rejects_bad_input(split) -> None:
    ref, held = split
    with pytest.raises(ConfigError, match="random-cnn"):
        ev.evaluate(held, ref, features="lenet")
    with pytest.raises(DataError, match=r"\(3, 8, 8\)"):
        ev.evaluate(_unlabelled(np.zeros((20, 3, 8, 8), np.uint8)), ref)
    with pytest.raises(ConfigError, match="kid_subset"):
        ev.evaluate(held, ref, features=F.PIXELS, metric_options={"kid_subset": 3})
    with pytest.raises(ConfigError, match="num_bootstrap"):
        ev.evaluate(held, ref, features=F.PIXELS, num_bootstrap=-1)
    with pytest.raises(DataError, match="empty"):
        ev.evaluate(held.subset(np.arange(0)), ref)


def test_cli_end_to_end(split, tmp_path) -> None:
    from diffaudit.cli import app

    ref, held = split
    samples, train = tmp_path / "samples.npz", tmp_path / "train.npz"
    held.subset(np.arange(60)).save(samples)
    ref.subset(np.arange(300)).save(train)
    out = tmp_path / "metrics.json"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--samples",
            str(samples),
            "--reference",
            "digits",
            "--features",
            "random-cnn",
            "--out",
            str(out),
            "--train",
            f"npz:{train}",
            "--bootstrap",
            "2",
            "--seed",
            "7",
            "--metric-option",
            "kid_subsets=5",
            "--feature-option",
            "feature_dim=32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fid" in result.output and "memorization" in result.output
    data = json.loads(out.read_text())
    assert tuple(data)[: len(ev.RESULT_KEYS)] == ev.RESULT_KEYS
    assert data["inputs"]["reference"] == "digits"
    assert data[ev.KEY_FEATURES][F.KEY_DIM] == 32 and data[ev.KEY_SEED] == 7
    assert data[ev.KEY_SIZES] == {"samples": 60, "reference": 1797, "train": 300}
    assert data[ev.KEY_METRICS][D.NUM_BOOTSTRAP] == 2
    assert data[ev.KEY_MEMORIZATION][M.NUM_TRAIN] == 300
    # A typo in the extractor name is a user error naming the known ones.
    bad = runner.invoke(app, ["evaluate", "--samples", str(samples), "--reference", "digits", "--features", "lenet"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)
    assert "classifier" in str(bad.exception)
