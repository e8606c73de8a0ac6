"""PIA, SecMI, GSA and dataset inference: hand-computed scores on models whose noise prediction is known in closed
form, order independence, separation on a model that memorized its set, chance on one that did not, and the
dataset-inference p-value's calibration under the null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffaudit.attacks import dataset_inference as di
from diffaudit.attacks import gsa, pia, roc, secmi
from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.generators.denoising import DenoisingGenerator
from diffaudit.generators.schedulers import training_scheduler

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
AB = training_scheduler(SCHEDULE).alphas_cumprod.double().numpy()


class LinearNet(torch.nn.Module):
    """``eps(z, t) = a z + b`` elementwise: a noise predictor known in closed form, with two parameters."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a * z + self.b


class MemoryNet(torch.nn.Module):
    """The optimal noise predictor of the empirical distribution of ``memory`` (a model that memorized it)."""

    def __init__(self, memory: np.ndarray) -> None:
        super().__init__()
        self.memory = torch.nn.Parameter(torch.from_numpy(memory.reshape(len(memory), -1)).double())
        self.register_buffer("ab", torch.from_numpy(AB))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.ab[t].view(-1, 1)
        flat = z.reshape(len(z), -1).double()
        d2 = (flat[:, None, :] - ab.sqrt()[:, :, None] * self.memory[None]).pow(2).sum(-1)
        r = torch.softmax(-d2 / (2 * (1 - ab)), dim=1)
        x0 = r @ self.memory
        return ((flat - ab.sqrt() * x0) / (1 - ab).sqrt()).reshape(z.shape)


class TinyGenerator(DenoisingGenerator):
    """A pixel-space DenoisingGenerator around a test network (``unet``: white box), unconditional."""

    conditional = False
    scheduler_config = SCHEDULE
    image_shape = (1, 4, 4)
    latent_shape = (1, 4, 4)

    def __init__(self, net: torch.nn.Module) -> None:
        self.unet = net
        self.model_id = "tiny"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def _condition(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t) if isinstance(self.unet, LinearNet) else self.unet(z_t, t)


def _images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8), np.full(n, -1, np.int64), ())


def _unit(data: ImageSet) -> np.ndarray:
    return data.images.reshape(len(data), -1).astype(np.float64) / 127.5 - 1.0


# ---- hand-computed scores -----------------------------------------------------------------------------------
def test_pia_and_pian_equal_the_hand_computation_on_a_linear_predictor():
    a, b, t = 0.3, 0.1, 200
    data = _images(5)
    got = pia.pia_scores(TinyGenerator(LinearNet(a, b)), data, t=t, p=4)
    z0 = _unit(data)
    eps0 = a * z0 + b
    ab = AB[t]
    for name, eps in (
        ("pia", eps0),
        ("pian", eps0 / np.abs(eps0).mean(1, keepdims=True) * math.sqrt(2 / math.pi)),
    ):
        z_t = math.sqrt(ab) * z0 + math.sqrt(1 - ab) * eps
        want = -(np.abs(a * z_t + b - eps) ** 4).mean(1)
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
    # A zero predictor: eps0 = 0 and the prediction at t is 0 too: every distance is exactly 0.
    zero = pia.pia_scores(TinyGenerator(LinearNet(0.0, 0.0)), data, t=t)
    assert np.all(zero["pia"] == 0) and np.all(zero["pian"] == 0)


