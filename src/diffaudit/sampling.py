"""``run_sample``: sample any generator into a run directory (images with provenance, a grid, a guard record).

Sampling is a pure function of (generator, labels, seeds): a shard of a large audit is a range of the planned
requests (:func:`sample_shard`, ``diffaudit sample --shard i/n``), and :func:`merge_sample_shards` puts every image
back at its request's position. Image ``i`` depends only on ``labels[i]`` and ``seeds[i]``. Layout::

    RUN/manifest.json, config.json      kind "sample"; the resolved settings and the generator's description
    RUN/samples.npz                      the ImageSet (uint8 NCHW, labels = condition index, provenance)
    RUN/grid.png                         a grid of the first images
    RUN/guard.json                       with a copy filter: every blocked attempt and re-sample
    RUN/shards/shard-I-of-N/             a shard: samples.npz, requests.npz (positions, labels, seeds), config.json
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

#: ``autocast`` values of :class:`SampleRunConfig` (those of ``generators.denoising.AUTOCAST_DTYPES``, which
#: needs torch at import).
AUTOCAST_CHOICES = ("none", "fp16", "bf16")

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
    #: Overrides ``sample.guidance_scale``; None: the generator's own default (SD pipelines 7.5, our models 2.0).
    guidance_scale: float | None = None
    guard: str | None = None
    guard_retries: int = 5
    watermark: str = "none"
    dtype: str = "auto"
    #: Sampling speed-ups of denoising generators (:class:`~diffaudit.generators.denoising.SampleSpeed`): fp16 /
    #: bf16 autocast of the network (CUDA only), channels-last memory format, ``torch.compile`` of the network.
    autocast: str = "none"
    channels_last: bool = False
    compile: bool = False

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
        if self.autocast not in AUTOCAST_CHOICES:
            raise ConfigError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {self.autocast!r}")

    @property
    def speed_options(self) -> dict[str, Any]:
        """The speed-ups asked for (empty: none, sampling stays bit for bit the plain path)."""
        asked = {"autocast": self.autocast, "channels_last": self.channels_last, "compile": self.compile}
        return {k: v for k, v in asked.items() if v not in ("none", False)}


def plan_requests(
    cfg: SampleRunConfig, gen: Generator, first_seeds: dict[int, int], check_size: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(labels, seeds)`` of a sample run, ``int64`` arrays; refuses requests too large to hold.

    ``check_size=False`` leaves the size check to the caller (a shard checks its own slice).
    """
    from diffaudit.generators.select import parse_labels, per_condition_seeds

    if cfg.num_per_condition > 0:
        chosen = parse_labels(cfg.labels, max(len(gen.conditions), 1), gen.conditions)
        chosen = list(dict.fromkeys(chosen.tolist()))
        labels, seeds = per_condition_seeds(chosen, cfg.num_per_condition, cfg.seed, first_seeds)
    else:
        labels = parse_labels(cfg.labels, cfg.num_images, gen.conditions)
        seeds = np.arange(cfg.seed, cfg.seed + cfg.num_images, dtype=np.int64)
    if check_size:
        _check_size(len(seeds), gen.image_shape)
    return labels, seeds


def _check_size(n: int, shape: tuple[int, ...]) -> None:
    need = n * int(np.prod(shape))
    if need > MAX_OUTPUT_BYTES:
        raise ConfigError(
            f"{n} images of {shape} need {need / 2**30:.0f} GiB in memory; sample in shards (--shard i/n) "
            f"of at most {MAX_OUTPUT_BYTES // int(np.prod(shape))} images"
        )


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
    options = sample_options(cfg.sample) | {"guidance_scale": resolved_guidance(cfg, gen)}
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
        from diffaudit.guards.tags_dwt import DwtDctTagger

        images = ImageSet(
            DwtDctTagger(cfg.watermark).embed(images.images),
            images.labels,
            images.class_names,
            images.provenance | {"tag": np.full(len(images), cfg.watermark)},
        )
    return images, record


