"""The loop's generators: which Trainer retrains a backend, how generation 0 is made, how models persist.

One code path for every family: a :class:`~diffaudit.generators.base.Trainer` fits each generation and a
:class:`~diffaudit.generators.base.Generator` samples it. Backends map to trainers as follows:

* ``diffusion``: :class:`~diffaudit.generators.classcond.ClassCondTrainer` (generation 0 trains ``base_steps``
  from scratch; later ones fine-tune ``steps_per_generation`` steps, or retrain from scratch);
* ``gaussian`` / ``gmm``: :class:`~diffaudit.generators.analytic.AnalyticTrainer` (closed form / EM);
* ``pipeline``: :class:`~diffaudit.generators.pipeline_train.PipelineTrainer` (full or LoRA U-Net fine-tuning);
  generation 0 is the user's pipeline as given (no training), recorded by reference, not copied.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import CheckpointError
from diffaudit.generators.base import Generator, Trainer
from diffaudit.io import atomic_write_json
from diffaudit.loop.config import DIFFUSION, GAUSSIAN, GMM, MODEL_DIR, MODEL_REF_FILE, PIPELINE, LoopConfig


class LoopModels:
    """Trainer, sampling options and persistence of one arm's generators (built by :func:`make_models`)."""

    def __init__(
        self,
        cfg: LoopConfig,
        trainer: Trainer,
        options: dict[str, Any],
        device: str | None = None,
        finetune_trainer: Trainer | None = None,
    ):
        self.cfg, self.trainer, self.options, self.device = cfg, trainer, dict(options), device
        #: Trainer of generations >= 1 (its own warm-up / condition dropout); the base trainer when not set.
        self.finetune_trainer = finetune_trainer or trainer
        self._given: Generator | None = None  # the pipeline backend's generation 0 (loaded once)

    # ---- training -------------------------------------------------------------------------------------
    def fit(
        self,
        train: ImageSet,
        prev: Generator | None,
        generation: int,
        seed: int,
        workdir: Path | None,
        pretrain: ImageSet | None = None,
    ):
        """Generation ``generation``'s model, trained on ``train`` (fine-tuning ``prev`` when the config says so).

        With ``pretrain`` (generation 0 when ``pretrain_steps`` > 0) a model is first trained from scratch on it
        for ``pretrain_steps`` in ``workdir/pretrain``, then fine-tuned on ``train`` for ``base_steps``: a base
        model fit to a broader distribution that never saw the fine-tuning images (Bohacek & Farid's SD).
        """
        cfg = self.cfg
        if cfg.backend == PIPELINE and generation == 0:
            return self.given(train.class_names)
        if generation == 0 and pretrain is not None:
            sub = None if workdir is None else Path(workdir) / "pretrain"
            base = self.trainer.fit(pretrain, None, cfg.pretrain_steps, seed + 999_983, sub)
            return self.trainer.fit(train, base, cfg.base_steps, seed, workdir)
        finetune = cfg.retrain == "finetune" and generation > 0 and prev is not None
        steps = cfg.finetune_steps if finetune else cfg.base_steps
        trainer = self.finetune_trainer if finetune else self.trainer
        gen = trainer.fit(train, prev if finetune else None, steps, seed, workdir)
        if cfg.backend == PIPELINE:
            gen = gen.with_conditions(train.class_names)
        return gen

    def given(self, conditions: tuple[str, ...]) -> Generator:
        """The user's pipeline (generation 0), with the loop's conditions."""
        if self._given is None:
            from diffaudit.generators.pipeline import PipelineGenerator

            self._given = PipelineGenerator.load(self.cfg.model, conditions, device=self.device, dtype=self.cfg.dtype)
        return self._given

    # ---- sampling -------------------------------------------------------------------------------------
    def sample(self, gen: Generator, labels, seeds, generation: int, **extra: Any) -> ImageSet:
        """``gen.sample`` with the arm's sampler, steps, guidance and temperature (``extra``: init, strength)."""
        return gen.sample(labels, seeds, generation=generation, **self.options, **extra)

    @staticmethod
    def stats(gen: Generator) -> dict[str, float]:
        """Numbers describing the fitted model (the analytic generators' fitted variance); {} for networks."""
        stats = getattr(gen, "stats", None)
        return stats() if callable(stats) else {}

    # ---- persistence ----------------------------------------------------------------------------------
    def save(self, gen: Generator, workdir: Path) -> None:
        """Save ``gen`` under ``workdir/model`` (generation 0 of a pipeline: a reference to the user's directory)."""
        if self._given is not None and gen is self._given:
            atomic_write_json(
                workdir / MODEL_REF_FILE, {"model": self.cfg.model, "model_id": gen.model_id, "trained": False}
            )
            return
        self.trainer.save(gen, workdir / MODEL_DIR)

    def load(self, workdir: Path, conditions: tuple[str, ...]) -> Generator:
        """The generator saved by :meth:`save` in ``workdir``."""
        ref = workdir / MODEL_REF_FILE
        if ref.is_file():
            meta = json.loads(ref.read_text())
            gen = self.given(conditions)
            if meta.get("model_id") != gen.model_id:
                raise CheckpointError(
                    f"{ref}: names model {meta.get('model_id')}, but {self.cfg.model} is {gen.model_id}"
                )
            return gen
        gen = self.trainer.load(workdir / MODEL_DIR)
        if self.cfg.backend == PIPELINE:
            gen = gen.with_conditions(conditions)
        return gen

    def describe(self) -> dict[str, Any]:
        out = {"backend": self.cfg.backend, "trainer": self.trainer.describe(), "sample": self.options}
        if self.finetune_trainer is not self.trainer:
            out["finetune_trainer"] = self.finetune_trainer.describe()
        if self.cfg.backend == PIPELINE:
            out["generation_0"] = {"model": self.cfg.model, "trained": False, "dtype": self.cfg.dtype}
        return out


