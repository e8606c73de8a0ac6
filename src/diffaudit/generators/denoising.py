"""Samplers, the denoising loss and the guidance gap, written once for every noise-predicting network.

:class:`DenoisingGenerator` is the shared half of every diffusion generator (lucidrains' ``GaussianDiffusion``
and EDM's preconditioning wrappers in spirit: the loss and the sampler are written once, the network is a
parameter). A subclass supplies five hooks:

* ``latent_shape``: the shape the network denoises (pixels for our U-Net, VAE latents for a pipeline);
* ``_encode(x, seeds)`` / ``_decode(z)``: images in [-1, 1] <-> that space (identity for pixel models);
* ``_condition(labels)``: the network's conditioning for ``int64`` labels, -1 meaning null;
* ``_predict(z_t, t, cond)``: the network output (noise, or velocity for v-prediction models);
* ``scheduler_config``: the diffusers noise-schedule config the network was trained with.

Noise schedules and sampler steps are diffusers' schedulers (:mod:`.schedulers`), never rewritten here.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import (
    IMG2IMG_SEED_OFFSET,
    NULL_CONDITION,
    STEP_SEED_OFFSET,
    check_requests,
    seeded_noise,
    synthetic_set,
    to_model_tensor,
    to_uint8,
)
from diffaudit.generators.queries import DenoisingQueries
from diffaudit.generators.schedulers import img2img_timesteps, make_scheduler, training_scheduler
from diffaudit.progress import progress_bar

#: Names accepted by :func:`guidance_scales`.
GUIDANCE_SCHEDULES = ("constant", "linear")


def guidance_scales(w: float, num_steps: int, schedule: str = "constant") -> list[float]:
    """Guidance scale of each of ``num_steps`` sampling steps (first = noisiest).

    ``constant``: ``w`` at every step. ``linear``: rising linearly from 1 (no guidance) at the first step to
    ``2w - 1`` at the last, so the mean over the steps is ``w``: the increasing schedule Wang et al. (2024) found
    best, used by ReDiFine-style CFG scheduling to keep early (layout-setting) steps diverse.
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ConfigError(f"guidance schedule {schedule!r} is not one of {list(GUIDANCE_SCHEDULES)}")
    if schedule == "constant" or num_steps < 2:
        return [float(w)] * num_steps
    return [1.0 + (float(w) - 1.0) * 2.0 * i / (num_steps - 1) for i in range(num_steps)]


#: Reduced-precision autocast options of :class:`SampleSpeed`.
AUTOCAST_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SampleSpeed:
    """Optional sampling speed-ups of a denoising generator; all off by default (results then stay bit for bit).

    ``channels_last``: NHWC memory format for 4-D network inputs and the generator's networks' conv weights
    (the modules are converted in place, once; values are unchanged). ``compile``: ``torch.compile`` the network
    call with ``compile_backend`` (minutes of compilation on a small CPU; pays off for long runs on a GPU).
    ``autocast``: ``fp16`` / ``bf16`` autocast of the network on CUDA; on other devices it is accepted, recorded
    and not applied (``autocast_active`` in :meth:`DenoisingGenerator.sampling_record`). None of them changes which
    noise an image draws: image ``i`` still depends on ``seeds[i]`` only (up to the usual float rounding).
    """

    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    autocast: str = "none"

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"autocast {self.autocast!r} is not one of {list(AUTOCAST_DTYPES)}")