def _open(cfg: SampleRunConfig) -> tuple[Generator, dict[int, int]]:
    from diffaudit.generators.select import open_generator

    gen, first_seeds = open_generator(cfg.model, cfg.prompts, dtype=cfg.dtype)
    if cfg.speed_options:
        from diffaudit.generators.denoising import DenoisingGenerator

        if not isinstance(gen, DenoisingGenerator):
            raise ConfigError(
                f"{cfg.model}: autocast, channels-last and compile speed up a denoising network; this "
                f"{gen.describe().get('family', 'generator')} has none"
            )
        gen = gen.with_sample_speed(**cfg.speed_options)
    if cfg.watermark != "none" and min(gen.image_shape[1:]) < WATERMARK_MIN_SIDE:
        raise ConfigError(
            f"the {cfg.watermark} watermark (dwtDct) needs images of at least {WATERMARK_MIN_SIDE} px; this model "
            f"makes {gen.image_shape[1]} px images"
        )
    return gen, first_seeds


def resolved_guidance(cfg: SampleRunConfig, gen: Generator) -> float:
    """The guidance actually used: ``cfg.guidance_scale``, else the generator family's default."""
    return gen.default_guidance_scale if cfg.guidance_scale is None else float(cfg.guidance_scale)


def run_config(cfg: SampleRunConfig, gen: Generator) -> dict[str, Any]:
    """What ``RUN/config.json`` holds: the settings (guidance resolved), the generator and its conditions."""
    settings = dataclasses.asdict(cfg)
    settings["sample"]["guidance_scale"] = settings["guidance_scale"] = resolved_guidance(cfg, gen)
    if cfg.speed_options:  # as applied on this device (autocast runs on CUDA only)
        settings["sampling_speed"] = gen.sampling_record()
    return settings | {"generator": gen.describe(), "conditions": list(gen.conditions)}


def _write_outputs(run: Any, images: ImageSet, num_conditions: int, model_id: str) -> None:
    """samples.npz, grid.png and the manifest's counts: the same for a one-process run and a merged one."""
    from diffaudit.data.grid import save_grid

    images.save(run.file(SAMPLES_FILE))
    if len(images):
        ncols = max(1, min(num_conditions or 10, 20))
        save_grid(images.images, run.file(GRID_FILE), ncols=ncols, max_images=ncols * 10)
    run.update_manifest(model_id=model_id, num_images=len(images))


def run_sample(cfg: SampleRunConfig, run: Any, show_progress: bool = True) -> ImageSet:
    """Sample ``cfg`` into the open run directory ``run`` (:class:`diffaudit.runs.RunDir`); returns the images."""
    from diffaudit.io import atomic_write_json

    cfg.validate()
    gen, first_seeds = _open(cfg)
    labels, seeds = plan_requests(cfg, gen, first_seeds)
    run.write_config(run_config(cfg, gen))
    images, record = generate(gen, labels, seeds, cfg, show_progress)
    if record is not None:
        atomic_write_json(run.file(GUARD_FILE), record)
    _write_outputs(run, images, len(gen.conditions), gen.model_id)
    return images


# ---- shards -----------------------------------------------------------------------------------------------
REQUESTS_FILE = "requests.npz"
SHARD_UNIT = "requests"


def shard_config_hash(cfg: SampleRunConfig) -> str:
    """The hash every shard of one sample run shares (its settings; the model is checked by id)."""
    from diffaudit.scale.shards import config_hash

    return config_hash(dataclasses.asdict(cfg))


