"""``run_train``: a training run directory for any trainable family (what ``diffaudit train`` does).

* diffaudit's class-conditional models: a preset (data, model, train, sample sections) trained from scratch or
  fine-tuned from ``init`` by :func:`diffaudit.train.train` (checkpoints, exact resume, data-parallel under
  torchrun), then grids of the data and of samples.
* a user's diffusers pipeline (``init`` is a pipeline directory): its U-Net fine-tuned on a captioned data
  source by :class:`~diffaudit.generators.pipeline_train.PipelineTrainer` (full, or LoRA with ``lora_rank``),
  written as a pipeline directory ``RUN/model`` any diffusers user can load. Settings come from ``pipeline``.

Both write ``RUN/config.json`` (the resolved settings), ``RUN/model`` and the manifest's ``model_id``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffaudit.config import Preset
from diffaudit.errors import ConfigError

#: ``--set`` keys a pipeline fine-tune accepts (fields of PipelineTrainConfig, plus steps/seed/resolution).
PIPELINE_KEYS = (
    "learning_rate",
    "batch_size",
    "lora_rank",
    "cond_drop_prob",
    "cond_random_prob",
    "grad_clip",
    "seed",
    "resolution",
)


def run_train(
    cfg: Preset,
    out: str | os.PathLike[str],
    init: str | os.PathLike[str] | None = None,
    resume: bool = False,
    grid_images: int = 100,
    show_progress: bool = True,
) -> str:
    """Train the class-conditional model ``cfg`` into the run directory ``out``; returns the model id."""
    from diffaudit.data.grid import save_grid
    from diffaudit.data.loading import load_data
    from diffaudit.scale.ddp import open_train_run, world_from_env
    from diffaudit.train import train as train_model

    if grid_images < 0:
        raise ConfigError(f"grid_images must be >= 0, got {grid_images}")
    images, info = load_data(cfg.data)
    ctx = world_from_env()  # under torchrun / accelerate launch: only rank 0 writes
    with open_train_run(out, resume) as run:
        run.write_config(cfg.to_dict() | {"init": str(init) if init else None, "data_info": info})
        if "canaries" in info:
            run.update_manifest(canaries=info["canaries"])
        model_id = train_model(cfg, images, run, init=init, show_progress=show_progress)
        if ctx is not None and not ctx.is_writer:
            return model_id
        if grid_images > 0:
            from diffaudit.generators.classcond import ClassCondGenerator
            from diffaudit.generators.select import parse_labels
            from diffaudit.sampling import sample_options

            gen = ClassCondGenerator.load(run.file("model"))
            labels = parse_labels("all", grid_images, gen.conditions)
            samples = gen.sample(labels, range(grid_images), **sample_options(cfg.sample))
            ncols = images.num_classes if images.num_classes >= 2 else 10
            save_grid(samples.images, run.file("samples-grid.png"), ncols=ncols)
        save_grid(images.images, run.file("data-grid.png"))
    return model_id


def pipeline_settings(overrides: list[str] | None) -> dict[str, Any]:
    """``["lora_rank=4", "learning_rate=1e-4"]`` -> a dict of :data:`PIPELINE_KEYS` values (JSON-parsed)."""
    from diffaudit.config import _parse_value

    settings: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in PIPELINE_KEYS:
            raise ConfigError(f"--set {item!r}: a pipeline fine-tune takes {', '.join(PIPELINE_KEYS)} (KEY=VALUE)")
        settings[key] = _parse_value(raw)
    return settings


def run_pipeline_finetune(
    init: str | os.PathLike[str],
    data: str,
    out: str | os.PathLike[str],
    steps: int,
    settings: dict[str, Any] | None = None,
    dtype: str = "fp32",
    show_progress: bool = True,
) -> str:
    """Fine-tune the pipeline ``init`` on the captioned source ``data`` into ``out/model``; returns the model id.

    ``settings``: :data:`PIPELINE_KEYS` (defaults: PipelineTrainConfig's, seed 0, the pipeline's resolution).
    Fine-tuning keeps no intermediate checkpoints: an interrupted run is simply started again.
    """
    from diffaudit.data.sources import load_source
    from diffaudit.generators.pipeline import PipelineGenerator
    from diffaudit.generators.pipeline_train import PipelineTrainConfig, PipelineTrainer
    from diffaudit.runs import RunDir

    settings = dict(settings or {})
    seed = int(settings.pop("seed", 0))
    resolution = settings.pop("resolution", None)
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    train_cfg = PipelineTrainConfig(**settings)
    trainer = PipelineTrainer(train_cfg, show_progress=show_progress)  # validates before anything is loaded
    base = PipelineGenerator.load(init, dtype=dtype)
    side = int(resolution or base.image_shape[-1])
    if side != base.image_shape[-1]:
        raise ConfigError(f"resolution {side} differs from the pipeline's {base.image_shape[-1]} px")
    train_set = load_source(data, resolution=side, channels=3)
    if not train_set.class_names:
        raise ConfigError(f"{data}: a pipeline is fine-tuned on captioned images (captioned:DIR)")
    with RunDir(out, kind="train") as run:
        run.write_config(
            {
                "family": "pipeline",
                "init": str(init),
                "init_model_id": base.model_id,
                "data": data,
                "steps": steps,
                "seed": seed,
                "dtype": dtype,
                "trainer": trainer.describe(),
                "num_images": len(train_set),
                "num_captions": len(train_set.class_names),
            }
        )
        tuned = trainer.fit(train_set, base, steps, seed)
        trainer.save(tuned, Path(run.file("model")))
        run.update_manifest(model_id=tuned.model_id)
    return tuned.model_id
