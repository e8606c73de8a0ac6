"""The class-conditional diffusion network and its training loss.

The denoiser is diffusers' ``UNet2DModel`` with a class embedding (null label last); the noise schedule is
diffusers' DDPM scheduler. Images are float tensors in [-1, 1]. Sampling, the per-image audit loss and the
guidance gap are not here: they are written once for every generator in
:mod:`diffaudit.generators.denoising`, which wraps this network (:mod:`diffaudit.generators.classcond`).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffaudit.models.config import ModelConfig


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

        All randomness comes from ``generator`` (:meth:`draw_step`) so a training step is reproducible from its seed.
        """
        t, noise, labels = self.draw_step(x0, labels, generator, cond_drop_prob)
        return self.per_sample_loss(x0, labels, t, noise).mean()

    def draw_step(
        self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator, cond_drop_prob: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One training step's randomness for the batch ``x0``, drawn from ``generator`` in a fixed order.

        Returns timesteps ``int64 (B,)``, noise like ``x0`` and the labels with classifier-free dropout applied
        (-1 = null). The single source of these draws for the plain, data-parallel and DP-SGD training steps, so
        all three train on the same timesteps and noise for a given seed.
        """
        n = x0.shape[0]
        t = torch.randint(0, self.config.num_train_timesteps, (n,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        if labels is not None and self.config.conditional and cond_drop_prob > 0:
            drop = torch.rand(n, generator=generator).to(x0.device) < cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return t, noise, labels
