"""Membership inference: ROC helpers vs scikit-learn, LiRA on synthetic losses, reproducible losses, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from typer.testing import CliRunner

from diffaudit.attacks import mia, roc
from diffaudit.attacks.mia_queries import QUERY_ATTACKS
from diffaudit.attacks.shadow import random_halves
from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.detectors import wen
from diffaudit.errors import ConfigError, DataError
from diffaudit.models.config import ModelConfig
from diffaudit.models.diffusion import DiffusionModel

TINY = ["--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=4", "--set", "train.batch_size=8"]


# ---- ROC helpers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + y, 1)  # rounding makes many ties
    fpr, tpr, thr = roc.roc_curve(scores, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert roc.roc_auc(fpr, tpr) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_tpr_at_fpr_rule_and_resolution():
    # 4 non-members, 4 members; the best member ranks above every non-member, the next two tie with one.
    scores = np.array([9.0, 5.0, 5.0, -3.0, 5.0, 0.0, -1.0, -2.0])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    fpr, tpr, _ = roc.roc_curve(scores, y)
    assert roc.tpr_at_fpr(fpr, tpr, 0.0) == 0.25  # only the untied top member counts at FPR 0
    assert roc.tpr_at_fpr(fpr, tpr, 0.24) == 0.25  # no interpolation toward the (0.25, 0.75) point
    assert roc.tpr_at_fpr(fpr, tpr, 0.25) == 0.75
    summary = roc.summarize(scores, y)
    assert summary["fpr_resolution"] == 0.25
    assert set(summary["below_resolution"]) == {roc.TPR_AT_1PCT, roc.TPR_AT_01PCT}
    big = roc.summarize(np.r_[scores, np.zeros(2000)], np.r_[y, np.zeros(2000, dtype=bool)])
    assert big["below_resolution"] == []


def test_roc_rejects_bad_input():
    with pytest.raises(DataError, match="both members and non-members"):
        roc.summarize(np.arange(3.0), np.ones(3, dtype=bool))
    with pytest.raises(DataError, match="NaN"):
        roc.summarize(np.array([0.0, np.nan]), np.array([True, False]))


# ---- LiRA on synthetic losses -------------------------------------------------------------------------------
def _synthetic(num_samples=400, num_shadows=16, gap=0.5, seed=0):
    """Log-losses with a large per-sample difficulty and a member gap: where LiRA beats a global threshold."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 1.0, num_samples)
    membership = random_halves(num_samples, num_shadows + 1, seed)
    stats = difficulty[None, :] - gap * membership + rng.normal(0, 0.1, membership.shape)  # (models, samples)
    return stats[0], membership[0], stats[1:].T, membership[1:]


@pytest.mark.parametrize("attack", [mia.LIRA_ONLINE, mia.LIRA_OFFLINE])
@pytest.mark.parametrize("fix_variance", [True, False])
def test_lira_separates_members_and_not_random_labels(attack, fix_variance):
    target, members, shadow_stats, shadow_membership = _synthetic()
    scores, _ = mia.attack_scores(attack, target, shadow_stats, shadow_membership, fix_variance)
    auc = roc.summarize(scores, members)[roc.AUC]
    assert auc > 0.9
    loss_auc = roc.summarize(mia.loss_threshold_scores(target), members)[roc.AUC]
    assert auc > loss_auc + 0.1  # per-sample calibration is the point of LiRA
    random_labels = np.random.default_rng(5).random(len(members)) < 0.5
    assert abs(roc.summarize(scores, random_labels)[roc.AUC] - 0.5) < 0.1


def test_lira_fallback_when_a_side_is_missing():
    target, members, shadow_stats, shadow_membership = _synthetic(num_samples=50, num_shadows=2)
    scores, info = mia.lira_online(target, shadow_stats, shadow_membership)
    assert np.isfinite(scores).all()
    assert info["samples_without_in_shadow"] == int((~shadow_membership).all(0).sum()) > 0
    with pytest.raises(ConfigError, match="at least 2"):
        mia.lira_online(target, shadow_stats[:, :1], shadow_membership[:1])


