"""Queries of a noise-predicting network beyond the training loss, for the membership attacks of the field.

:class:`DenoisingQueries` is mixed into :class:`~diffaudit.generators.denoising.DenoisingGenerator`, so every
family (class U-Net in pixels, text-to-image pipeline in VAE latents, analytic closed form) answers them through
the same hooks (``_encode``, ``_condition``, ``_predict``):

* :meth:`~DenoisingQueries.encode_images`: ``uint8`` images -> the space the network denoises (pixels, or the
  VAE posterior mean), deterministic;
* :meth:`~DenoisingQueries.predict_noise`: the network's noise prediction ``eps_theta(z_t, t, c)`` at given
  points, whatever the model's prediction type (v-prediction is converted), one query per row;
* :meth:`~DenoisingQueries.ddim_step`: a deterministic DDIM move (eta = 0, Song et al. 2021, eq. 12) between any
  two timesteps, in either direction (inversion when ``t_to > t_from``), one query;
* :meth:`~DenoisingQueries.loss_gradient_norms`: white box only: per-image, per-parameter-tensor L2 norms of the
  gradient of the training loss (Pang et al. 2023's GSA features). Families without a network (analytic)
  raise a ConfigError.

Every query of image ``i`` depends only on its own inputs (no batch statistics): scores are order independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffaudit.errors import ConfigError
from diffaudit.generators.base import seeded_noise, to_model_tensor


class DenoisingQueries:
    """Mixin over the DenoisingGenerator hooks (see the module docstring)."""

    def alphas_cumprod(self) -> np.ndarray:
        """``float64 (num_train_timesteps,)``: the cumulative signal level ``abar_t`` of the training schedule."""
        cached = getattr(self, "_query_alphas", None)
        if cached is None:
            from diffaudit.generators.schedulers import training_scheduler

            cached = training_scheduler(self.scheduler_config).alphas_cumprod.double().numpy()  # type: ignore[attr-defined]
            self._query_alphas = cached
        return cached

    def _query_dtype(self) -> torch.dtype:
        # Attack arithmetic runs in float32 (float64 for the analytic models), whatever dtype the network uses.
        return torch.float64 if self.dtype == torch.float64 else torch.float32  # type: ignore[attr-defined]

    def _check_timestep(self, t: int) -> int:
        n = int(self.num_train_timesteps)  # type: ignore[attr-defined]
        if not 0 <= int(t) < n:
            raise ConfigError(f"timestep {t} outside [0, {n})")
        return int(t)

    def _check_images(self, images: np.ndarray) -> None:
        shape = tuple(self.image_shape)  # type: ignore[attr-defined]
        if images.ndim != 4 or tuple(images.shape[1:]) != shape or images.dtype != np.uint8:
            raise ConfigError(f"images must be uint8 (N, {', '.join(map(str, shape))}); got {images.shape}")

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """``uint8 (N, C, H, W)`` -> ``z_0`` ``(N, *latent_shape)`` on the generator's device (float32, or float64
        for analytic models): the images themselves for pixel models, the scaled VAE posterior mean for a pipeline.
        """
        self._check_images(images)
        parts = [
            self._encode(to_model_tensor(images[s : s + batch_size])).to(self._query_dtype())  # type: ignore[attr-defined]
            for s in range(0, len(images), batch_size)
        ]
        if not parts:
            return torch.zeros((0, *self.latent_shape), dtype=self._query_dtype())  # type: ignore[attr-defined]
        return torch.cat(parts)

    @torch.inference_mode()
    def predict_noise(
        self, z_t: torch.Tensor, t: int | Sequence[int], labels: np.ndarray, batch_size: int = 64
    ) -> torch.Tensor:
        """The network's noise prediction ``eps_theta(z_t, t, labels)``, ``(N, *latent_shape)`` in the query dtype.

        ``t`` one timestep for all rows or one per row; ``labels`` ``int64 (N,)`` index the conditions (-1: null).
        A v-prediction (or x0-prediction) network's output is converted to the noise it implies.
        """
        n = len(z_t)
        ts = np.full(n, int(t), dtype=np.int64) if np.ndim(t) == 0 else np.asarray(t, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if len(ts) != n or len(labels) != n:
            raise ConfigError(f"need one timestep and one label per row ({n} rows)")
        for v in np.unique(ts):
            self._check_timestep(int(v))
        ab = torch.from_numpy(self.alphas_cumprod()[ts])
        kind = self.scheduler_config.get("prediction_type", "epsilon")  # type: ignore[attr-defined]
        out = []
        dev = self.device  # type: ignore[attr-defined]
        for s in range(0, n, batch_size):
            z = z_t[s : s + batch_size].to(dev, self.dtype)  # type: ignore[attr-defined]
            tt = torch.from_numpy(ts[s : s + batch_size]).to(dev)
            cond = self._condition(torch.from_numpy(labels[s : s + batch_size]).to(dev))  # type: ignore[attr-defined]
            pred = self._predict(z, tt, cond).to(self._query_dtype())  # type: ignore[attr-defined]
            zq = z.to(pred.dtype)
            a = ab[s : s + batch_size].to(pred.device, pred.dtype).view(-1, *[1] * (z.ndim - 1))
            if kind == "v_prediction":
                pred = a.sqrt() * pred + (1 - a).sqrt() * zq
            elif kind == "sample":
                pred = (zq - a.sqrt() * pred) / (1 - a).sqrt()
            out.append(pred)
        return torch.cat(out) if out else z_t.to(self._query_dtype())

    def ddim_step(
        self, z: torch.Tensor, t_from: int, t_to: int, labels: np.ndarray, batch_size: int = 64
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from ``t_from`` to ``t_to`` (either direction): one query at ``t_from``.

        ``x0 = (z - sqrt(1 - a_f) eps) / sqrt(a_f)``, result ``sqrt(a_to) x0 + sqrt(1 - a_to) eps`` with
        ``eps = eps_theta(z, t_from)`` and ``a = abar``. Upward it is DDIM inversion (SecMI's deterministic
        "reverse" step); downward it is the usual DDIM sampler step.
        """
        a_f = float(self.alphas_cumprod()[self._check_timestep(t_from)])
        a_t = float(self.alphas_cumprod()[self._check_timestep(t_to)])
        eps = self.predict_noise(z, t_from, labels, batch_size)
        z = z.to(eps)
        x0 = (z - np.sqrt(1 - a_f) * eps) / np.sqrt(a_f)
        return np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps

    # ---- white box ---------------------------------------------------------------------------------------------
    def _network(self) -> torch.nn.Module:
        """The denoising network whose parameters gradients are taken of (its ``unet``); a family without one
        (the analytic models' closed-form denoiser) is not white-box."""
        for owner in (self, getattr(self, "model", None)):
            net = getattr(owner, "unet", None)
            if isinstance(net, torch.nn.Module):
                return net
        raise ConfigError(
            f"{type(self).__name__} is not white-box (no network parameters): gradient attacks need a network"
        )

    def gradient_names(self) -> list[str]:
        """Names of the parameter tensors :meth:`loss_gradient_norms` reports on, in its column order."""
        return [name for name, _ in self._network().named_parameters()]

    def loss_gradient_norms(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        timesteps: Sequence[int],
        noise_seeds: Sequence[int],
    ) -> np.ndarray:
        """Per-image L2 norm of the gradient of the training loss for each parameter tensor, ``float32 (N, P)``.

        The loss of image ``i`` is the one of :meth:`denoising_losses` (same seeded noise, shared across the
        timesteps) averaged over ``timesteps``; its gradient is taken with respect to every parameter tensor of
        the network (columns: :meth:`gradient_names`). One backward pass per image (per-sample gradients, so a
        row never depends on the batch). Parameters' ``requires_grad`` flags are restored afterwards.
        """
        self._check_images(images)
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images) or len(noise_seeds) != len(images):
            raise ConfigError(f"need one label and one noise seed per image ({len(images)} images)")
        steps = [self._check_timestep(t) for t in timesteps]
        if not steps:
            raise ConfigError("give at least one timestep")
        net = self._network()
        params = list(net.parameters())
        flags = [p.requires_grad for p in params]
        from diffaudit.generators.schedulers import training_scheduler

        sched = training_scheduler(self.scheduler_config)  # type: ignore[attr-defined]
        prediction = sched.config.prediction_type
        dev = self.device  # type: ignore[attr-defined]
        out = np.empty((len(images), len(params)), dtype=np.float32)
        try:
            for p in params:
                p.requires_grad_(True)
            for i in range(len(images)):
                with torch.no_grad():
                    z0 = self._encode(to_model_tensor(images[i : i + 1]))  # type: ignore[attr-defined]
                    cond = self._condition(torch.from_numpy(labels[i : i + 1]).to(dev))  # type: ignore[attr-defined]
                noise = seeded_noise(self.latent_shape, [noise_seeds[i]]).to(z0)  # type: ignore[attr-defined]
                k = len(steps)
                tt = torch.tensor(steps, dtype=torch.long, device=dev)
                z0k, nk = z0.expand(k, *z0.shape[1:]), noise.expand(k, *noise.shape[1:])
                z_t = sched.add_noise(z0k, nk, tt)
                target = nk if prediction == "epsilon" else sched.get_velocity(z0k, nk, tt)
                with torch.enable_grad():
                    pred = self._predict(z_t, tt, cond.expand(k, *cond.shape[1:]))  # type: ignore[attr-defined]
                    loss = (pred.float() - target.float()).pow(2).mean()
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                out[i] = [0.0 if g is None else float(g.detach().float().norm()) for g in grads]
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        return out