def make_models(cfg: LoopConfig, show_progress: bool = False, device: str | None = None) -> LoopModels:
    """The trainer and sampling options named by ``cfg.backend``."""
    if cfg.backend in (GAUSSIAN, GMM):
        from diffaudit.generators.analytic import AnalyticTrainer

        # Exact draws: temperature is the only sampling setting that applies.
        return LoopModels(cfg, AnalyticTrainer(cfg.backend, cfg.gmm_components), {"temperature": cfg.temperature})
    if cfg.backend == DIFFUSION:
        from diffaudit.generators.classcond import ClassCondTrainer
        from diffaudit.loop.plan import diffusion_preset

        preset = diffusion_preset(cfg)
        options = {
            "sampler": preset.sample.sampler,
            "num_steps": cfg.sample_steps,
            "guidance_scale": float(cfg.guidance_scale),
            "temperature": float(cfg.temperature),
            "batch_size": preset.sample.batch_size,
        } | _schedule(cfg)
        ft_train = preset.train
        if cfg.finetune_warmup is not None:
            ft_train = dataclasses.replace(ft_train, warmup_steps=int(cfg.finetune_warmup))
        if cfg.finetune_cond_drop is not None:
            ft_train = dataclasses.replace(ft_train, cond_drop_prob=float(cfg.finetune_cond_drop))
        ft = None
        if ft_train != preset.train:
            ft = ClassCondTrainer(dataclasses.replace(preset, train=ft_train), show_progress, device)
        return LoopModels(cfg, ClassCondTrainer(preset, show_progress, device), options, device, ft)
    assert cfg.backend == PIPELINE
    from diffaudit.generators.pipeline_train import PipelineTrainConfig, PipelineTrainer

    train_cfg = PipelineTrainConfig(learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, lora_rank=cfg.lora_rank)
    options = {
        "sampler": "ddim",
        "num_steps": cfg.sample_steps,
        "guidance_scale": float(cfg.guidance_scale),
        "temperature": float(cfg.temperature),
        "batch_size": 16,
    } | _schedule(cfg)
    # Generation 0 of a pipeline is never trained, so the fine-tuning settings are the trainer's settings.
    if cfg.finetune_cond_drop is not None:
        train_cfg = dataclasses.replace(train_cfg, cond_drop_prob=float(cfg.finetune_cond_drop))
    return LoopModels(cfg, PipelineTrainer(train_cfg, show_progress), options, device)


def _schedule(cfg: LoopConfig) -> dict[str, Any]:
    """The guidance-schedule sampling option, passed only when not constant (analytic generators lack it)."""
    return {} if cfg.guidance_schedule == "constant" else {"guidance_schedule": cfg.guidance_schedule}


__all__ = ["LoopModels", "make_models"]