def test_secmi_t_error_equals_the_hand_computation_on_a_linear_predictor():
    a, b, t_sec, k = 0.3, 0.1, 100, 10
    data = _images(4)
    err = secmi.t_errors(TinyGenerator(LinearNet(a, b)), data, t_sec, k)

    def step(z, t_from, t_to):
        eps = a * z + b
        x0 = (z - math.sqrt(1 - AB[t_from]) * eps) / math.sqrt(AB[t_from])
        return math.sqrt(AB[t_to]) * x0 + math.sqrt(1 - AB[t_to]) * eps

    z = _unit(data)
    for t in range(0, t_sec, k):
        z = step(z, t, t + k)
    want = step(step(z, t_sec, t_sec + k), t_sec + k, t_sec) - z
    np.testing.assert_allclose(err.reshape(4, -1), want, rtol=1e-4, atol=1e-10)
    assert np.abs(want).max() > 1e-5  # the linear model does not invert exactly: a non-trivial check
    np.testing.assert_allclose(secmi.stat_scores(err), -(want**2).mean(1), rtol=1e-4)
    # A zero predictor makes DDIM a pure rescaling, which inverts exactly: t-error 0.
    zero = secmi.t_errors(TinyGenerator(LinearNet(0.0, 0.0)), data, t_sec, k)
    assert np.abs(zero).max() < 1e-12
    assert secmi.secmi_queries(t_sec, k) == 12
    with pytest.raises(ConfigError, match="multiple of k"):
        secmi.t_errors(TinyGenerator(LinearNet(0.0, 0.0)), data, 105, 10)


def test_gsa_gradient_norms_equal_the_hand_computation():
    a, b = 0.3, 0.1
    data = _images(3)
    gen = TinyGenerator(LinearNet(a, b))
    steps = gsa.gsa_timesteps(1000, 4)
    assert steps == (0, 250, 500, 750)
    got = gsa.gsa_features(gen, data, steps, seed=2)
    assert gen.gradient_names() == ["a", "b"] and got.shape == (3, 2)
    from diffaudit.attacks import mia
    from diffaudit.generators.base import seeded_noise

    z0 = _unit(data)
    noise = seeded_noise((1, 4, 4), mia.noise_seeds(data.ids.tolist(), gsa.GSA_DRAW, 2)).double().numpy()
    noise = noise.reshape(3, -1)
    for i in range(3):
        z_t = np.stack([math.sqrt(AB[t]) * z0[i] + math.sqrt(1 - AB[t]) * noise[i] for t in steps])
        resid = a * z_t + b - noise[i]
        grad_a, grad_b = (2 * resid * z_t).mean(), (2 * resid).mean()
        np.testing.assert_allclose(got[i], [abs(grad_a), abs(grad_b)], rtol=1e-5)
    assert all(p.requires_grad for p in gen.unet.parameters())  # flags restored


# ---- order independence ---------------------------------------------------------------------------------------
def test_scores_do_not_depend_on_order_or_batch():
    rng = np.random.default_rng(3)
    gen = TinyGenerator(MemoryNet(_unit(_images(6, seed=9)) + 0 * rng.normal()))
    data = _images(8, seed=4)
    perm = rng.permutation(8)
    shuffled = data.subset(perm)
    p1, p2 = pia.pia_scores(gen, data, batch_size=8), pia.pia_scores(gen, shuffled, batch_size=3)
    for name in ("pia", "pian"):
        np.testing.assert_allclose(p2[name], p1[name][perm], rtol=1e-10)
    e1, e2 = secmi.t_errors(gen, data, batch_size=8), secmi.t_errors(gen, shuffled, batch_size=3)
    np.testing.assert_allclose(e2, e1[perm], rtol=1e-5, atol=1e-9)
    g1, g2 = gsa.gsa_features(gen, data, (10, 300)), gsa.gsa_features(gen, shuffled, (10, 300))
    np.testing.assert_allclose(g2, g1[perm], rtol=1e-6)


# ---- separation and chance ------------------------------------------------------------------------------------
def _members_and_others(n: int = 30):
    members, nonmembers, unrelated = _images(n, 1), _images(n, 2), _images(n, 3)
    pool = ImageSet.concat([members, nonmembers])
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return pool, is_member, members, unrelated


@pytest.mark.parametrize("memorized", [True, False])
def test_separation_on_a_memorizing_model_and_chance_on_an_unrelated_one(memorized):
    pool, is_member, members, unrelated = _members_and_others()
    gen = TinyGenerator(MemoryNet(_unit(members if memorized else unrelated)))
    scores = pia.pia_scores(gen, pool)
    errors = secmi.t_errors(gen, pool)
    scores[secmi.SECMI_STAT] = secmi.stat_scores(errors)
    train = np.zeros(len(pool), bool)
    train[::2] = True  # classifiers train on half, are judged on the other half
    scores[secmi.SECMI_NN] = secmi.nn_scores(errors, train, is_member, seed=0)
    scores[gsa.GSA] = gsa.classifier_scores(gsa.gsa_features(gen, pool, (10, 100, 200)), train, is_member)
    for name, s in scores.items():
        auc = roc.summarize(s[~train], is_member[~train])[roc.AUC]
        if memorized:
            assert auc > 0.9, (name, auc)
        else:
            assert abs(auc - 0.5) < 0.3, (name, auc)


