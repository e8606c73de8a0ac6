"""Copy filter: index build/save/load, calibration, block decisions, guarded sampling, `guard` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.distances import normalized_l2
from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.copy_filter import CopyFilter, check_report
from diffaudit.guards.guarded_sampling import guarded_generate, retry_seed
from diffaudit.guards.index import TrainingIndex, build_index, calibrate_threshold, split_holdout
from diffaudit.guards.perturb import gaussian_noise, jpeg

runner = CliRunner()


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_source("digits")


@pytest.fixture(scope="module")
def digits_index(digits):
    """Index 1000 digits; calibrate on 300 others; keep the remaining 497 as fresh real images."""
    order = np.random.default_rng(1).permutation(len(digits))
    train, hold, fresh = digits.subset(order[:1000]), digits.subset(order[1000:1300]), digits.subset(order[1300:])
    return build_index(train, hold, target_fpr=0.05), fresh


def test_calibrate_threshold_hand_case():
    d = np.array([0.5, 0.1, 0.3, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0])
    # k = floor(0.2 * 11) = 2: the 2nd smallest; a fresh exchangeable value falls below it w.p. 2/11 <= 0.2.
    thr, rate = calibrate_threshold(d, 0.2)
    assert thr == pytest.approx(0.2) and rate == pytest.approx(0.1)
    assert calibrate_threshold(np.arange(99.0), 0.01) == (0.0, 0.0)  # 99 values: k = 1
    with pytest.raises(DataError, match="at least 99"):
        calibrate_threshold(d, 0.01)
    with pytest.raises(ConfigError):
        calibrate_threshold(d, 1.5)
    # Conformal property: over many exchangeable draws the fresh rate stays at or below the target.
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        x = rng.random(40)
        thr, _ = calibrate_threshold(x[:20], 0.05)
        rates.append((x[20:] < thr).mean())
    assert np.mean(rates) <= 0.05 + 0.01


def test_split_holdout_keeps_duplicates_together(digits):
    data = ImageSet.concat([digits.subset(np.arange(50)), digits.subset(np.arange(10))])  # 10 images twice
    keep, held = split_holdout(data, 0.3, seed=0)
    assert not set(data.ids[keep]) & set(data.ids[held])
    assert len(keep) + len(held) == len(data)


def test_planted_copies_blocked_fresh_real_pass_at_calibrated_rate(digits_index):
    index, fresh = digits_index
    cal = index.calibration["calibrated"]
    assert cal["achieved_false_block_rate"] <= 0.05
    f = CopyFilter(index)
    # Fresh real images (neither indexed nor used to calibrate) are blocked at about the target rate.
    fresh_rate = f.blocked_mask(fresh).mean()
    assert fresh_rate <= 0.1, fresh_rate
    # Copies of training images, exact, noisy and JPEG'd, are blocked.
    copies = index.images[:40]
    for x in (copies, gaussian_noise(copies, sigma=4.0, seed=3), jpeg(copies, quality=75, seed=3)):
        decisions = f.check(x)
        assert all(d.blocked for d in decisions)
        assert [d.nearest_index for d in decisions[:5]] == [0, 1, 2, 3, 4]  # evidence names the source image
    # The absolute rule's recorded false-block rate is the share of held-out images within 0.15.
    assert index.calibration["absolute"]["threshold"] == 0.15


def test_absolute_rule_and_evidence(digits_index):
    index, fresh = digits_index
    f = CopyFilter(index, rule="absolute")
    decisions = f.check(fresh.images[:20])
    for i, d in enumerate(decisions):
        nearest = index.images[index.ids.tolist().index(d.l2_nearest_id)]
        assert d.l2 == pytest.approx(float(normalized_l2(fresh.images[i : i + 1], nearest[None])[0]), abs=1e-6)
        assert d.blocked == (d.l2 <= 0.15) == d.absolute_blocks
    with pytest.raises(ConfigError, match="rule"):
        CopyFilter(index, rule="maybe")


def test_index_roundtrip_and_faiss_agree(tmp_path, digits_index):
    index, fresh = digits_index
    index.save(tmp_path / "idx")
    loaded = TrainingIndex.load(tmp_path / "idx")
    assert loaded.calibration == json.loads(json.dumps(index.calibration))
    assert (loaded.images == index.images).all() and (loaded.ids == index.ids).all()
    d1, i1 = index.search(fresh.images[:50])
    d2, i2 = loaded.search(fresh.images[:50], backend="faiss")
    assert np.allclose(d1, d2, atol=1e-6) and (i1 == i2).mean() > 0.95
    with pytest.raises(DataError, match="not a guard index"):
        TrainingIndex.load(tmp_path)
    with pytest.raises(DataError, match="do not match"):
        index.search(np.zeros((2, 1, 4, 4), np.uint8))


def test_tiled_index_and_report(digits):
    small = digits.subset(np.arange(400))
    index = build_index(small, metric="tiled", holdout_fraction=0.3, target_fpr=0.05, seed=2)
    assert index.metric == "tiled" and index.calibration["num_holdout"] == 120
    rep = check_report(CopyFilter(index, rule="either"), ImageSet(index.images[:5], index.labels[:5]))
    assert rep["summary"]["num_blocked"] == 5 and len(rep["decisions"]) == 5
    assert rep["summary"]["ms_per_image"] > 0


# ---- guarded sampling with a fake model -------------------------------------------------------------------


class FakeModel:
    """A fake Generator: training image ``copy_of[seed]`` for some seeds, and a flat white image otherwise."""

    def __init__(self, train: np.ndarray, copy_of: dict[int, int], always_copy_label: int | None = None) -> None:
        self.train, self.copy_of, self.always = train, copy_of, always_copy_label
        self.conditions = ("a", "b")

    def sample(self, labels, seeds, **options):  # noqa: ANN001, ANN003, ANN201
        from diffaudit.generators.base import synthetic_set

        out = []
        for lab, s in zip(np.asarray(labels).tolist(), seeds, strict=True):
            if s in self.copy_of or lab == self.always:
                out.append(self.train[self.copy_of.get(s, 0)])
            else:
                out.append(np.full((1, 8, 8), 255, np.uint8))
        return synthetic_set(np.stack(out), labels, self.conditions, "m", seeds, options.get("generation", -1))


@pytest.fixture(scope="module")
def dark_filter():
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 100, size=(300, 1, 8, 8), dtype=np.uint8), np.zeros(300, np.int64))
    return CopyFilter(build_index(data, holdout_fraction=0.4, target_fpr=0.01))


def test_guarded_sampling_resamples_blocked_seeds(tmp_path, dark_filter):
    train = dark_filter.index.images
    model = FakeModel(train, copy_of={1: 5, 3: 7})
    labels = np.zeros(6, np.int64)
    out, record = guarded_generate(model, labels, range(6), {"num_steps": 1}, dark_filter, show_progress=False)
    assert len(out) == 6 and record["num_images_resampled"] == 2 and record["num_gave_up"] == 0
    blocked = {(b["position"], b["seed"], b["attempt"]) for b in record["blocked"]}
    assert blocked == {(1, 1, 0), (3, 3, 0)}
    assert {b["nearest_id"] for b in record["blocked"]} == {dark_filter.index.ids[5], dark_filter.index.ids[7]}
    assert out.provenance["seed"].tolist() == [0, retry_seed(1, 1), 2, retry_seed(3, 1), 4, 5]
    assert not dark_filter.blocked_mask(out).any()
    assert record["num_requested"] == 6 and json.loads(json.dumps(record)) == record  # JSON-ready


def test_guarded_sampling_gives_up_after_bound(dark_filter):
    model = FakeModel(dark_filter.index.images, copy_of={}, always_copy_label=0)
    labels = np.array([0, 1, 1, 0], np.int64)
    cfg = {"num_steps": 1}
    out, record = guarded_generate(model, labels, [10, 11, 12, 13], cfg, dark_filter,
                                   max_retries=2, show_progress=False)  # fmt: skip
    assert len(out) == 2 and out.labels.tolist() == [1, 1]
    assert record["num_gave_up"] == 2 and record["num_blocked_attempts"] == 6
    gave = record["gave_up"][0]
    assert gave["position"] == 0 and gave["seeds_tried"] == [10, retry_seed(10, 1), retry_seed(10, 2)]
    kept, rec2 = guarded_generate(model, labels, [10, 11, 12, 13], cfg, dark_filter,
                                  max_retries=0, keep_exhausted=True, show_progress=False)  # fmt: skip
    assert len(kept) == 4 and rec2["num_blocked_attempts"] == 2 and rec2["gave_up"][1]["kept"]
    assert len({retry_seed(s, a) for s in range(50) for a in range(6)}) == 300  # retry seeds do not collide


# ---- CLI --------------------------------------------------------------------------------------------------


def test_guard_cli_build_and_check(tmp_path, digits):
    idx_dir = tmp_path / "idx"
    r = runner.invoke(
        app,
        ["guard", "build", "--data", "digits", "--subset", "400", "--out", str(idx_dir),
         "--holdout-fraction", "0.3", "--calibrate-fpr", "0.05"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads((idx_dir / "index.json").read_text())
    assert meta["calibration"]["calibrated"]["target_fpr"] == 0.05 and meta["num_images"] == 280
    assert json.loads((idx_dir / "manifest.json").read_text())["status"] == "finished"
    index = TrainingIndex.load(idx_dir)
    novel = np.full((1, 1, 8, 8), 255, np.uint8)
    samples = ImageSet(np.concatenate([index.images[:3], novel]), np.full(4, -1))
    samples.save(tmp_path / "s.npz")
    r = runner.invoke(
        app, ["guard", "check", "--index", str(idx_dir), "--samples", str(tmp_path / "s.npz"), "--out",
              str(tmp_path / "d.json")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert [d["blocked"] for d in report["decisions"]] == [True, True, True, False]
    assert report["decisions"][0]["nearest_id"] == index.ids[0]
    assert {"distance", "threshold", "rule", "l2", "delta"} <= set(report["decisions"][0])