def sample_shard(cfg: SampleRunConfig, run_dir: str | Path, spec: Any, show_progress: bool = True) -> Path:
    """Sample shard ``spec`` (:class:`~diffaudit.scale.shards.ShardSpec`) of ``cfg``'s requests into ``run_dir``.

    The shard takes the requests ``[i*N//n, (i+1)*N//n)`` of the plan :func:`plan_requests` makes, so edges fall
    inside batches; its folder ``RUN/shards/shard-I-of-N`` holds ``samples.npz``, ``requests.npz`` (``positions``,
    ``labels``, ``seeds``, ``int64``) and ``config.json``. A finished shard is returned without sampling.
    """
    from diffaudit.device import describe_device, resolve_device
    from diffaudit.io import atomic_path, atomic_write_json
    from diffaudit.scale.shards import commit_shard, config_hash, finished_shard, work_record

    cfg.validate()
    if cfg.guard is not None:
        raise ConfigError("--shard with --guard: guarded sampling drops and re-seeds images, so it is not sharded yet")
    chash = shard_config_hash(cfg)
    done = finished_shard(run_dir, spec, "sample", chash)
    if done is not None:
        return done
    gen, first_seeds = _open(cfg)
    labels, seeds = plan_requests(cfg, gen, first_seeds, check_size=False)
    start, stop = spec.range(len(seeds))
    if stop == start:
        raise ConfigError(f"shard {spec.label} is empty: {len(seeds)} requests in {spec.count} shards; use fewer")
    _check_size(stop - start, gen.image_shape)
    config = run_config(cfg, gen)

    def write(folder: Path) -> dict[str, Any]:
        images, _ = generate(gen, labels[start:stop], seeds[start:stop], cfg, show_progress)
        images.save(folder / SAMPLES_FILE)
        with atomic_path(folder / REQUESTS_FILE, suffix=".npz") as tmp:
            np.savez(tmp, positions=np.arange(start, stop, dtype=np.int64), labels=labels[start:stop],
                     seeds=seeds[start:stop])  # fmt: skip
        atomic_write_json(folder / "config.json", config)
        return {"num_images": len(images), "device": describe_device(resolve_device(None))}

    keys = {"first_seed": int(seeds[start]), "last_seed": int(seeds[stop - 1])}
    manifest = {
        "kind": "sample",
        "config_hash": chash,
        "run_config_hash": config_hash(_without_device(config)),
        "model_id": gen.model_id,
        "work": work_record(SHARD_UNIT, start, stop, len(seeds), **keys),
    }
    return commit_shard(run_dir, spec, manifest, write)


def _without_device(config: dict[str, Any]) -> dict[str, Any]:
    """A run config without the machine it ran on (shards of one run may run on CPUs and GPUs)."""
    generator = {k: v for k, v in config.get("generator", {}).items() if k != "device"}
    return config | {"generator": generator}


def merge_sample_shards(run: Any, shards: list[Any]) -> dict[str, Any]:
    """Merge sample shards (checked by :func:`diffaudit.scale.merge.check_shards`) into the open run ``run``.

    Every image goes to its request's position, and each image's label and seed must be the ones its shard's
    ``requests.npz`` planned there, so a shard from another plan cannot slip in.
    """
    from diffaudit.io import read_json
    from diffaudit.scale.shards import config_hash

    total = int(shards[0].manifest["work"]["total"])
    sets, positions = [], []
    for s in shards:
        images = ImageSet.load(s.path / SAMPLES_FILE)
        with np.load(s.path / REQUESTS_FILE, allow_pickle=False) as req:
            pos, labels, seeds = req["positions"], req["labels"], req["seeds"]
        if (
            len(images) != len(pos)
            or not np.array_equal(images.labels, labels)
            or not np.array_equal(images.provenance["seed"], seeds)
        ):
            raise ConfigError(f"{s.path}: its images do not match its planned requests ({REQUESTS_FILE})")
        sets.append(images)
        positions.append(pos)
    order = np.concatenate(positions)
    if not np.array_equal(np.sort(order), np.arange(total)):
        raise ConfigError(f"shards hold request positions other than 0..{total - 1} exactly once")
    merged = ImageSet.concat(sets).subset(np.argsort(order, kind="stable"))
    config = read_json(shards[0].path / "config.json", "shard config", ConfigError)
    expected = config_hash(_without_device(config))
    for s in shards:
        if s.manifest.get("run_config_hash") != expected:
            raise ConfigError(f"{s.path}: its generator or conditions differ from shard {shards[0].label}'s")
    run.write_config(config)
    _write_outputs(run, merged, len(config.get("conditions", [])), str(shards[0].manifest["model_id"]))
    return {"num_images": len(merged), "samples": str(run.file(SAMPLES_FILE))}


def load_samples(path: str | Path) -> ImageSet:
    """An ImageSet from a sample run directory (``samples.npz`` inside) or an ``.npz`` file."""
    p = Path(path)
    if p.is_dir():
        if not (p / SAMPLES_FILE).is_file():
            raise ConfigError(f"{p}: not a sample run directory (no {SAMPLES_FILE})")
        p = p / SAMPLES_FILE
    return ImageSet.load(p)