class DenoisingGenerator(DenoisingQueries):
    """Shared sampling, loss and guidance-gap logic over the hooks listed in the module docstring.

    Attack queries beyond the loss (noise prediction, DDIM steps, per-sample gradients) come from
    :class:`~diffaudit.generators.queries.DenoisingQueries`."""

    model_id: str = ""
    conditions: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = (1, 8, 8)
    latent_shape: tuple[int, ...] = (1, 8, 8)
    scheduler_config: dict[str, Any] = {}
    #: Whether the network is class/text conditional (guidance and the guidance gap need it).
    conditional: bool = True
    #: Pixel-space models threshold DPM-Solver++'s x0 predictions to [-1, 1]; latent models must not.
    pixel_space: bool = True
    #: Guidance used when a command is not told one (diffaudit's presets sample at 2.0).
    default_guidance_scale: float = 2.0
    #: Optional ``hook(generator, output, z_t, t) -> output`` applied to the guided network output at every sampling
    #: step (anti-memorization guidance, :mod:`diffaudit.guards.mitigations`); set on a copy, never on a shared one.
    sampling_hook: Any = None
    #: Optional speed-ups of :meth:`sample` (set with :meth:`with_sample_speed`, on a copy).
    sample_speed: SampleSpeed = SampleSpeed()

    # ---- hooks (subclasses) ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _encode(self, x: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.float()

    def _condition(self, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def condition_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """The conditioning as a float tensor ``_predict`` accepts in place of ``_condition(labels)``.

        Text embeddings ``(N, L, D)`` for pipelines; families whose ``_condition`` is not continuous (class
        labels) override this. Wen et al.'s inference-time mitigation optimises it.
        """
        cond = self._condition(labels)
        if not cond.is_floating_point():
            raise ConfigError(f"{type(self).__name__} has no continuous condition embedding to optimise")
        return cond

    def _sampling_condition(self, labels: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The conditioning of one sampling batch (requests ``(labels[i], seeds[i])``); a copy may override it."""
        return self._condition(labels)

    # ---- sampling speed-ups (optional) -------------------------------------------------------------------------
    def with_sample_speed(self, speed: SampleSpeed | None = None, **options: Any) -> DenoisingGenerator:
        """A copy that samples with ``speed`` (or ``SampleSpeed(**options)``); the original is unchanged."""
        speed = speed if speed is not None else SampleSpeed(**options)
        other = copy.copy(self)
        other.sample_speed = speed
        other.__dict__.pop("_compiled_predict", None)
        if speed.channels_last:
            for module in vars(other).values():
                if isinstance(module, torch.nn.Module):
                    module.to(memory_format=torch.channels_last)
        return other

    def sampling_record(self) -> dict[str, Any]:
        """The speed settings as applied on this generator's device (for run configs and provenance)."""
        speed = self.sample_speed
        return asdict(speed) | {"autocast_active": speed.autocast != "none" and self.device.type == "cuda"}

    def _speed_predict(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``_predict`` under the :class:`SampleSpeed` settings (exactly ``_predict`` when they are all off)."""
        speed = self.sample_speed
        if speed == SampleSpeed():
            return self._predict(z, t, cond)
        predict = self._predict
        if speed.compile:
            predict = self.__dict__.get("_compiled_predict")
            if predict is None:
                predict = torch.compile(self._predict, backend=speed.compile_backend, dynamic=False)
                self.__dict__["_compiled_predict"] = predict
        if speed.channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        ctx = contextlib.nullcontext()
        if self.sampling_record()["autocast_active"]:
            ctx = torch.autocast("cuda", dtype=AUTOCAST_DTYPES[speed.autocast])
        with ctx:
            out = predict(z, t, cond)
        return out.to(z.dtype).contiguous()

    # ---- derived ---------------------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def _guided(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, w: float):
        """Classifier-free guidance ``eps_null + w (eps_cond - eps_null)``; one network pass when ``w == 1``."""
        if not self.conditional or w == 1.0:
            return self._speed_predict(z, t, cond)
        both = self._speed_predict(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, null]))
        eps_cond, eps_null = both.chunk(2)
        return eps_null + w * (eps_cond - eps_null)

    @torch.inference_mode()
    def _sample_batch(
        self,
        labels: np.ndarray,
        seeds: Sequence[int],
        init: np.ndarray | None,
        strength: float,
        sampler: str,
        num_steps: int,
        guidance_scale: float,
        temperature: float,
        guidance_schedule: str = "constant",
    ) -> torch.Tensor:
        dev = self.device
        sched = make_scheduler(sampler, self.scheduler_config, num_steps, self.pixel_space)
        timesteps = sched.timesteps
        noise = seeded_noise(self.latent_shape, seeds).to(dev, self.dtype)
        if init is None:
            z = noise * temperature * sched.init_noise_sigma
        else:
            # Image-to-image (SDEdit, as diffusers' img2img pipelines do it): encode, noise to the timestep that
            # ``strength`` selects, and run the remaining steps. The forward noise comes from a stream of its own.
            timesteps = img2img_timesteps(sched, num_steps, strength)
            z0 = self._encode(to_model_tensor(init), seeds)
            fwd = seeded_noise(self.latent_shape, [int(s) + IMG2IMG_SEED_OFFSET for s in seeds]).to(dev, self.dtype)
            t0 = timesteps[:1].repeat(len(seeds))
            z = sched.add_noise(z0, fwd * temperature, t0) if len(timesteps) else z0
        generators = [torch.Generator().manual_seed(int(s) + STEP_SEED_OFFSET) for s in seeds]
        lab = torch.from_numpy(labels).to(dev)
        cond = self._sampling_condition(lab, seeds)
        null = self._condition(torch.full_like(lab, NULL_CONDITION)) if self.conditional else cond
        scales = guidance_scales(guidance_scale, len(timesteps), guidance_schedule)
        for t, w in zip(timesteps, scales, strict=True):
            tt = torch.full((z.shape[0],), int(t), dtype=torch.long, device=dev)
            eps = self._guided(sched.scale_model_input(z, t), tt, cond, null, w)
            if self.sampling_hook is not None:
                eps = self.sampling_hook(self, eps, z, int(t))
            if sampler == "ddpm":
                states = [g.get_state() for g in generators]
                z_prev = sched.step(eps, t, z, generator=generators).prev_sample
                if temperature != 1.0 and int(t) > 0:
                    # Rescale only the freshly added noise sigma_t * n: redraw n from the same generator states
                    # (DDPM's fixed-small variance; diffusers exposes no mean-only step).
                    n = torch.stack(
                        [torch.randn(z.shape[1:], generator=torch.Generator().set_state(s)) for s in states]
                    )
                    sigma = sched._get_variance(t) ** 0.5
                    z_prev = z_prev + (temperature - 1.0) * sigma * n.to(z_prev)
                z = z_prev
            else:
                z = sched.step(eps, t, z).prev_sample
        return self._decode(z).clamp(-1, 1).float()

    # ---- the Generator protocol ------------------------------------------------------------------------------
    def sample(
        self,
        labels: np.ndarray,
        seeds: Sequence[int],
        *,
        init: np.ndarray | None = None,
        strength: float = 1.0,
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        batch_size: int = 64,
        generation: int = -1,
        show_progress: bool = False,
        guidance_schedule: str = "constant",
    ) -> ImageSet:
        """Generate one image per ``(labels[i], seeds[i])``; a uint8 ImageSet with provenance.

        ``guidance_schedule`` ``"linear"`` varies the guidance over the steps (:func:`guidance_scales`).

        ``labels`` ``int64 (N,)`` index :attr:`conditions` (-1: null). ``init`` ``uint8 (N, C, H, W)`` switches to
        image-to-image at ``strength`` in (0, 1] (1 = from pure noise). ``temperature`` scales the initial and the
        stochastic-step noise (< 1 trades diversity for fidelity). Guidance 1 means no classifier-free guidance.
        Image ``i`` draws its initial noise from ``seeds[i]``, its DDPM step noise from ``seeds[i] + 1000003``
        and its img2img forward noise from ``seeds[i] + 2000003``: batching never changes an image.
        """
        seeds = [int(s) for s in seeds]
        labels = check_requests(labels, seeds, len(self.conditions))
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if init is not None:
            if not 0.0 < strength <= 1.0:
                raise ConfigError(f"strength must be in (0, 1], got {strength}")
            if init.shape != (len(seeds), *self.image_shape) or init.dtype != np.uint8:
                raise ConfigError(
                    f"init images must be uint8 {(len(seeds), *self.image_shape)}; got {init.dtype} {init.shape}"
                )
        chunks: list[np.ndarray] = []
        with progress_bar("sample", total=len(seeds), enabled=show_progress) as bar:
            for start in range(0, len(seeds), batch_size):
                stop = min(start + batch_size, len(seeds))
                x = self._sample_batch(
                    labels[start:stop],
                    seeds[start:stop],
                    None if init is None else init[start:stop],
                    strength,
                    sampler,
                    num_steps,
                    guidance_scale,
                    temperature,
                    guidance_schedule,
                )
                chunks.append(to_uint8(x))
                bar.update(completed=stop)
        images = np.concatenate(chunks) if chunks else np.zeros((0, *self.image_shape), np.uint8)
        return synthetic_set(images, labels, self.conditions, self.model_id, seeds, generation)

    @torch.inference_mode()
    def denoising_losses(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        timesteps: Sequence[int],
        noise_seeds: Sequence[int],
        *,
        flip: bool = False,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Per-image training loss ``float32 (N, T)``: mean squared error of the network's target prediction.

        ``images`` ``uint8 (N, C, H, W)``, ``labels`` ``int64 (N,)`` (-1 null), ``timesteps`` integer ``t``
        values, ``noise_seeds`` one per image: the noise of image ``i`` is drawn from ``noise_seeds[i]`` (in the
        network's space) and shared across the timesteps. ``flip`` mirrors the image and its noise horizontally.
        Images are encoded deterministically (a VAE's posterior mean). Independent of order and batching.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim != 4 or images.shape[1:] != tuple(self.image_shape) or images.dtype != np.uint8:
            raise ConfigError(f"images must be uint8 (N, {', '.join(map(str, self.image_shape))}); got {images.shape}")
        if len(labels) != len(images) or len(noise_seeds) != len(images):
            raise ConfigError(f"need one label and one noise seed per image ({len(images)} images)")
        bad = [int(t) for t in timesteps if not 0 <= int(t) < self.num_train_timesteps]
        if bad:
            raise ConfigError(f"timesteps {bad} outside [0, {self.num_train_timesteps})")
        sched = training_scheduler(self.scheduler_config)
        prediction = sched.config.prediction_type
        out = np.empty((len(images), len(timesteps)), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            x = to_model_tensor(images[start:stop])
            noise = seeded_noise(self.latent_shape, noise_seeds[start:stop])
            if flip:
                x, noise = x.flip(-1), noise.flip(-1)
            z0 = self._encode(x)
            noise = noise.to(z0.device, z0.dtype)
            cond = self._condition(torch.from_numpy(labels[start:stop]).to(self.device))
            for j, t in enumerate(timesteps):
                tt = torch.full((stop - start,), int(t), dtype=torch.long, device=z0.device)
                z_t = sched.add_noise(z0, noise, tt)
                target = noise if prediction == "epsilon" else sched.get_velocity(z0, noise, tt)
                pred = self._predict(z_t, tt, cond)
                out[start:stop, j] = (pred.float() - target.float()).pow(2).flatten(1).mean(1).cpu().numpy()
        return out

    def denoising_loss(
        self, images: np.ndarray, labels: np.ndarray, t: int, noise_seeds: Sequence[int], batch_size: int = 64
    ) -> np.ndarray:
        """The loss at one timestep, ``float32 (N,)`` (see :meth:`denoising_losses`)."""
        return self.denoising_losses(images, labels, [t], noise_seeds, batch_size=batch_size)[:, 0]

    @torch.inference_mode()
    def guidance_gap(
        self,
        labels: np.ndarray,
        seeds: Sequence[int],
        *,
        num_steps: int = 50,
        measure_steps: int = 10,
        guidance_scale: float = 2.0,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Wen et al. (ICLR 2024): the text/class-conditional noise gap, ``float64 (N,)``.

        For each ``(labels[i], seeds[i])`` a DDIM trajectory of ``num_steps`` steps with guidance
        ``guidance_scale`` starts from the seed's initial noise; the statistic is the RMS of
        ``eps(z_t, c) - eps(z_t, null)`` averaged over its first ``measure_steps`` steps (where the paper finds
        the signal strongest). Memorized conditions give large values.
        """
        seeds = [int(s) for s in seeds]
        labels = check_requests(labels, seeds, len(self.conditions))
        if not self.conditional:
            raise ConfigError("the guidance gap needs a conditional generator (condition vs null prediction)")
        if not 1 <= measure_steps <= num_steps:
            raise ConfigError(f"measure_steps must be in [1, num_steps={num_steps}], got {measure_steps}")
        if labels.size and labels.min() < 0:
            raise ConfigError("the guidance gap is defined for real conditions, not the null condition (-1)")
        out = np.zeros(len(seeds), dtype=np.float64)
        dev = self.device
        for start in range(0, len(seeds), batch_size):
            stop = min(start + batch_size, len(seeds))
            sched = make_scheduler("ddim", self.scheduler_config, num_steps, self.pixel_space)
            z = seeded_noise(self.latent_shape, seeds[start:stop]).to(dev, self.dtype) * sched.init_noise_sigma
            lab = torch.from_numpy(labels[start:stop]).to(dev)
            cond, null = self._condition(lab), self._condition(torch.full_like(lab, NULL_CONDITION))
            for t in sched.timesteps[:measure_steps]:
                tt = torch.full((stop - start,), int(t), dtype=torch.long, device=dev)
                zin = sched.scale_model_input(z, t)
                eps_c, eps_n = self._predict(torch.cat([zin, zin]), torch.cat([tt, tt]), torch.cat([cond, null])).chunk(
                    2
                )
                gap = (eps_c.float() - eps_n.float()).flatten(1).pow(2).mean(1).sqrt()
                out[start:stop] += gap.double().cpu().numpy()
                z = sched.step(eps_n + guidance_scale * (eps_c - eps_n), t, z).prev_sample
        return out / measure_steps
