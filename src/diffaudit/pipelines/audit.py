"""Audits of a text-to-image pipeline: sampling into an ImageSet, loss-threshold membership inference in latent
space, and the SD v1 invisible watermark. (Extraction runs on any generator: ``diffaudit extract``, i.e.
:func:`diffaudit.attacks.extraction_run.run_extract`.)

Every function is pure over (model, prompts, seeds) so a large audit can be sharded by prompt or seed range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.pipelines.sd import SDModel, images_to_tensor, per_seed_noise
from diffaudit.progress import progress_bar

#: Watermarks ``generate_sd`` can apply: none, or Stable Diffusion v1's dwtDct "StableDiffusionV1".
WATERMARKS = ("none", "sd-v1")
#: dwtDct needs images of at least this side.
WATERMARK_MIN_SIDE = 256


def generate_sd(
    model: SDModel,
    prompts: Sequence[str],
    labels: np.ndarray,
    seeds: Sequence[int],
    sampler: str = "ddim",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    watermark: str = "none",
    init_images: np.ndarray | None = None,
    strength: float = 0.5,
    generation: int = -1,
    show_progress: bool = True,
) -> ImageSet:
    """Generate one image per (label, seed): ``labels`` ``int64 (N,)`` index into ``prompts``.

    Returns a uint8 RGB ImageSet with ``class_names = prompts``, labels = prompt index, and provenance
    (``model:<id>``, synthetic, seed per image, ``tag`` "sd-v1" when watermarked). ``init_images`` ``uint8
    (N, 3, H, W)`` switches to image-to-image at ``strength``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    seeds = [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise ConfigError(f"got {len(labels)} labels for {len(seeds)} seeds")
    if labels.size and (labels.min() < 0 or labels.max() >= len(prompts)):
        raise ConfigError(f"labels must index the {len(prompts)} prompts")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if watermark not in WATERMARKS:
        raise ConfigError(f"unknown watermark {watermark!r}; choose one of {WATERMARKS}")
    if watermark != "none" and model.resolution < WATERMARK_MIN_SIDE:
        raise ConfigError(
            f"the {watermark} watermark (dwtDct) needs images of at least {WATERMARK_MIN_SIDE} px; this model makes "
            f"{model.resolution} px images"
        )
    chunks: list[np.ndarray] = []
    with progress_bar("sample", total=len(seeds), enabled=show_progress) as bar:
        for start in range(0, len(seeds), batch_size):
            stop = min(start + batch_size, len(seeds))
            init = None if init_images is None else images_to_tensor(init_images[start:stop])
            x = model.sample(
                [prompts[i] for i in labels[start:stop]],
                seeds[start:stop],
                sampler,
                num_steps,
                guidance_scale,
                init_images=init,
                strength=strength,
            )
            chunks.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
            bar.update(completed=stop)
    res = model.resolution
    images = np.concatenate(chunks) if chunks else np.zeros((0, 3, res, res), np.uint8)
    if watermark != "none" and len(images):
        from diffaudit.guards.tagging import DwtDctTagger

        images = DwtDctTagger(watermark).embed(images)
    return ImageSet(
        images,
        labels,
        tuple(prompts),
        {
            "source": f"model:{model.model_id}",
            "synthetic": True,
            "generation": generation,
            "model_id": model.model_id,
            "seed": np.array(seeds, dtype=np.int64),
            "tag": "" if watermark == "none" else watermark,
        },
    )


# ---- membership inference -----------------------------------------------------------------------------------


def _seed_of_id(image_id: str, seed: int) -> int:
    # Noise keyed by the image's content id, not its position: a member's loss does not depend on set order.
    return (int(image_id[:12], 16) ^ seed) & 0x7FFFFFFFFFFF


@torch.no_grad()
def latent_losses(
    model: SDModel,
    images: ImageSet,
    captions: Sequence[str],
    t: int = 100,
    num_noise: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
) -> np.ndarray:
    """Per-image loss ``float64 (N,)`` at timestep ``t`` in latent space, averaged over ``num_noise`` draws.

    Latents are the VAE posterior means; noise draw ``k`` of an image is seeded from its content id, ``seed``
    and ``k``, so the result is independent of order and batching.
    """
    if len(captions) != len(images):
        raise ConfigError(f"got {len(captions)} captions for {len(images)} images")
    if not 0 <= t < model.train_scheduler.config.num_train_timesteps:
        raise ConfigError(f"t must be in [0, {model.train_scheduler.config.num_train_timesteps}), got {t}")
    if num_noise < 1:
        raise ConfigError(f"num_noise must be >= 1, got {num_noise}")
    out = np.zeros(len(images))
    with progress_bar("losses", total=len(images), enabled=show_progress) as bar:
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            z0 = model.encode_images(images_to_tensor(images.images[start:stop]))
            embeds = model.encode_prompts(list(captions[start:stop]))
            tt = torch.full((stop - start,), t, dtype=torch.long)
            for k in range(num_noise):
                seeds = [_seed_of_id(i, seed * 1009 + k) for i in images.ids[start:stop]]
                noise = per_seed_noise(model.latent_shape, seeds)
                out[start:stop] += model.per_sample_loss(z0, embeds, tt, noise).double().cpu().numpy()
            bar.update(completed=stop)
    return out / num_noise