def test_analytic_models_are_not_white_box():
    data = _images(4)
    gen = AnalyticTrainer("gaussian").fit(data, None)
    with pytest.raises(ConfigError, match="not white-box"):
        gsa.gsa_features(gen, data, (10,))


# ---- dataset inference -----------------------------------------------------------------------------------------
def test_dataset_test_is_calibrated_under_the_null_and_detects_a_shift():
    rng = np.random.default_rng(0)
    p = np.array(
        [di.dataset_test(rng.normal(size=(20, 5)), rng.normal(size=(25, 5)), 99, r)["p_value"] for r in range(60)]
    )
    assert (p < 0.05).mean() <= 0.1 and 0.35 < p.mean() < 0.65  # uniform: mean 1/2, P(p < 0.05) = 0.05
    shifted = rng.normal(size=(30, 5))
    shifted[:, 1] -= 2.5  # member-like: lower loss on one signal
    assert di.dataset_test(shifted, rng.normal(size=(30, 5)), 99, 0)["p_value"] == 0.01  # the smallest possible


def test_dataset_inference_on_a_generator_calibrated_and_powerful():
    # A Gaussian fitted to 12 images in 16 dimensions memorizes them. Null: two sets of fresh images.
    rng = np.random.default_rng(0)
    members = _images(12, 1)
    gen = AnalyticTrainer("gaussian").fit(members, None)
    cfg = di.DatasetInferenceConfig(timesteps=(50, 200), noise_draws=1, permutations=199)
    fresh = di.image_features(gen, _images(80, 2), cfg)
    null_p = []
    for r in range(20):
        perm = rng.permutation(80)
        null_p.append(di.dataset_test(fresh[perm[:40]], fresh[perm[40:]], 99, r)["p_value"])
    assert np.mean(np.array(null_p) < 0.05) <= 0.15
    found, fs, _ = di.dataset_inference(gen, members, _images(30, 3), cfg)
    assert found["used"] and found["p_value"] == pytest.approx(1 / 200)  # the smallest p of 199 permutations
    assert found["images_needed"] is not None and found["images_needed"] <= 12
    assert fs.shape == (12, len(di.feature_names(cfg)))


def test_cli_dataset_inference_and_its_errors(tmp_path):
    members = _images(12, 1)
    gen = AnalyticTrainer("gaussian").fit(members, None)
    AnalyticTrainer("gaussian").save(gen, tmp_path / "model")
    members.save(tmp_path / "suspect.npz")
    _images(20, 3).save(tmp_path / "unseen.npz")
    args = ["mia", "--model", str(tmp_path / "model"), "--suspect", f"npz:{tmp_path / 'suspect.npz'}"]
    args += ["--timesteps", "50,200", "--noise-draws", "1", "--permutations", "199"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad")])
    assert isinstance(res.exception, ConfigError) and "--unseen" in str(res.exception)
    res = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "bad"), "--unseen", f"npz:{tmp_path / 'suspect.npz'}"]
    )
    assert isinstance(res.exception, DataError) and "share 12 images" in str(res.exception)
    res = CliRunner().invoke(app, [*args[:-1], "99", "--unseen", "x", "--out", str(tmp_path / "bad")])
    assert isinstance(res.exception, ConfigError) and "cannot give p < alpha" in str(res.exception)
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--unseen", f"npz:{tmp_path / 'unseen.npz'}"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "results.json").read_text())
    found = results["dataset_inference"]
    assert found["used"] and found["num_suspect"] == 12 and found["num_unseen"] == 20
    assert results["costs"]["queries_per_image"] == 2 * 1 + 3 + 12
    assert len(json.loads((out / "scores.json").read_text())) == 32
