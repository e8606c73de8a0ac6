"""``run_sample``: sample any generator into a run directory (images with provenance, a grid, a guard record).

Sampling is a pure function of (generator, labels, seeds): a shard of a large audit is a range of seeds, and
shards merge by id. Image ``i`` depends only on ``labels[i]`` and ``seeds[i]``. Layout::

    RUN/manifest.json, config.json      kind "sample"; the resolved settings and the generator's description
    RUN/samples.npz                      the ImageSet (uint8 NCHW, labels = condition index, provenance)
    RUN/grid.png                         a grid of the first images
    RUN/guard.json                       with a copy filter: every blocked attempt and re-sample
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.config import SampleConfig
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import Generator

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
GUARD_FILE = "guard.json"
#: Watermarks sampling can apply: none, or Stable Diffusion v1's dwtDct "StableDiffusionV1".
WATERMARKS = ("none", "sd-v1")
#: dwtDct needs images of at least this side.
WATERMARK_MIN_SIDE = 256
#: Requests above this many bytes of output images are refused up front (a typo like 10**9 images).
MAX_OUTPUT_BYTES = 64 << 30


def sample_options(cfg: SampleConfig) -> dict[str, Any]:
    """Keyword arguments of :meth:`Generator.sample` from a preset's sample section."""
    return {
        "sampler": cfg.sampler,
        "num_steps": cfg.num_steps,
        "guidance_scale": cfg.guidance_scale,
        "temperature": cfg.temperature,
        "batch_size": cfg.batch_size,
    }


@dataclass(frozen=True)
class SampleRunConfig:
    """What ``diffaudit sample`` does. ``labels``: ``all``, ``none`` or a comma list of condition names/indices.

    ``num_per_condition`` > 0 samples that many images of each selected condition (seeds from
    :func:`~diffaudit.generators.select.per_condition_seeds`: a prompts file may fix a prompt's first seed);
    otherwise ``num_images`` images cycle through the selected conditions with seeds ``seed .. seed + N - 1``.
    """

    model: str
    prompts: str | None = None
    labels: str = "all"
    num_images: int = 100
    num_per_condition: int = 0
    seed: int = 0
    sample: SampleConfig = SampleConfig()
    guard: str | None = None
    guard_retries: int = 5
    watermark: str = "none"
    dtype: str = "auto"

    def validate(self) -> None:
        if self.num_images < 1 and self.num_per_condition < 1:
            raise ConfigError(f"num_images must be >= 1, got {self.num_images}")
        if self.num_per_condition < 0:
            raise ConfigError(f"num_per_condition must be >= 0, got {self.num_per_condition}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.watermark not in WATERMARKS:
            raise ConfigError(f"unknown watermark {self.watermark!r}; choose one of {WATERMARKS}")
        if self.guard_retries < 0:
            raise ConfigError(f"guard_retries must be >= 0, got {self.guard_retries}")
        if self.sample.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.sample.batch_size}")


def plan_requests(cfg: SampleRunConfig, gen: Generator, first_seeds: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(labels, seeds)`` of a sample run, ``int64`` arrays; refuses requests too large to hold."""
    from diffaudit.generators.select import parse_labels, per_condition_seeds

    if cfg.num_per_condition > 0:
        chosen = parse_labels(cfg.labels, max(len(gen.conditions), 1), gen.conditions)
        chosen = list(dict.fromkeys(chosen.tolist()))
        labels, seeds = per_condition_seeds(chosen, cfg.num_per_condition, cfg.seed, first_seeds)
    else:
        labels = parse_labels(cfg.labels, cfg.num_images, gen.conditions)
        seeds = np.arange(cfg.seed, cfg.seed + cfg.num_images, dtype=np.int64)
    need = len(seeds) * int(np.prod(gen.image_shape))
    if need > MAX_OUTPUT_BYTES:
        raise ConfigError(
            f"{len(seeds)} images of {gen.image_shape} need {need / 2**30:.0f} GiB in memory; sample in shards "
            f"of at most {MAX_OUTPUT_BYTES // int(np.prod(gen.image_shape))} images (seed ranges)"
        )
    return labels, seeds


def generate(
    gen: Generator,
    labels: np.ndarray,
    seeds: np.ndarray,
    cfg: SampleRunConfig,
    show_progress: bool = True,
) -> tuple[ImageSet, dict[str, Any] | None]:
    """Sample, behind the copy filter when ``cfg.guard`` names an index, and tag with ``cfg.watermark``.

    Returns the images and the guard record (None without a guard).
    """
    options = sample_options(cfg.sample)
    record = None
    if cfg.guard is None:
        images = gen.sample(labels, seeds, show_progress=show_progress, **options)
    else:
        from diffaudit.guards.copy_filter import CopyFilter
        from diffaudit.guards.guarded_sampling import guarded_generate
        from diffaudit.guards.index import TrainingIndex

        copy_filter = CopyFilter(TrainingIndex.load(cfg.guard))
        images, record = guarded_generate(
            gen, labels, seeds, options, copy_filter, max_retries=cfg.guard_retries, show_progress=show_progress
        )
    if cfg.watermark != "none" and len(images):
        from diffaudit.guards.tagging import DwtDctTagger

        images = ImageSet(
            DwtDctTagger(cfg.watermark).embed(images.images),
            images.labels,
            images.class_names,
            images.provenance | {"tag": np.full(len(images), cfg.watermark)},
        )
    return images, record


def run_sample(cfg: SampleRunConfig, run: Any, show_progress: bool = True) -> ImageSet:
    """Sample ``cfg`` into the open run directory ``run`` (:class:`diffaudit.runs.RunDir`); returns the images."""
    from diffaudit.data.grid import save_grid
    from diffaudit.generators.select import open_generator
    from diffaudit.io import atomic_write_json

    cfg.validate()
    gen, first_seeds = open_generator(cfg.model, cfg.prompts, dtype=cfg.dtype)
    if cfg.watermark != "none" and min(gen.image_shape[1:]) < WATERMARK_MIN_SIDE:
        raise ConfigError(
            f"the {cfg.watermark} watermark (dwtDct) needs images of at least {WATERMARK_MIN_SIDE} px; this model "
            f"makes {gen.image_shape[1]} px images"
        )
    labels, seeds = plan_requests(cfg, gen, first_seeds)
    run.write_config(dataclasses.asdict(cfg) | {"generator": gen.describe(), "conditions": list(gen.conditions)})
    images, record = generate(gen, labels, seeds, cfg, show_progress)
    images.save(run.file(SAMPLES_FILE))
    if record is not None:
        atomic_write_json(run.file(GUARD_FILE), record)
    if len(images):
        ncols = max(1, min(len(gen.conditions) or 10, 20))
        save_grid(images.images, run.file(GRID_FILE), ncols=ncols, max_images=ncols * 10)
    run.update_manifest(model_id=gen.model_id, num_images=len(images))
    return images


def load_samples(path: str | Path) -> ImageSet:
    """An ImageSet from a sample run directory (``samples.npz`` inside) or an ``.npz`` file."""
    p = Path(path)
    if p.is_dir():
        if not (p / SAMPLES_FILE).is_file():
            raise ConfigError(f"{p}: not a sample run directory (no {SAMPLES_FILE})")
        p = p / SAMPLES_FILE
    return ImageSet.load(p)
