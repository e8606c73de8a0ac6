"""Bring your own model: a local diffusers text-to-image pipeline directory as a diffaudit model (``sd:PATH``).

The directory has the Stable Diffusion 1.x/2.x layout written by ``save_pretrained``: ``model_index.json`` and
the sub-folders ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``. It is read with
``local_files_only=True`` and ``use_safetensors=True``: pickled weights (``.bin``, ``.ckpt``, ``.pt``) are
refused before anything is loaded, because an audit tool opens other people's files.

:class:`SDModel` mirrors the small :class:`~diffaudit.models.diffusion.DiffusionModel`, with prompts in place of
class labels and VAE latents in place of pixels:

* ``per_sample_loss(z0, prompts, t, noise)`` is the noise-prediction error in latent space (membership
  inference at a fixed ``t``); ``encode_images`` maps pixels to those latents.
* ``sample(prompts, seeds, ...)`` generates with per-image seeds: latents of image ``i`` come from a
  ``torch.Generator`` seeded with ``seeds[i]`` and are passed to the pipeline as ``latents=``, so an image never
  depends on its batch. With ``init_images`` it is image-to-image (the self-consuming loop's generator).
* ``noise_gap(prompts, seeds)`` is Wen et al.'s detector: the norm of conditional minus unconditional noise
  prediction at the first sampling step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffaudit.errors import CheckpointError, ConfigError

#: Components a text-to-image pipeline directory must have.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: Weight files that are pickles (refused).
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SAMPLERS = ("ddim", "ddpm", "dpm++", "pipeline")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Offset between a seed's initial-noise generator and its stochastic-step generator (as the small model does).
_STEP_SEED_OFFSET = 1_000_003


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (what SD checkpoints ship for inference), fp32 on CPU (fp16 CPU kernels are slow
    or missing); or an explicit ``fp32``/``fp16``/``bf16``."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("dtype fp16 is not supported on CPU; use fp32 or bf16 (or auto)")
    return DTYPES[name]


def _weight_variant(folder: Path, name: str) -> str | None:
    """The safetensors variant to load from a weight folder (None = plain files); refuses pickles."""
    safes = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    if not safes:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder}: {name} weights are only in pickle format ({', '.join(pickles)}); diffaudit loads "
                "safetensors only. Convert them once in a trusted environment, e.g. "
                "pipe.save_pretrained(DIR, safe_serialization=True)"
            )
        raise CheckpointError(f"{folder}: no {name} weights (*.safetensors) found")
    plain = [s for s in safes if s.count(".") == 1 or s.endswith(".safetensors.index.json")]
    if plain:
        return None
    # e.g. diffusion_pytorch_model.fp16.safetensors: the variant is the middle part
    return safes[0].split(".")[-2]


def check_pipeline_dir(path: str | Path) -> dict[str, str | None]:
    """Validate a pipeline directory; returns ``{component: weight variant or None}``.

    Raises :class:`CheckpointError` naming the missing component or file, or the pickles that were refused.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a diffusers pipeline directory)")
    if not (path / "model_index.json").is_file():
        raise CheckpointError(
            f"{path}: no model_index.json; expected a diffusers pipeline directory saved with save_pretrained "
            "(single-file .safetensors/.ckpt checkpoints are not supported: convert them with diffusers first)"
        )
    variants: dict[str, str | None] = {}
    for comp in COMPONENTS:
        sub = path / comp
        if not sub.is_dir():
            raise CheckpointError(f"{path}: missing component {comp!r} (no {comp}/ folder); need {list(COMPONENTS)}")
        if comp == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                raise CheckpointError(f"{sub}: missing scheduler_config.json")
            continue
        if comp == "tokenizer":
            if not ((sub / "tokenizer.json").is_file() or (sub / "vocab.json").is_file()):
                raise CheckpointError(f"{sub}: missing tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
            continue
        if not (sub / "config.json").is_file():
            raise CheckpointError(f"{sub}: missing config.json of component {comp!r}")
        variants[comp] = _weight_variant(sub, comp)
    return variants


def pipeline_model_id(path: str | Path, variant: str | None = None) -> str:
    """Content id of a pipeline: SHA-256 of the U-Net config and weight bytes (16 hex digits, prefixed ``sd-``).

    The U-Net is what fine-tuning changes, so two directories with the same U-Net are the same model for an
    audit. Hashing a 3.4 GB fp32 U-Net takes a few seconds; it is streamed in 8 MiB chunks.
    """
    unet = Path(path) / "unet"
    digest = hashlib.sha256()
    digest.update((unet / "config.json").read_bytes())
    for f in sorted(unet.glob("*.safetensors")):
        if (variant is None) != (f.name.count(".") == 1):
            continue
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
    return "sd-" + digest.hexdigest()[:16]


def unet_state_id(unet: torch.nn.Module) -> str:
    """Content id of in-memory U-Net weights (after fine-tuning): SHA-256 of names, dtypes and bytes, ``sd-...``.

    Not equal to :func:`pipeline_model_id` of the same weights on disk (that hashes the file); it only has to
    change when the weights do.
    """
    digest = hashlib.sha256(b"state:")
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sd-" + digest.hexdigest()[:16]


def per_seed_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """``float32 (len(seeds), *shape)`` standard normal on CPU; row ``i`` depends only on ``seeds[i]``."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _scheduler(kind: str, config: dict[str, Any]):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "ddpm":
        return DDPMScheduler.from_config(config)
    if kind == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if kind == "pipeline":  # the scheduler class the directory ships with
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            raise CheckpointError(f"scheduler class {config.get('_class_name')!r} is not in this diffusers")
        return cls.from_config(config)
    raise ConfigError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}")


class SDModel:
    """A loaded text-to-image pipeline with diffaudit's model interface. Build with :func:`load_sd`."""

    def __init__(
        self, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any], model_id: str, path: Path
    ) -> None:
        from diffusers import DDPMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.path = path
        self.train_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = self.train_scheduler.config.prediction_type
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.resolution = int(unet.config.sample_size) * self.vae_scale_factor
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def describe(self) -> dict[str, Any]:
        """What was loaded, for run configs."""
        return {
            "path": str(self.path),
            "model_id": self.model_id,
            "resolution": self.resolution,
            "latent_shape": list(self.latent_shape),
            "prediction_type": self.prediction_type,
            "scheduler": self.scheduler_config.get("_class_name"),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
        }

    # ---- conditioning and latents -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(N, L, D)`` in the model dtype; ``""`` is the unconditional (null) prompt."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Scaled VAE latents ``(N, *latent_shape)`` of images ``x`` ``(N, 3, H, W)`` in [-1, 1].

        Without ``seeds`` the posterior mean is used (deterministic, what membership inference wants); with one
        seed per image, a posterior sample drawn from that seed.
        """
        if x.shape[1:] != (3, self.resolution, self.resolution):
            raise ConfigError(f"images must be (N, 3, {self.resolution}, {self.resolution}); got {tuple(x.shape)}")
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        if seeds is None:
            z = dist.mean
        else:
            eps = per_seed_noise(dist.mean.shape[1:], seeds).to(dist.mean)
            z = dist.mean + dist.std * eps
        return z * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` float32 in [-1, 1] from scaled latents."""
        return self.vae.decode(z.to(self.dtype) / self.scaling_factor).sample.float().clamp(-1, 1)

    # ---- the denoiser -----------------------------------------------------------------------------------
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """U-Net output ``(N, *latent_shape)`` for noisy latents at integer timesteps ``t (N,)``."""
        return self.unet(z_t.to(self.dtype), t.to(self.device), encoder_hidden_states=embeds).sample

    def _embeds(self, prompts: Sequence[str] | torch.Tensor, n: int) -> torch.Tensor:
        if isinstance(prompts, torch.Tensor):
            return prompts
        if len(prompts) != n:
            raise ConfigError(f"got {len(prompts)} prompts for {n} latents")
        return self.encode_prompts(prompts)

    def per_sample_loss(
        self, z0: torch.Tensor, prompts: Sequence[str] | torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared noise-prediction error per sample, ``float32 (N,)``, in latent space.

        ``z0`` are scaled latents ``(N, *latent_shape)`` (see :meth:`encode_images`), ``prompts`` one string per
        sample (or precomputed embeddings), ``t`` integer timesteps ``(N,)``, ``noise`` like ``z0``.
        """
        z0, noise = z0.to(self.device, self.dtype), noise.to(self.device, self.dtype)
        t = t.to(self.device)
        z_t = self.train_scheduler.add_noise(z0, noise, t)
        eps = self.predict_noise(z_t, t, self._embeds(prompts, z0.shape[0]))
        target = noise if self.prediction_type == "epsilon" else self.train_scheduler.get_velocity(z0, noise, t)
        return (eps.float() - target.float()).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def noise_gap(self, prompts: Sequence[str], seeds: Sequence[int], sampler: str = "ddim", num_steps: int = 50):
        """Wen et al. (ICLR 2024): ``||eps(z_T, c) - eps(z_T, null)||_2`` per sample, ``float64 (N,)``.

        Evaluated at the first timestep of the sampler on the per-seed initial latents; memorized prompts give
        large values. Averaging over several seeds per prompt is the caller's choice.
        """
        sched = _scheduler(sampler, self.scheduler_config)
        sched.set_timesteps(num_steps)
        t0 = sched.timesteps[0]
        z = per_seed_noise(self.latent_shape, seeds).to(self.device, self.dtype) * sched.init_noise_sigma
        z = sched.scale_model_input(z, t0)
        tt = torch.full((len(seeds),), int(t0), dtype=torch.long, device=self.device)
        cond = self.predict_noise(z, tt, self._embeds(prompts, len(seeds))).float()
        null = self.predict_noise(z, tt, self.encode_prompts([""] * len(seeds))).float()
        return (cond - null).flatten(1).norm(dim=1).double().cpu().numpy()

    # ---- sampling -----------------------------------------------------------------------------------------
    def pipeline(self, sampler: str = "ddim", img2img: bool = False):
        """A diffusers pipeline over this model's components with a fresh scheduler of kind ``sampler``."""
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        pipe = cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=_scheduler(sampler, self.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        init_images: torch.Tensor | None = None,
        strength: float = 0.5,
    ) -> torch.Tensor:
        """Generate ``len(seeds)`` images ``(N, 3, H, W)`` float32 in [-1, 1], one prompt per image.

        Image ``i`` depends only on ``prompts[i]``, ``seeds[i]`` (and ``init_images[i]``), never on the batch:
        its initial latents (or, for image-to-image, its VAE and forward-noise draws) come from generators
        seeded with ``seeds[i]``; stochastic sampler steps use ``seeds[i] + 1000003``. Guidance <= 1 disables
        classifier-free guidance.
        """
        if len(prompts) != len(seeds):
            raise ConfigError(f"got {len(prompts)} prompts for {len(seeds)} seeds")
        if not 1 <= num_steps <= self.train_scheduler.config.num_train_timesteps:
            raise ConfigError(f"num_steps must be in [1, {self.train_scheduler.config.num_train_timesteps}]")
        dev = self.device
        common = dict(
            prompt=list(prompts),
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            output_type="pt",
            height=self.resolution,
            width=self.resolution,
        )
        if init_images is None:
            latents = per_seed_noise(self.latent_shape, seeds).to(dev, self.dtype)
            gens = [torch.Generator(dev).manual_seed(int(s) + _STEP_SEED_OFFSET) for s in seeds]
            out = self.pipeline(sampler)(latents=latents, generator=gens, **common).images
        else:
            if not 0.0 < strength <= 1.0:
                raise ConfigError(f"strength must be in (0, 1], got {strength}")
            if init_images.shape[0] != len(seeds):
                raise ConfigError(f"got {init_images.shape[0]} init images for {len(seeds)} seeds")
            # img2img draws the VAE sample, then the forward noise, from each image's own generator in order.
            gens = [torch.Generator(dev).manual_seed(int(s)) for s in seeds]
            image01 = (init_images.float().clamp(-1, 1) + 1) / 2
            del common["height"], common["width"]
            out = self.pipeline(sampler, img2img=True)(
                image=image01.to(dev), strength=strength, generator=gens, **common
            )
            out = out.images
        return (out.float() * 2 - 1).clamp(-1, 1).cpu()


def load_sd(path: str | Path, device: str = "auto", dtype: str = "auto") -> SDModel:
    """Load a pipeline directory (``sd:PATH`` or ``PATH``) as an :class:`SDModel`, safetensors only.

    ``device`` ``auto`` picks CUDA when available; ``dtype`` ``auto`` is fp16 on CUDA and fp32 on CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(str(path).removeprefix("sd:"))
    variants = check_pipeline_dir(path)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    torch_dtype = resolve_dtype(dtype, dev)
    common = dict(local_files_only=True, use_safetensors=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", variant=variants["unet"], torch_dtype=torch_dtype, **common
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", variant=variants["vae"], torch_dtype=torch_dtype, **common
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path / "text_encoder", variant=variants["text_encoder"], dtype=torch_dtype, **common
        )
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: could not load the pipeline ({type(exc).__name__}: {exc})") from exc
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae, text_encoder):
        module.to(dev).eval().requires_grad_(False)
    return SDModel(
        unet, vae, text_encoder, tokenizer, scheduler_config, pipeline_model_id(path, variants["unet"]), path
    )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 (N, 3, H, W)`` -> ``float32`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
