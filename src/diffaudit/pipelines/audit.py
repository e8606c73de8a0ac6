"""Audits of a text-to-image pipeline: sampling into an ImageSet and the SD v1 invisible watermark. (Extraction
and membership inference run on any generator: ``diffaudit extract``, i.e.
:func:`diffaudit.attacks.extraction_run.run_extract`, and ``diffaudit mia``, i.e. :mod:`diffaudit.attacks.mia_run`.)

Every function is pure over (model, prompts, seeds) so a large audit can be sharded by prompt or seed range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.pipelines.sd import SDModel, images_to_tensor
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
