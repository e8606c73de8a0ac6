"""Distribution metrics: closed forms, the prdc reference implementation, and the science (mode collapse)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import prdc
import pytest

from diffaudit.errors import ConfigError, DataError
from diffaudit.metrics import distribution as M


def _prdc_reference(gen: np.ndarray, ref: np.ndarray, k: int) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        return prdc.compute_prdc(real_features=ref, fake_features=gen, nearest_k=k)


def test_frechet_distance_closed_form() -> None:
    rng = np.random.default_rng(0)
    # Commuting (diagonal) covariances: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # Non-commuting: compare with the definition via scipy's general sqrtm.
    q = rng.normal(size=(5, 5))
    s1, s2 = q @ q.T + np.eye(5), np.diag(b)
    import scipy.linalg

    tr = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # Singular covariance stays real and finite.
    assert np.isfinite(M.frechet_distance(mu1, np.zeros((5, 5)), mu2, s2))


def test_fid_of_sampled_gaussians_approaches_closed_form() -> None:
    rng = np.random.default_rng(1)
    n, d = 20000, 3
    g = rng.normal(size=(n, d)) * [1.0, 2.0, 0.5] + [1.0, 0.0, 0.0]
    r = rng.normal(size=(n, d))
    want = 1.0 + (1 - 1) ** 2 + (2 - 1) ** 2 + (0.5 - 1) ** 2
    assert M.fid(g, r) == pytest.approx(want, abs=0.05)


def test_kid_same_vs_shifted() -> None:
    rng = np.random.default_rng(2)
    r = rng.normal(size=(400, 8))
    same = rng.normal(size=(400, 8))
    shifted = rng.normal(size=(400, 8)) + 1.0
    m_same, s_same = M.kid(same, r, num_subsets=20, subset_size=200, seed=0)
    m_shift, _ = M.kid(shifted, r, num_subsets=20, subset_size=200, seed=0)
    assert abs(m_same) < 3 * s_same + 1e-3
    assert m_shift > 0.1 and m_shift > 20 * abs(m_same)
    assert M.kid(same, r, 5, 100, seed=3) == M.kid(same, r, 5, 100, seed=3)  # seeded, no global RNG


def test_kid_single_subset_equals_hand_computed_unbiased_mmd() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5
    k = lambda a, b: (a @ b / 4 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    mean, std = M.kid(x, y, num_subsets=1, subset_size=6)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_prdc_equals_reference_package(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(120, 10)).astype(np.float32)
    gen = (rng.normal(size=(90, 10)) * 1.3 + 0.3).astype(np.float32)
    want3 = _prdc_reference(gen, ref, 3)
    want5 = _prdc_reference(gen, ref, 5)
    for block in (7, 64, 1024):
        p, r = M.precision_recall(gen, ref, k=3, block=block)
        d, c = M.density_coverage(gen, ref, k=5, block=block)
        assert p == pytest.approx(want3["precision"], abs=1e-12)
        assert r == pytest.approx(want3["recall"], abs=1e-12)
        assert d == pytest.approx(want5["density"], abs=1e-12)
        assert c == pytest.approx(want5["coverage"], abs=1e-12)


def test_mode_collapse_high_precision_low_recall_and_coverage() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(500, 8))
    collapsed = rng.normal(size=(500, 8)) * 0.2  # generated spread much smaller than real
    p, r = M.precision_recall(collapsed, ref)
    d, c = M.density_coverage(collapsed, ref)
    assert p > 0.9 and r < 0.2, (p, r)
    assert c < 0.3, c
    # And the healthy case is balanced.
    p2, r2 = M.precision_recall(rng.normal(size=(500, 8)), ref)
    assert p2 > 0.6 and r2 > 0.6
    # Vendi drops with collapse onto a few modes.
    modes = np.repeat(rng.normal(size=(3, 8)), 100, axis=0) + rng.normal(size=(300, 8)) * 0.01
    assert M.vendi_score(modes) < 3.2 < M.vendi_score(rng.normal(size=(300, 8)))


def test_vendi_known_values() -> None:
    assert M.vendi_score(np.ones((10, 4))) == pytest.approx(1.0)
    assert M.vendi_score(np.eye(6)) == pytest.approx(6.0)
    assert M.vendi_score(np.eye(3)[[0, 0, 1, 1]]) == pytest.approx(2.0)  # two distinct items, twice each
    with pytest.raises(DataError, match="all zero"):
        M.vendi_score(np.zeros((3, 2)))


def test_compute_metrics_keys_classes_and_bootstrap() -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(90, 6))
    gen = rng.normal(size=(80, 6)) + 0.2
    rl = np.repeat([0, 1, 2], 30)
    gl = np.array([0] * 40 + [1] * 37 + [2] * 3)
    res = M.compute_metrics(
        gen,
        ref,
        gl,
        rl,
        class_names=["zero", "one", "two"],
        num_bootstrap=4,
        seed=1,
        kid_subsets=5,
        kid_subset_size=20,
    )
    json.dumps(res)  # serialisable as is
    for key in M.METRIC_KEYS:
        assert isinstance(res[key], float)
        lo, hi = res[M.CI][key]
        assert lo <= hi
    assert set(res[M.PER_CLASS]) == {"zero", "one"}
    assert "two" in res[M.SKIPPED_CLASSES] and "3 generated" in res[M.SKIPPED_CLASSES]["two"]
    mean_fid = np.mean([res[M.PER_CLASS][c][M.FID] for c in ("zero", "one")])
    assert res[M.CLASS_MEAN][M.FID] == pytest.approx(mean_fid)
    assert res[M.PER_CLASS]["zero"][M.FID] == pytest.approx(M.fid(gen[:40], ref[:30]))
    assert res[M.NUM_GENERATED] == 80 and res[M.NUM_BOOTSTRAP] == 4
    again = M.compute_metrics(gen, ref, num_bootstrap=4, seed=1, kid_subsets=5, kid_subset_size=20, block=7)
    assert again[M.CI] == res[M.CI] and again[M.PRECISION] == res[M.PRECISION]  # block size independent


def test_bad_inputs() -> None:
    x = np.zeros((10, 3))
    with pytest.raises(DataError, match="dimension"):
        M.fid(x, np.zeros((10, 4)))
    with pytest.raises(DataError, match="2-D"):
        M.fid(np.zeros(5), x)
    with pytest.raises(DataError, match="NaN"):
        M.fid(np.full((3, 3), np.nan), x)
    with pytest.raises(DataError, match="at least 4"):
        M.precision_recall(np.ones((3, 3)), x, k=3)
    with pytest.raises(ConfigError, match="neither"):
        M.compute_metrics(np.random.default_rng(0).normal(size=(10, 3)), np.eye(10, 3), gen_labels=[0] * 10)
