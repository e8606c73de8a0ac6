"""A user's diffusers text-to-image pipeline directory as a Generator (Stable Diffusion 1.x/2.x layout).

The denoising happens in VAE latent space: images are encoded to the scaled posterior mean (or a posterior
sample seeded per image, for image-to-image), conditions are prompts encoded by the CLIP text encoder (the null
condition is the empty prompt, as in diffusers' pipelines), and the U-Net predicts the noise (or velocity).
Sampling, the loss and the guidance gap are the shared ones of
:class:`~diffaudit.generators.denoising.DenoisingGenerator`; with DDIM and the same initial latents they equal
diffusers' ``StableDiffusionPipeline`` (tested).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffaudit.errors import CheckpointError, ConfigError
from diffaudit.generators.base import seeded_noise
from diffaudit.generators.denoising import DenoisingGenerator
from diffaudit.generators.pipeline_dir import (
    check_pipeline_dir,
    pipeline_model_id,
    resolve_dtype,
    strip_prefix,
    unet_state_id,
)

FAMILY = "pipeline"


class PipelineGenerator(DenoisingGenerator):
    """Loaded pipeline components plus the prompts it samples from (build with :meth:`load`)."""

    pixel_space = False
    conditional = True
    #: Stable Diffusion pipelines' own default guidance (diffusers' StableDiffusionPipeline).
    default_guidance_scale = 7.5

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        model_id: str,
        conditions: Sequence[str] = (),
        path: Path | None = None,
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.path = path
        self.conditions = tuple(str(c) for c in conditions)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = int(unet.config.sample_size)
        self.latent_shape = (int(unet.config.in_channels), side, side)
        self.image_shape = (3, side * self.vae_scale_factor, side * self.vae_scale_factor)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self._embeddings: dict[str, torch.Tensor] = {}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        conditions: Sequence[str] = (),
        device: str | torch.device | None = None,
        dtype: str = "auto",
    ) -> PipelineGenerator:
        """Load ``PATH`` or ``sd:PATH`` with ``local_files_only`` and safetensors only (pickles refused).

        ``device`` follows :func:`diffaudit.device.resolve_device`; ``dtype`` ``auto`` is fp16 on CUDA (what SD
        checkpoints ship for inference) and fp32 on CPU.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffaudit.device import resolve_device

        root = strip_prefix(path)
        variants = check_pipeline_dir(root)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        common = dict(local_files_only=True, use_safetensors=True)
        try:
            unet = UNet2DConditionModel.from_pretrained(
                root, subfolder="unet", variant=variants["unet"], torch_dtype=torch_dtype, **common
            )
            vae = AutoencoderKL.from_pretrained(
                root, subfolder="vae", variant=variants["vae"], torch_dtype=torch_dtype, **common
            )
            text_encoder = CLIPTextModel.from_pretrained(
                root / "text_encoder", variant=variants["text_encoder"], dtype=torch_dtype, **common
            )
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
            scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{root}: could not load the pipeline ({type(exc).__name__}: {exc})") from exc
        if not isinstance(scheduler_config, dict):
            raise CheckpointError(f"{root / 'scheduler' / 'scheduler_config.json'}: not a JSON object")
        for module in (unet, vae, text_encoder):
            module.to(dev).eval().requires_grad_(False)
        model_id = pipeline_model_id(root, variants["unet"])
        return cls(unet, vae, text_encoder, tokenizer, scheduler_config, model_id, conditions, root)

    # ---- hooks -------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(N, L, D)`` in the model dtype; ``""`` is the null prompt. Cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            tok = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            emb = self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
            self._embeddings.update({p: emb[i : i + 1] for i, p in enumerate(missing)})
        if not prompts:
            return torch.zeros((0, 1, 1), dtype=self.dtype, device=self.device)
        return torch.cat([self._embeddings[p] for p in prompts])

    def _condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.encode_prompts([self.conditions[i] if i >= 0 else "" for i in labels.tolist()])

    @torch.no_grad()
    def _encode(self, x: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Scaled VAE latents of images in [-1, 1]: the posterior mean, or with ``seeds`` a seeded sample."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ConfigError(f"images must be (N, {', '.join(map(str, self.image_shape))}); got {tuple(x.shape)}")
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        z = dist.mean
        if seeds is not None:
            z = z + dist.std * seeded_noise(z.shape[1:], seeds).to(z)
        return z * self.scaling_factor

    @torch.no_grad()
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.dtype) / self.scaling_factor).sample.float()

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t.to(self.dtype), t, encoder_hidden_states=cond).sample

    # ---- protocol ----------------------------------------------------------------------------------------------
    def with_conditions(self, conditions: Sequence[str]) -> PipelineGenerator:
        """The same loaded model sampling from other prompts (shares the modules and the prompt cache)."""
        other = copy.copy(self)
        other.conditions = tuple(str(c) for c in conditions)
        return other

    def describe(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "model_id": self.model_id,
            "path": str(self.path) if self.path else None,
            "resolution": self.image_shape[-1],
            "latent_shape": list(self.latent_shape),
            "prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
            "scheduler": self.scheduler_config.get("_class_name"),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "num_conditions": len(self.conditions),
        }

    def refresh_id(self) -> None:
        """Recompute :attr:`model_id` from the in-memory U-Net (after fine-tuning, it is a new model)."""
        self.model_id = unet_state_id(self.unet)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the whole pipeline with ``save_pretrained(safe_serialization=True)`` (a loadable directory)."""
        import diffusers
        from diffusers import StableDiffusionPipeline

        sched_cls = getattr(diffusers, str(self.scheduler_config.get("_class_name", "DDIMScheduler")), None)
        sched_cls = sched_cls or diffusers.DDIMScheduler
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=sched_cls.from_config(self.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(directory), safe_serialization=True)
