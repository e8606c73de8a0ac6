"""The attack queries every denoising generator answers (generators/queries.py), over each family: the tiny class
U-Net, a tiny text-to-image pipeline (VAE latents) and the analytic Gaussian (builders of test_generators)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffaudit.errors import ConfigError
from diffaudit.generators.base import seeded_noise
from test_generators import BUILDERS  # noqa: I001 (a sibling test module: the one set of tiny builders)

FAMILIES = ("classcond", "pipeline", "gaussian")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def _requests(gen, n=3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *gen.image_shape), dtype=np.uint8)
    return images, np.array([0, 1, -1][:n], dtype=np.int64)


def test_predict_noise_gives_the_training_loss(family):
    # The loss rebuilt from encode_images + predict_noise equals denoising_losses: the queries see the same model.
    _, gen = family
    images, labels = _requests(gen)
    seeds = [11, 12, 13]
    z0 = gen.encode_images(images)
    assert tuple(z0.shape) == (3, *gen.latent_shape)
    noise = seeded_noise(gen.latent_shape, seeds).to(z0)
    ab = float(gen.alphas_cumprod()[120])
    eps = gen.predict_noise(np.sqrt(ab) * z0 + np.sqrt(1 - ab) * noise, 120, labels, batch_size=2)
    mine = (eps - noise).pow(2).flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(mine, gen.denoising_losses(images, labels, [120], seeds)[:, 0], rtol=1e-5)
    with pytest.raises(ConfigError, match="outside"):
        gen.predict_noise(z0, gen.num_train_timesteps, labels)


def test_ddim_step_down_equals_diffusers_ddim(family):
    from diffusers import DDIMScheduler

    from diffaudit.generators.schedulers import _schedule_only

    _, gen = family
    images, labels = _requests(gen)
    z = gen.encode_images(images)
    mine = gen.ddim_step(z, 500, 400, labels)
    sched = DDIMScheduler.from_config(_schedule_only(gen.scheduler_config), clip_sample=False)
    sched.set_timesteps(gen.num_train_timesteps // 100)
    theirs = sched.step(gen.predict_noise(z, 500, labels), 500, z).prev_sample
    np.testing.assert_allclose(mine.double().numpy(), theirs.double().numpy(), rtol=1e-4, atol=1e-5)
    # Inversion then the step back returns close to the start for a smooth model (a small t-error).
    back = gen.ddim_step(gen.ddim_step(z, 10, 20, labels), 20, 10, labels)
    assert (back - z).abs().max() < 0.5 * z.abs().max()


def test_loss_gradient_norms_white_box_only(family):
    name, gen = family
    images, labels = _requests(gen)
    if name == "gaussian":
        with pytest.raises(ConfigError, match="not white-box"):
            gen.loss_gradient_norms(images, labels, [10], [1, 2, 3])
        return
    norms = gen.loss_gradient_norms(images, labels, [10, 300], [1, 2, 3])
    assert norms.shape == (3, len(gen.gradient_names())) and np.isfinite(norms).all() and norms.max() > 0
    again = gen.loss_gradient_norms(images[::-1].copy(), labels[::-1].copy(), [10, 300], [3, 2, 1])
    np.testing.assert_allclose(again[::-1], norms, rtol=1e-4, atol=1e-7)  # per sample: order independent
    if name == "classcond":
        # By hand for image 0: autograd of the mean loss over the two timesteps, norm of the first tensor.
        unet = gen.model.unet
        x = torch.from_numpy(images[:1]).float() / 127.5 - 1
        eps = seeded_noise(gen.latent_shape, [1])
        ab = torch.from_numpy(gen.alphas_cumprod()).float()
        tt = torch.tensor([10, 300])
        x_t = ab[tt].sqrt().view(-1, 1, 1, 1) * x + (1 - ab[tt]).sqrt().view(-1, 1, 1, 1) * eps
        pred = unet(x_t, tt, class_labels=torch.tensor([0, 0])).sample
        first = next(unet.parameters())
        (grad,) = torch.autograd.grad((pred - eps).pow(2).mean(), [first])
        assert norms[0, 0] == pytest.approx(float(grad.norm()), rel=1e-4)