# ---- losses ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gen(tmp_path_factory):
    from diffaudit.generators import load_generator
    from diffaudit.models.checkpoint import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        resolution=8, channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4,
        attention_levels=(False, False),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("cc") / "model"
    save_model(DiffusionModel(cfg), path, extra={"class_names": ["a", "b", "c"]})
    return load_generator(path, device="cpu")


def _images(n=6):
    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, n), ("a", "b", "c"))


def test_sample_losses_equal_a_direct_computation(tiny_gen):
    # The loss by hand: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with eps from noise_seed(id, draw, seed), MSE of the
    # U-Net's prediction; the flipped variant mirrors image and noise.
    data = _images(3)
    losses = mia.sample_losses(tiny_gen, data, (10, 300), noise_draws=2, flip=True, seed=3)
    assert losses.shape == (3, 2, 4) and losses.dtype == np.float32
    ab = tiny_gen.model.train_scheduler.alphas_cumprod
    x0 = torch.from_numpy(data.images).float() / 127.5 - 1
    for d in range(2):
        eps = torch.stack(
            [torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(mia.noise_seed(i, d, 3))) for i in data.ids]
        )
        for f, (x, e) in enumerate([(x0, eps), (x0.flip(-1), eps.flip(-1))]):
            for j, t in enumerate((10, 300)):
                x_t = ab[t].sqrt() * x + (1 - ab[t]).sqrt() * e
                with torch.no_grad():
                    pred = tiny_gen.model.unet(x_t, torch.full((3,), t), class_labels=torch.from_numpy(data.labels))
                want = (pred.sample - e).pow(2).flatten(1).mean(1).numpy()
                np.testing.assert_allclose(losses[:, j, 2 * d + f], want, rtol=1e-5, atol=1e-6)


def test_sample_losses_reproducible_and_batch_and_order_independent(tiny_gen):
    data = _images()
    a = mia.sample_losses(tiny_gen, data, (10, 100), noise_draws=2, flip=True, seed=3, batch_size=512)
    b = mia.sample_losses(tiny_gen, data, (10, 100), noise_draws=2, flip=True, seed=3, batch_size=2)
    assert a.shape == (6, 2, 4) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    perm = np.array([5, 3, 1, 0, 2, 4])
    c = mia.sample_losses(tiny_gen, data.subset(perm), (10, 100), noise_draws=2, flip=True, seed=3)
    np.testing.assert_allclose(c, a[perm], rtol=1e-5, atol=1e-6)
    d = mia.sample_losses(tiny_gen, data, (10, 100), noise_draws=2, flip=True, seed=4)
    assert np.abs(a - d).min() > 0  # every entry sees other noise
    with pytest.raises(ConfigError, match="outside"):
        mia.sample_losses(tiny_gen, data, (1000,))


def test_wen_statistic_is_the_guidance_gap(tiny_gen):
    g = wen.noise_gaps(tiny_gen, [0, 2], [0, 1, 2], num_steps=10, measure_steps=3)
    assert g.shape == (2, 3)
    direct = tiny_gen.guidance_gap(np.array([0, 0, 0, 2, 2, 2]), [0, 1, 2, 0, 1, 2], num_steps=10, measure_steps=3)
    np.testing.assert_array_equal(g.ravel(), direct)
    report = wen.wen_report(tiny_gen, num_seeds=3, num_steps=10, measure_steps=3, show_progress=False)
    rows = report["per_label"]
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["noise_gap"] == pytest.approx(direct[3:].mean(), rel=1e-12)
    assert rows[2]["noise_gap_std"] == pytest.approx(np.std(direct[3:], ddof=1), rel=1e-12)
    with pytest.raises(ConfigError, match="outside"):
        wen.noise_gaps(tiny_gen, [3], [0], num_steps=10, measure_steps=3)


