"""Audits of a text-to-image pipeline: sampling into an ImageSet, prompt extraction (Carlini et al. Sec. 4),
loss-threshold membership inference in latent space, and the SD v1 invisible watermark.

Every function is pure over (model, prompts, seeds) so a large audit can be sharded by prompt or seed range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


# ---- extraction ---------------------------------------------------------------------------------------------

#: Extra keys this module adds to :mod:`diffaudit.attacks.extraction`'s per-label records.
KEY_PROMPT_INDEX = "prompt_index"
KEY_MEMBER_IDS = "member_ids"  # content ids of the largest clique's generations
KEY_NOISE_GAP = "noise_gap"  # Wen et al.'s score, filled in by the CLI when asked


def extract_prompts(
    generations: ImageSet,
    edge_threshold: float = 0.1,
    min_clique: int = 10,
    grid: int = 4,
    train: ImageSet | None = None,
    delta: float = 0.15,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Carlini et al.'s generate-and-filter step over generations grouped by prompt (label = prompt index).

    Delegates to :mod:`diffaudit.attacks.extraction`: per prompt, tiled L2 (``grid x grid`` tiles, full
    resolution), an edge below ``edge_threshold``, the exact largest clique (flagged at ``>= min_clique``),
    and with ``train`` the clique medoid's nearest training image (extracted when normalized L2 ``<= delta``).
    Returns one record per prompt (keys of that module, ``label_name`` = the prompt, plus :data:`KEY_PROMPT_INDEX`
    and :data:`KEY_MEMBER_IDS`), flagged prompts first by mean distance inside the clique.
    """
    from diffaudit.attacks import extraction as ex

    params = ex.ExtractionParams(grid=grid, edge_threshold=edge_threshold, min_clique=min_clique, delta=delta)
    rows: list[dict[str, Any]] = []
    prompts = generations.class_names
    present = sorted(set(generations.labels.tolist()))
    with progress_bar("extract", total=len(present), enabled=show_progress) as bar:
        for done, p in enumerate(present, 1):
            idx = np.flatnonzero(generations.labels == p)
            sub = generations.subset(idx)
            name = prompts[p] if 0 <= p < len(prompts) else ""
            if train is not None:
                row = ex.scan_label(sub, train, params, label=p, label_name=name)
            else:
                cliques = ex.find_cliques(sub, params)
                for c in cliques:
                    for key in ex.CLIQUE_KEYS:
                        c.setdefault(key, None)
                seeds = sub.provenance["seed"]
                row = {
                    ex.LABEL: int(p),
                    ex.LABEL_NAME: name,
                    ex.NUM_GENERATED: len(sub),
                    ex.SEEDS: [int(seeds.min()), int(seeds.max())] if len(seeds) else [],
                    **{k: cliques[0][k] for k in ex.CLIQUE_KEYS},
                    ex.CLIQUES: cliques,
                }
            row[KEY_PROMPT_INDEX] = int(p)
            row[KEY_MEMBER_IDS] = sub.ids[np.asarray(row[ex.MEMBERS], dtype=np.int64)].tolist()
            rows.append(row)
            bar.update(completed=done)
    rows.sort(key=lambda r: (not r[ex.FLAGGED], r[ex.MEAN_DISTANCE] or 0.0, r[KEY_PROMPT_INDEX]))
    return rows


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
