"""Tagless synthetic-image detectors: calibration on real images, no test leaks, generalisation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffaudit.cli import app, main
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.detectors.calibration import calibrate_scores, check_disjoint, roc_auc
from diffaudit.detectors.spectral import spectral_features
from diffaudit.detectors.synthetic import evaluate_detector, fit_detector, load_detector, save_detector
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.guards.perturb import Perturbation

runner = CliRunner()


@pytest.fixture(scope="module")
def world():
    """Digits split into: the generators' training set, detector training, calibration and test real images;
    generated images from a Gaussian model (two disjoint seed ranges) and from a GMM (another architecture)."""
    torch.set_num_threads(1)
    digits = load_source("digits")
    order = np.random.default_rng(0).permutation(len(digits))
    fit_set = digits.subset(order[:600])
    real_train, real_pool = digits.subset(order[600:1000]), digits.subset(order[1000:])
    gauss = AnalyticTrainer("gaussian", components=10).fit(fit_set, None, 0, 0)
    gmm = AnalyticTrainer("gmm", components=10).fit(fit_set, None, 0, 0)

    def sample(gen, n, first):
        return gen.sample(np.arange(n) % 10, list(range(first, first + n)), num_steps=10)

    return {
        "real_train": real_train,
        "real_cal": real_pool.subset(np.arange(200)),
        "real_test": real_pool.subset(np.arange(200, len(real_pool))),
        "real_pool": real_pool,
        "gen_train": sample(gauss, 300, 0),
        "gauss_test": sample(gauss, 150, 10_000),
        "gmm_test": sample(gmm, 150, 10_000),
        "gauss": gauss,
    }


def test_calibrate_scores_hand_case_and_errors():
    s = np.arange(10.0)  # real scores 0..9
    thr, rate = calibrate_scores(s, 0.2)  # k = floor(0.2 * 11) = 2: the 2nd largest, flagging strictly above it
    assert thr == 8.0 and rate == pytest.approx(0.1)
    with pytest.raises(DataError, match="at least 99"):
        calibrate_scores(s, 0.01)
    with pytest.raises(ConfigError):
        calibrate_scores(s, 0.0)
    assert roc_auc([0, 1], [2, 3]) == 1.0 and roc_auc([0, 1], [1, 0]) == 0.5 and roc_auc([5], [1]) == 0.0
    with pytest.raises(DataError, match="used for training"):
        check_disjoint(["a", "b"], {"training": ["b"]})


def test_spectral_features_fixed_size():
    rng = np.random.default_rng(0)
    for shape in ((3, 1, 8, 8), (2, 3, 32, 24)):
        f = spectral_features(rng.integers(0, 256, shape, dtype=np.uint8))
        assert f.shape == (shape[0], 12) and np.isfinite(f).all()
    flat = spectral_features(np.full((1, 1, 8, 8), 100, np.uint8))
    noisy = spectral_features(rng.integers(0, 256, (1, 1, 8, 8), dtype=np.uint8))
    assert noisy[0, 7] > flat[0, 7] + 5  # white noise has far more high-frequency power than a flat image


def test_false_removal_rate_stays_in_band_over_repeats(world):
    """Calibrated at 5% on 100 real images, fresh real images are flagged at about 5% over 30 random splits."""
    det = fit_detector("spectral", world["real_cal"], world["real_train"], world["gen_train"], 0.05)
    pool = world["real_pool"]
    scores = det.scores(pool)
    rates = []
    for rep in range(30):
        perm = np.random.default_rng(rep).permutation(len(pool))
        thr, _ = calibrate_scores(scores[perm[:100]], 0.05)
        rates.append((scores[perm[100:]] > thr).mean())
    # Split-conformal: expected rate floor(0.05 * 101) / 101 = 4.95%; a wrong quantile (e.g. the 5th
    # percentile instead of the 95th) would give ~95%, an off-by-several k about 2% or 8%.
    assert 0.035 <= np.mean(rates) <= 0.065, np.mean(rates)
    assert max(rates) <= 0.15


def test_detector_never_sees_its_test_images(world):
    with pytest.raises(DataError, match="calibration images were used for training"):
        fit_detector("spectral", world["real_train"].subset(np.arange(120)), world["real_train"], world["gen_train"])
    det = fit_detector("spectral", world["real_cal"], world["real_train"], world["gen_train"], 0.05)
    with pytest.raises(DataError, match=r"test images \(gen\) were used for training"):
        evaluate_detector(det, world["real_test"], {"gen": world["gen_train"].subset(np.arange(5))})
    with pytest.raises(DataError, match=r"test images \(real\) were used for calibration"):
        evaluate_detector(det, world["real_cal"], {"gen": world["gauss_test"]})


def test_spectral_generalises_and_reports_perturbations(world):
    det = fit_detector("spectral", world["real_cal"], world["real_train"], world["gen_train"], 0.05)
    res = evaluate_detector(
        det,
        world["real_test"],
        {"gauss_other_seeds": world["gauss_test"], "gmm": world["gmm_test"]},
        [Perturbation("jpeg", {"quality": 75})],
    )
    clean = res["conditions"]["clean"]
    assert clean["fpr"] <= 0.1
    assert clean["sets"]["gauss_other_seeds"]["tpr"] >= 0.8 and clean["sets"]["gmm"]["auc"] >= 0.9
    # Calibrated on clean real images, JPEG'd real images look "generated" to spectral features: the report
    # must show the false-removal rate of the perturbed condition, not only the clean one.
    assert res["conditions"]["jpeg_quality=75"]["fpr"] > 0.5
    assert json.loads(json.dumps(res)) == res


def test_cnn_detector_learns_and_round_trips(tmp_path, world):
    det = fit_detector(
        "cnn", world["real_cal"], world["real_train"], world["gen_train"], 0.05, seed=1, steps=120, width=8, lr=1e-2
    )
    res = evaluate_detector(det, world["real_test"], {"gauss": world["gauss_test"]})
    assert res["conditions"]["clean"]["sets"]["gauss"]["auc"] >= 0.75  # 0.86 measured
    save_detector(det, tmp_path / "cnn")
    again = load_detector(tmp_path / "cnn")
    x = world["gauss_test"].subset(np.arange(20))
    assert np.allclose(again.scores(x), det.scores(x)) and again.threshold == det.threshold
    assert again.seen["training"] == det.seen["training"]  # the leak check survives a save


def test_loss_detector_uses_the_generator(world):
    gen = world["gauss"]
    det = fit_detector("loss", world["real_cal"], target_fpr=0.05, generator=gen)
    own = det.scores(world["gauss_test"])
    real = det.scores(world["real_test"])
    assert roc_auc(real, own) >= 0.75  # a model fits its own samples better than fresh real images
    assert det.seen == {"calibration": list(map(str, world["real_cal"].ids))}
    with pytest.raises(ConfigError, match="--model"):
        fit_detector("loss", world["real_cal"])
    with pytest.raises(DataError, match="generator's"):
        det.scores(ImageSet(np.zeros((2, 1, 4, 4), np.uint8), np.full(2, -1)))


# ---- CLI --------------------------------------------------------------------------------------------------


def test_detect_and_scrub_cli_without_tags(tmp_path, world, capsys):
    paths = {}
    for name in ("real_train", "real_cal", "gen_train", "gauss_test", "real_test"):
        paths[name] = tmp_path / f"{name}.npz"
        world[name].save(paths[name])
    out, saved = tmp_path / "det.json", tmp_path / "det"
    args = ["detect", "--method", "spectral", "--images", str(paths["gauss_test"]), "--train-real",
            str(paths["real_train"]), "--train-generated", str(paths["gen_train"]), "--calibrate-on",
            str(paths["real_cal"]), "--target-fpr", "0.05", "--save-detector", str(saved),
            "--out", str(out)]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["num_flagged"] >= 120 and report["detector"]["method"] == "spectral"
    # The saved detector gives the same decisions without retraining.
    r = runner.invoke(
        app, ["detect", "--detector", str(saved), "--images", str(paths["gauss_test"]), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["per_image"] == report["per_image"]
    # Scrub a mix of real and generated images with the detector: no tags anywhere.
    mix = ImageSet.concat([world["real_test"], world["gauss_test"].with_provenance(synthetic=True)])
    mix.save(tmp_path / "mix.npz")
    clean = tmp_path / "clean.npz"
    r = runner.invoke(
        app, ["scrub", "--data", f"npz:{tmp_path / 'mix.npz'}", "--out", str(clean), "--detector", str(saved)]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "clean.scrub.json").read_text())
    s = manifest["summary"]
    assert s["removed_by_rule"]["detected"] == s["num_removed"] and s["synthetic_removed"] >= 120
    assert s["real_removed"] <= 0.12 * len(world["real_test"])
    # The loss detector on a model directory (any family: here an analytic one), through the CLI.
    AnalyticTrainer("gaussian").save(world["gauss"], tmp_path / "gauss")
    r = runner.invoke(app, ["detect", "--method", "loss", "--model", str(tmp_path / "gauss"), "--images",
                            str(paths["gauss_test"]), "--calibrate-on", str(paths["real_cal"]), "--target-fpr",
                            "0.05", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    loss_report = json.loads(out.read_text())
    in_memory = fit_detector("loss", world["real_cal"], target_fpr=0.05, generator=world["gauss"])
    assert loss_report["detector"]["method"] == "loss"
    assert loss_report["num_flagged"] == int(in_memory.flag(world["gauss_test"]).sum()) >= 15  # 38 of 150 measured
    # A loss detector without a model: one line, exit code 2.
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "detect",
                "--method",
                "loss",
                "--images",
                str(paths["gauss_test"]),
                "--calibrate-on",
                str(paths["real_cal"]),
            ]
        )
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
