"""diffusers schedulers by name, built from a model's noise-schedule config (one place for every generator)."""

from __future__ import annotations

from typing import Any

import torch

from diffaudit.errors import CheckpointError, ConfigError

#: Sampler names every generator accepts ("pipeline": the scheduler class a pipeline directory ships with).
SAMPLERS = ("ddim", "ddpm", "dpm++", "pipeline")
#: Config keys that describe the noise schedule itself (kept when switching scheduler class).
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
)


def _schedule_only(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k in _SCHEDULE_KEYS or k == "_class_name"}


def training_scheduler(config: dict[str, Any]):
    """The DDPM scheduler of the training objective (``add_noise``, ``get_velocity``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(_schedule_only(config))


def make_scheduler(kind: str, config: dict[str, Any], num_steps: int, pixel_space: bool):
    """A fresh scheduler of ``kind`` over the noise schedule ``config``, set to ``num_steps`` steps.

    DDIM never clips x0 (with classifier-free guidance clipping turns guided predictions into speckle noise;
    the final clamp suffices). DPM-Solver++ thresholds x0 to [-1, 1] for pixel-space models only: without it
    the first step from t = 999 of a cosine schedule divides by ~0; latents are not bounded, so latent models
    keep diffusers' default.
    """
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    base = _schedule_only(config)
    n_train = int(base.get("num_train_timesteps", 1000))
    if not isinstance(num_steps, int) or not 1 <= num_steps <= n_train:
        raise ConfigError(f"num_steps must be an integer in [1, {n_train}], got {num_steps!r}")
    if kind == "ddpm":
        sched = DDPMScheduler.from_config(base)
    elif kind == "ddim":
        sched = DDIMScheduler.from_config(base, clip_sample=False)
    elif kind == "dpm++":
        extra: dict[str, Any] = {"algorithm_type": "dpmsolver++", "solver_order": 2}
        if pixel_space:
            extra |= {"thresholding": True, "sample_max_value": 1.0}
        sched = DPMSolverMultistepScheduler.from_config(base, **extra)
    elif kind == "pipeline":
        cls = getattr(diffusers, str(config.get("_class_name", "")), None)
        if cls is None:
            raise CheckpointError(f"scheduler class {config.get('_class_name')!r} is not in this diffusers")
        sched = cls.from_config(config)
    else:
        raise ConfigError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}")
    sched.set_timesteps(num_steps)
    return sched


def img2img_timesteps(sched: Any, num_steps: int, strength: float) -> torch.Tensor:
    """The tail of ``sched.timesteps`` an image-to-image run of ``strength`` executes (diffusers' convention)."""
    init_steps = min(int(num_steps * strength), num_steps)
    start = max(num_steps - init_steps, 0) * getattr(sched, "order", 1)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return sched.timesteps[start:]
