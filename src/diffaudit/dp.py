"""DP-SGD for the class-conditional U-Net: per-sample gradient clipping, Gaussian noise, an RDP accountant.

Abadi et al. (2016): every example's gradient is clipped to norm ``clip``, the clipped gradients are summed, Gaussian
noise of standard deviation ``noise_multiplier * clip`` is added and the sum is divided by the batch size. The noise
multiplier is chosen by Opacus (``opacus.accountants.utils.get_noise_multiplier``, RDP accountant) so that the whole
run spends ``target_epsilon`` at ``delta``; the epsilon spent after each step is recomputed from the step count, so
a resumed run reports the same numbers. Opacus is used only for accounting (it is an optional dependency:
``pip install opacus``, which pulls no torchvision and no CUDA build); the per-sample gradients come from
``torch.func`` (``vmap`` of ``grad``) over the U-Net.

Caveats (docs/mitigations.md): the accountant assumes Poisson sampling of each batch with rate ``q = B / N``;
diffaudit draws fixed-size batches from per-epoch shuffles (for exact resume), for which the RDP bound is the
customary approximation, not a proof. The guarantee is per *example*: an image planted k times is protected only
at group level (roughly k times epsilon).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from diffaudit.errors import ConfigError

#: Noise of step s is drawn from a generator seeded by (seed, s) mixed with this constant (a stream of its own).
DP_NOISE_STREAM = 0x0D9


def require_opacus() -> Any:
    """The ``opacus.accountants`` module, or a ConfigError saying how to install it."""
    try:
        from opacus import accountants
        from opacus.accountants import utils  # noqa: F401 - imported for get_noise_multiplier
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("train.dp_epsilon needs Opacus for privacy accounting: pip install opacus") from exc
    return accountants


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier for which ``steps`` steps at ``sample_rate`` spend ``epsilon`` at ``delta``."""
    accountants = require_opacus()
    return float(
        accountants.utils.get_noise_multiplier(
            target_epsilon=float(epsilon),
            target_delta=float(delta),
            sample_rate=float(sample_rate),
            steps=int(steps),
            accountant="rdp",
        )
    )


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon (RDP accountant) after ``steps`` steps; 0 before the first."""
    if steps <= 0:
        return 0.0
    accountants = require_opacus()
    acc = accountants.RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


def per_sample_gradients(
    model: Any, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of each example's loss, ``{name: (B, *param.shape)}``, and the losses ``(B,)``.

    ``model`` is a :class:`~diffaudit.models.diffusion.DiffusionModel`; the loss is its ``per_sample_loss``
    (labels already dropped/randomised by the caller; -1 means null).
    """
    from torch.func import functional_call

    unet = model.unet
    params = {k: v.detach() for k, v in unet.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in unet.named_buffers()}
    sched = model.train_scheduler
    velocity = model.config.prediction_type != "epsilon"
    lab = model._labels(labels, x0.shape[0], x0.device)

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor | None, tt: torch.Tensor, n: torch.Tensor):
        x_t = sched.add_noise(x[None], n[None], tt[None])
        kwargs = {"class_labels": c[None]} if c is not None else {}
        pred = functional_call(unet, (p, buffers), (x_t, tt[None]), kwargs).sample
        target = sched.get_velocity(x[None], n[None], tt[None]) if velocity else n[None]
        return (pred.float() - target.float()).pow(2).mean()

    with warnings.catch_warnings():
        # functorch has no batching rule for CPU flash attention and falls back to a loop: correct, only slower.
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        return _vmapped(one, params, x0, lab, t, noise)


def _vmapped(one: Any, params: dict, x0: torch.Tensor, lab: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor):
    from torch.func import grad_and_value, vmap

    if lab is None:
        grads, losses = vmap(grad_and_value(lambda p, x, tt, n: one(p, x, None, tt, n)), in_dims=(None, 0, 0, 0))(
            params, x0, t, noise
        )
    else:
        grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0, 0, 0))(params, x0, lab, t, noise)
    return grads, losses


def private_gradients(
    model: Any,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    noise: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    noise_gen: torch.Generator,
) -> tuple[float, float]:
    """Set every trainable parameter's ``.grad`` to the DP-SGD gradient; returns (mean loss, share clipped).

    ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B``, ``g_i`` the per-sample gradients (:func:`per_sample_gradients`).
    """
    grads, losses = per_sample_gradients(model, x0, labels, t, noise)
    names = list(grads)
    norms = torch.sqrt(sum(grads[k].flatten(1).pow(2).sum(1) for k in names))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    b = x0.shape[0]
    params = dict(model.unet.named_parameters())
    for k in names:
        summed = torch.einsum("b,b...->...", factor, grads[k])
        draw = torch.randn(summed.shape, generator=noise_gen).to(summed)
        params[k].grad = (summed + noise_multiplier * clip * draw) / b
    return float(losses.mean()), float((norms > clip).float().mean())


def check_dp_settings(epsilon: float, delta: float, n_train: int) -> None:
    """Refuse settings whose guarantee would be meaningless (delta not below 1/N)."""
    if not delta < 1.0 / max(n_train, 1):
        raise ConfigError(
            f"train.dp_delta={delta} must be below 1/N = {1.0 / max(n_train, 1):.2g} for {n_train} training images"
        )
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise ConfigError(f"train.dp_epsilon must be a positive number, got {epsilon}")