# ---- CLI ------------------------------------------------------------------------------------------------------
def test_cli_end_to_end_resume_and_user_target(tmp_path):
    runner = CliRunner()
    out = tmp_path / "mia"
    extract = tmp_path / "extract"
    extract.mkdir()
    flags = [{"label": i, "flagged": i in (1, 7), "clique_size": 12 if i in (1, 7) else i % 3} for i in range(10)]
    (extract / "results.json").write_text(json.dumps({"labels": flags}))
    args = ["mia", "--out", str(out), "--data", "digits", "--pool-size", "40", "--num-shadows", "2", "--steps", "3"]
    args += ["--timesteps", "50,100", "--noise-draws", "2", "--wen-seeds", "2", "--extract-run", str(extract), *TINY]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    for name in ("results.json", "scores.json", "membership.npz", "roc.png", "config.json", "wen.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["attacks"]) == {mia.LOSS, mia.LIRA_ONLINE, mia.LIRA_OFFLINE, *QUERY_ATTACKS}
    assert (
        results["costs"]["pia"]["queries_per_image"] == 2 and results["costs"]["secmi-stat"]["queries_per_image"] == 12
    )
    assert results["costs"][mia.LIRA_ONLINE]["queries_per_image"] == 3 * 2 * 2  # (K + 1) models x T x draws
    assert results["pool"]["selection"] + results["pool"]["evaluation"] == 40
    assert results["shadows"]["trained_now"] == {"target": True, "shadow-00": True, "shadow-01": True}
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == 40 and len({s["id"] for s in scores}) == 40
    evaluation = [s for s in scores if s["split"] == "evaluation"]
    for name, r in results["attacks"].items():
        assert r["t"] in (50, 100) or name in QUERY_ATTACKS
        assert {roc.TPR_AT_1PCT, roc.TPR_AT_01PCT} <= set(r["below_resolution"])  # 14 non-members only
        # The reported AUC is the one of the written per-sample scores on the evaluation split.
        want = roc.summarize(
            np.array([s[f"score_{name}"] for s in evaluation]), np.array([s["member"] for s in evaluation])
        )
        assert r[roc.AUC] == pytest.approx(want[roc.AUC], abs=1e-12)
    # The threshold score is minus the log of the target's mean loss at the chosen t.
    t_loss = results["attacks"][mia.LOSS]["t"]
    np.testing.assert_allclose(
        [s["score_loss"] for s in scores], [-np.log(s[f"loss_t{t_loss}"]) for s in scores], atol=1e-6
    )
    assert {"score_loss", "score_lira-online", "loss_t50", "member", "split"} <= set(scores[0])
    config = json.loads((out / "config.json").read_text())
    assert config["choices"]["flip"]["value"] is False and config["mia"]["num_shadows"] == 2
    report = json.loads((out / "wen.json").read_text())
    assert len(report["per_label"]) == 10 and report["extraction"]["num_flagged"] == 2
    assert report["extraction"]["auc_flag_vs_noise_gap"] is not None

    # Resume: nothing is retrained, the weights are untouched, the results are the same.
    weights = out / "models" / "shadow-01" / "model" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    again = json.loads((out / "results.json").read_text())
    assert not any(again["shadows"]["trained_now"].values())
    assert weights.stat().st_mtime_ns == mtime
    assert again["attacks"] == results["attacks"]

    # A user's own model with known members: loss threshold only.
    members = tmp_path / "members.json"
    members.write_text(json.dumps([s["id"] for s in scores if s["member"]]))
    user = tmp_path / "user"
    res = runner.invoke(
        app,
        ["mia", "--out", str(user), "--data", "digits", "--pool-size", "40", "--target", str(out / "models" / "target"),
         "--members", str(members), "--timesteps", "50,100", "--noise-draws", "2", "--no-wen", *TINY],
    )  # fmt: skip
    assert res.exit_code == 0, res.output + repr(res.exception)
    user_results = json.loads((user / "results.json").read_text())
    assert list(user_results["attacks"]) == [mia.LOSS, *QUERY_ATTACKS]
    for name in (mia.LOSS, *QUERY_ATTACKS):  # same target, noise, split (and seeded classifiers)
        assert user_results["attacks"][name] == results["attacks"][name], name


def test_cli_rejects_target_without_members(tmp_path):
    res = CliRunner().invoke(app, ["mia", "--out", str(tmp_path / "x"), "--target", str(tmp_path)])
    assert isinstance(res.exception, ConfigError) and "--members" in str(res.exception)
    res = CliRunner().invoke(app, ["mia", "--out", str(tmp_path / "y"), "--nonmembers", "digits"])
    assert isinstance(res.exception, ConfigError) and "--nonmembers goes with --members" in str(res.exception)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
