"""diffaudit's own class-conditional U-Net as a Generator, and its Trainer (training loop: :mod:`diffaudit.train`).

The network (diffusers ``UNet2DModel`` with a class embedding, null label last) lives in
:class:`~diffaudit.models.diffusion.DiffusionModel`; sampling, the per-image loss and the guidance gap come from
:class:`~diffaudit.generators.denoising.DenoisingGenerator`, in pixel space.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import Generator
from diffaudit.generators.denoising import DenoisingGenerator
from diffaudit.models.diffusion import DiffusionModel

FAMILY = "classcond"


class ClassCondGenerator(DenoisingGenerator):
    """A loaded :class:`DiffusionModel` with its id and class names (build with :meth:`load`)."""

    pixel_space = True

    def __init__(self, model: DiffusionModel, model_id: str, class_names: Sequence[str], path: Path | None = None):
        cfg = model.config
        self.model = model.eval()
        self.model_id = model_id
        self.path = path
        self.conditional = cfg.conditional
        names = tuple(str(c) for c in class_names)
        if cfg.conditional and len(names) != cfg.num_classes:
            names = tuple(str(i) for i in range(cfg.num_classes))  # models saved without names: indices
        self.conditions = names if cfg.conditional else ()
        self.image_shape = (cfg.channels, cfg.resolution, cfg.resolution)
        self.latent_shape = self.image_shape
        self.scheduler_config = {
            "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule,
            "prediction_type": cfg.prediction_type,
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device | None = None) -> ClassCondGenerator:
        """Load a model directory (or a run directory holding ``model/``); EMA weights when present."""
        from diffaudit.models.checkpoint import load_model

        model, meta = load_model(path, use_ema=True, device=device)
        return cls(model, str(meta.get("model_id", "")), meta.get("class_names") or [], Path(meta["model_dir"]))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _condition(self, labels: torch.Tensor) -> torch.Tensor:
        return labels  # -1 (null) is mapped to the model's null class by DiffusionModel.predict_noise

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.is_floating_point():  # class-embedding vectors (condition_embedding), e.g. optimised by Wen et al.
            return _predict_from_embedding(self.model, z_t, t, cond)
        return self.model.predict_noise(z_t, t, cond)

    def condition_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """The U-Net's class-embedding vectors ``float (N, D)`` of ``labels`` (-1: the null class's row)."""
        if not self.conditional:
            raise ConfigError("an unconditional model has no condition embedding")
        mapped = self.model._labels(labels, len(labels), self.device)
        return self.model.unet.class_embedding(mapped)

    def with_conditions(self, conditions: Sequence[str]) -> ClassCondGenerator:
        """A class model's conditions are fixed by training; only the same names are accepted."""
        if tuple(conditions) != self.conditions:
            raise ConfigError(
                f"this class-conditional model was trained on classes {list(self.conditions)}; it cannot sample "
                "other conditions (use --labels to pick among them)"
            )
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "model_id": self.model_id,
            "path": str(self.path) if self.path else None,
            "model": self.model.config.to_dict(),
            "conditions": list(self.conditions),
            "device": str(self.device),
        }


def _predict_from_embedding(
    model: DiffusionModel, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor
) -> torch.Tensor:
    """The U-Net's prediction with its class embedding's output replaced by ``emb`` ``(N, D)``.

    ``UNet2DModel`` adds ``class_embedding(labels)`` to the time embedding; a forward hook returning ``emb`` feeds
    any vector in its place (differentiably), with dummy labels for the lookup it discards.
    """
    unet = model.unet
    handle = unet.class_embedding.register_forward_hook(lambda _m, _i, out: emb.to(out.device, out.dtype))
    try:
        dummy = torch.zeros(z_t.shape[0], dtype=torch.long, device=model.device)
        return unet(z_t.to(model.device), t.to(model.device), class_labels=dummy).sample
    finally:
        handle.remove()


class ClassCondTrainer:
    """Trains (or fine-tunes) class-conditional U-Nets with :func:`diffaudit.train.train` from a preset.

    ``fit`` runs in ``workdir/train`` (a run directory: metrics, checkpoints, exact resume) and moves the final
    model to ``workdir/model``; checkpoints are removed afterwards since only the final model is kept.
    """

    family = FAMILY

    def __init__(self, preset: Any, show_progress: bool = False, device: str | torch.device | None = None) -> None:
        self.preset = preset  # diffaudit.config.Preset
        self.show_progress = show_progress
        self.device = device

    def fit(
        self, train_set: ImageSet, init: Generator | None, steps: int, seed: int, workdir: Path
    ) -> ClassCondGenerator:
        from diffaudit.runs import RunDir
        from diffaudit.train import train as train_model

        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r} must be a positive integer")
        if init is not None and not isinstance(init, ClassCondGenerator):
            raise ConfigError(f"cannot fine-tune a class-conditional model from a {type(init).__name__}")
        if init is not None and init.path is None:
            raise ConfigError("fine-tuning needs the initial model saved in a directory")
        preset = dataclasses.replace(
            self.preset, train=dataclasses.replace(self.preset.train, steps=steps, seed=int(seed) % (2**31))
        )
        workdir = Path(workdir)
        run_path = workdir / "train"
        resume = (run_path / "manifest.json").exists()
        with RunDir(run_path, kind="train", resume=resume) as run:
            train_model(
                preset,
                train_set,
                run,
                init=None if init is None else init.path,
                show_progress=self.show_progress,
                device=self.device,
            )
        final = workdir / "model"
        if final.exists():
            shutil.rmtree(final)
        os.replace(run_path / "model", final)
        shutil.rmtree(run_path / "checkpoints", ignore_errors=True)
        return ClassCondGenerator.load(final, device=self.device)

    def save(self, generator: Generator, directory: Path) -> None:
        if not isinstance(generator, ClassCondGenerator) or generator.path is None:
            raise ConfigError("can only save class-conditional generators loaded from a directory")
        if generator.path.resolve() != Path(directory).resolve():
            if Path(directory).exists():
                shutil.rmtree(directory)
            shutil.copytree(generator.path, directory)

    def load(self, directory: Path) -> ClassCondGenerator:
        return ClassCondGenerator.load(directory, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"family": FAMILY, "preset": self.preset.to_dict()}
