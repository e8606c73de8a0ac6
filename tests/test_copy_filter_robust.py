"""The robust copy-filter rule: copies after crop, resize, flip, shift, JPEG and noise are blocked at a calibrated
false-block rate; the pixel path alone misses the geometric ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError
from diffaudit.guards.copy_filter import CopyFilter
from diffaudit.guards.index import TrainingIndex, build_index
from diffaudit.guards.invariant import InvariantConfig, variant_names, variants
from diffaudit.guards.perturb import crop, gaussian_noise, jpeg, resize

runner = CliRunner()


@pytest.fixture(scope="module")
def robust_index():
    """300 digits indexed, 200 held out to calibrate at 5%, 400 fresh real digits never seen."""
    digits = load_source("digits")
    order = np.random.default_rng(3).permutation(len(digits))
    train, hold = digits.subset(order[:300]), digits.subset(order[300:500])
    fresh = digits.subset(order[500:900])
    return build_index(train, hold, target_fpr=0.05, invariant=InvariantConfig()), fresh


TRANSFORMS = {
    "crop0.1": lambda x: crop(x, 0.1, seed=5),
    "crop0.2": lambda x: crop(x, 0.2, seed=5),
    "resize0.5": lambda x: resize(x, 0.5),
    "flip": lambda x: np.ascontiguousarray(x[..., ::-1]),
    "flip+crop+resize": lambda x: resize(crop(np.ascontiguousarray(x[..., ::-1]), 0.1, seed=6), 0.75),
    "shift1": lambda x: np.roll(x, 1, axis=3),
    "jpeg75": lambda x: jpeg(x, 75),
    "noise4": lambda x: gaussian_noise(x, 4.0, seed=2),
}


def test_variants_hand_case():
    img = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    cfg = InvariantConfig(crop_fractions=(0.0,), rescales=(), shift=1, flips=True, blur=0)
    names = variant_names((1, 4, 4), cfg)
    v = variants(img, cfg)[0]
    assert names[0] == "identity" and (v[0] == img[0]).all()
    assert (v[names.index("flip+identity")] == img[0, :, :, ::-1]).all()
    # shift by +1 column: the content moves right, the first column repeats (edge padding)
    shifted = v[names.index("shift+0,+1")][0]
    assert (shifted[:, 1:] == img[0, 0, :, :-1]).all() and (shifted[:, 0] == img[0, 0, :, 0]).all()
    assert len(names) == 2 * (1 + 8)  # identity + 8 shifts, and their mirror images
    with pytest.raises(ConfigError, match="crop fractions"):
        InvariantConfig(crop_fractions=(0.7,))


def test_transformed_copies_blocked_novel_pass(robust_index):
    index, fresh = robust_index
    robust, pixel = CopyFilter(index), CopyFilter(index, rule="calibrated")
    assert robust.rule == "robust"  # auto picks the robust rule when the index has it
    assert index.calibration["robust"]["achieved_false_block_rate"] <= 0.05
    # Fresh real digits (never indexed, never used to calibrate) pass at about the target rate.
    assert robust.blocked_mask(fresh).mean() <= 0.08
    copies = index.images[:60]
    recall = {name: robust.blocked_mask(fn(copies)).mean() for name, fn in TRANSFORMS.items()}
    pixel_recall = {name: pixel.blocked_mask(fn(copies)).mean() for name, fn in TRANSFORMS.items()}
    assert min(recall.values()) >= 0.9, recall
    # The pixel path alone misses crops, flips and shifts of 8x8 digits (the failure this rule fixes) ...
    assert max(pixel_recall[k] for k in ("crop0.1", "flip", "shift1", "resize0.5")) <= 0.15, pixel_recall
    # ... and keeps what it caught (noise, JPEG): the combined rule never loses those.
    assert recall["noise4"] == recall["jpeg75"] == 1.0
    d = robust.check(TRANSFORMS["flip"](copies[:3]))
    assert all(x.blocked and x.robust_variant.startswith("flip+") for x in d)
    assert [x.robust_nearest_id for x in d] == list(index.ids[:3])


def test_robust_index_round_trip_and_rule_errors(tmp_path, robust_index):
    index, fresh = robust_index
    index.save(tmp_path / "idx")
    loaded = TrainingIndex.load(tmp_path / "idx")
    x = np.concatenate([crop(index.images[:10], 0.2, seed=1), fresh.images[:10]])
    assert CopyFilter(loaded).blocked_mask(x).tolist() == CopyFilter(index).blocked_mask(x).tolist()
    plain = build_index(ImageSet(index.images[:150], index.labels[:150]), holdout_fraction=0.3, target_fpr=0.05)
    assert CopyFilter(plain).rule == "calibrated"
    with pytest.raises(ConfigError, match="invariant"):
        CopyFilter(plain, rule="robust")


def test_guard_cli_robust_by_default(tmp_path):
    idx_dir = tmp_path / "idx"
    r = runner.invoke(
        app,
        ["guard", "build", "--data", "digits", "--subset", "300", "--out", str(idx_dir), "--holdout-fraction",
         "0.35", "--calibrate-fpr", "0.05"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    index = TrainingIndex.load(idx_dir)
    assert index.calibration["robust"]["invariant"]["crop_fractions"] == [0.0, 0.1, 0.2]
    flipped = ImageSet(np.ascontiguousarray(index.images[:4, ..., ::-1]), np.full(4, -1))
    flipped.save(tmp_path / "s.npz")
    out = tmp_path / "d.json"
    r = runner.invoke(app, ["guard", "check", "--index", str(idx_dir), "--samples", str(tmp_path / "s.npz"),
                            "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["summary"]["num_blocked"] == 4 and report["summary"]["num_blocked_calibrated"] == 0
    r = runner.invoke(app, ["guard", "build", "--data", "digits", "--out", str(tmp_path / "x"),
                            "--crop-fractions", "a,b"])  # fmt: skip
    assert isinstance(r.exception, ConfigError) and not (tmp_path / "x").exists()
