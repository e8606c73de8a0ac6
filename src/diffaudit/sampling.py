"""Sampling a model into an ImageSet with provenance, batched, with per-image seeds.

Sampling is a pure function of (model, labels, seeds): a shard of a large audit is a range of seeds, and
shards merge by id. Batching never changes an image: sample ``i`` depends only on ``seeds[i]`` and ``labels[i]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffaudit.config import SampleConfig
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.models.diffusion import DiffusionModel
from diffaudit.progress import progress_bar


def parse_labels(spec: str, num_images: int, class_names: Sequence[str]) -> np.ndarray:
    """Labels for ``num_images`` samples from a spec.

    ``all``: cycle through every class (0, 1, ..., K-1, 0, ...); ``none``: unconditional (-1);
    ``3,5`` or ``A,B``: cycle through the listed class indices or names.
    """
    k = len(class_names)
    if spec == "none" or k == 0:
        return np.full(num_images, -1, dtype=np.int64)
    if spec == "all":
        chosen = list(range(k))
    else:
        chosen = []
        for item in spec.split(","):
            item = item.strip()
            if item in class_names:
                chosen.append(list(class_names).index(item))
            elif item.lstrip("-").isdigit() and 0 <= int(item) < k:
                chosen.append(int(item))
            else:
                raise ConfigError(
                    f"label {item!r} is neither a class name nor an index in [0, {k}); classes: {list(class_names)}"
                )
    return np.array([chosen[i % len(chosen)] for i in range(num_images)], dtype=np.int64)


def generate(
    model: DiffusionModel,
    model_id: str,
    labels: np.ndarray,
    seeds: Sequence[int],
    cfg: SampleConfig,
    class_names: Sequence[str] = (),
    generation: int = -1,
    show_progress: bool = True,
) -> ImageSet:
    """Sample ``len(seeds)`` images; returns a uint8 ImageSet whose provenance records model id and seeds.

    ``labels`` is ``int64 (N,)`` with -1 for unconditional; ``cfg`` picks sampler, steps, guidance, temperature.
    """
    labels = np.asarray(labels, dtype=np.int64)
    seeds = [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise ConfigError(f"got {len(labels)} labels for {len(seeds)} seeds")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {cfg.batch_size}")
    model.eval()
    chunks: list[torch.Tensor] = []
    with progress_bar("sample", total=len(seeds), enabled=show_progress) as bar:
        for start in range(0, len(seeds), cfg.batch_size):
            stop = min(start + cfg.batch_size, len(seeds))
            lab = torch.from_numpy(labels[start:stop]) if model.config.conditional else None
            x = model.sample(lab, seeds[start:stop], cfg.sampler, cfg.num_steps, cfg.guidance_scale, cfg.temperature)
            chunks.append(x.cpu())
            bar.update(completed=stop)
    x = (
        torch.cat(chunks)
        if chunks
        else torch.zeros((0, model.config.channels, model.config.resolution, model.config.resolution))
    )
    return ImageSet.from_model_tensor(
        x,
        labels,
        class_names,
        source=f"model:{model_id}",
        synthetic=True,
        generation=generation,
        model_id=model_id,
        seed=np.array(seeds, dtype=np.int64),
    )
