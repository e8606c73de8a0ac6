"""The class-conditional diffusion model: one object owns the denoiser, the training loss and the sampler.

The denoiser is diffusers' ``UNet2DModel`` with a class embedding; the noise schedule and sampler steps are
diffusers' schedulers (DDPM, DDIM, DPM-Solver++), not rewritten here. Images are float tensors in [-1, 1].

Seeds are per sample: sample ``i`` draws all its noise from a generator seeded with ``seeds[i]``, so it
does not depend on which batch it was drawn in (EDM's ``StackedRandomGenerator`` idea).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from diffaudit.errors import ConfigError
from diffaudit.models.config import SAMPLERS, ModelConfig


def build_unet(config: ModelConfig) -> UNet2DModel:
    """A ``UNet2DModel`` for ``config`` with a class embedding of ``num_classes + 1`` entries (null last)."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DModel(
        sample_size=config.resolution,
        in_channels=config.channels,
        out_channels=config.channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=None,
        num_class_embeds=config.num_classes + 1 if config.conditional else None,
    )


def per_sample_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise ``(len(seeds), *shape)``; row ``i`` depends only on ``seeds[i]``."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


class DiffusionModel(torch.nn.Module):
    """A denoiser plus its DDPM training schedule.

    ``loss(x0, labels, generator)`` is the training objective; ``sample(labels, seeds, ...)`` generates.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = build_unet(config)
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type,
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ---- the denoiser -----------------------------------------------------------------------------------
    def _labels(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        if not self.config.conditional:
            return None
        if labels is None:
            return torch.full((n,), self.config.null_label, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        # -1 (unlabelled) maps to the null label
        return torch.where(labels < 0, torch.full_like(labels, self.config.null_label), labels)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Predicted noise ``(N, C, H, W)`` (on the model's device) for noisy images ``x_t`` at timesteps ``t``."""
        x_t, t = x_t.to(self.device), t.to(self.device)
        return self.unet(x_t, t, class_labels=self._labels(labels, x_t.shape[0], x_t.device)).sample

    def guided_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance_scale: float
    ) -> torch.Tensor:
        """Classifier-free guided prediction ``eps_null + w (eps_label - eps_null)``; one pass when w == 1."""
        if not self.config.conditional or labels is None or guidance_scale == 1.0:
            return self.predict_noise(x_t, t, labels)
        null = torch.full_like(labels, -1)
        both = self.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        eps_cond, eps_null = both.chunk(2)
        return eps_null + guidance_scale * (eps_cond - eps_null)

    # ---- training ---------------------------------------------------------------------------------------
    def per_sample_loss(
        self, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared noise-prediction error per sample, ``float32 (N,)``, at timesteps ``t`` with ``noise``.

        ``x0`` is ``(N, C, H, W)`` in [-1, 1], on any device (moved to the model's; so is the result).
        Membership inference calls this at a fixed ``t``.
        """
        x0, t, noise = x0.to(self.device), t.to(self.device), noise.to(self.device)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        eps = self.predict_noise(x_t, t, labels)
        target = noise if self.config.prediction_type == "epsilon" else self.train_scheduler.get_velocity(x0, noise, t)
        return (eps.float() - target.float()).pow(2).flatten(1).mean(1)

    def loss(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        cond_drop_prob: float = 0.1,
    ) -> torch.Tensor:
        """The training loss (scalar): uniform timesteps, Gaussian noise, labels dropped with ``cond_drop_prob``.

        All randomness comes from ``generator`` so a training step is reproducible from its seed.
        """
        n = x0.shape[0]
        t = torch.randint(0, self.config.num_train_timesteps, (n,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        if labels is not None and self.config.conditional and cond_drop_prob > 0:
            drop = torch.rand(n, generator=generator).to(x0.device) < cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return self.per_sample_loss(x0, labels, t, noise).mean()

    # ---- sampling ---------------------------------------------------------------------------------------
    def make_sampler(self, sampler: str, num_steps: int):
        """A fresh diffusers scheduler of kind ``sampler`` (``ddpm``, ``ddim``, ``dpm++``) set to ``num_steps``."""
        common = dict(
            num_train_timesteps=self.config.num_train_timesteps,
            beta_schedule=self.config.beta_schedule,
            prediction_type=self.config.prediction_type,
        )
        if sampler == "ddpm":
            sched = DDPMScheduler(**common)
        elif sampler == "ddim":
            # No x0 clipping: with classifier-free guidance it turns guided predictions into speckle noise
            # (measured on digits-8 at guidance 3); the final clamp to [-1, 1] is enough.
            sched = DDIMScheduler(**common, clip_sample=False)
        elif sampler == "dpm++":
            # Thresholding keeps x0 predictions in [-1, 1]: without it the first step from t = 999 of the cosine
            # schedule (alpha_bar ~ 0) divides by ~0 and saturates every image.
            sched = DPMSolverMultistepScheduler(
                **common, algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0
            )
        else:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if not 1 <= num_steps <= self.config.num_train_timesteps:
            raise ConfigError(f"num_steps must be in [1, {self.config.num_train_timesteps}], got {num_steps}")
        sched.set_timesteps(num_steps)
        return sched

    @torch.inference_mode()
    def sample(
        self,
        labels: torch.Tensor | None,
        seeds: Sequence[int],
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        initial_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate ``len(seeds)`` images ``(N, C, H, W)`` float32 in [-1, 1].

        ``labels`` ``(N,)`` (``None`` or -1 entries for unconditional), ``temperature`` scales the initial noise
        and the stochastic sampler noise (< 1 trades diversity for fidelity, a sampling bias). Sample ``i``
        depends only on ``seeds[i]`` and ``labels[i]``. ``initial_noise`` overrides the seeded ``x_T`` (used by
        noise-space tags).
        """
        cfg = self.config
        device = self.device
        shape = (cfg.channels, cfg.resolution, cfg.resolution)
        sched = self.make_sampler(sampler, num_steps)
        x = per_sample_noise(shape, seeds, device) if initial_noise is None else initial_noise.to(device)
        x = x * temperature * sched.init_noise_sigma
        # Per-sample generators for the stochastic (DDPM) steps, advanced past the initial-noise draw.
        generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
        lab = None if labels is None else labels.to(device)
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
            eps = self.guided_noise(sched.scale_model_input(x, t), tt, lab, guidance_scale)
            if sampler == "ddpm":
                prev = sched.step(eps, t, x, generator=generators).prev_sample
                if temperature != 1.0:  # rescale only the freshly added noise: recompute mean-only step
                    mean = sched.step(eps, t, x, generator=generators, variance_noise=torch.zeros_like(x)).prev_sample
                    prev = mean + temperature * (prev - mean)
                x = prev
            else:
                x = sched.step(eps, t, x).prev_sample
        return x.clamp(-1, 1).float()
