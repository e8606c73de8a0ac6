"""Fine-tuning a text-to-image pipeline's U-Net on a captioned ImageSet: full fine-tuning or LoRA (peft).

Only the U-Net is trained (as Bohacek & Farid and most SD fine-tuning recipes do); the VAE and text encoder
stay frozen. Every step draws its batch, timesteps, noise and caption dropout from ``(seed, step)`` through
:mod:`diffaudit.train`'s helpers, so a seed names one fine-tuning run. LoRA adapters are merged into the U-Net
weights at the end, so the result is a plain pipeline directory any diffusers user can load.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import Generator, to_model_tensor
from diffaudit.generators.pipeline import FAMILY, PipelineGenerator
from diffaudit.generators.schedulers import training_scheduler
from diffaudit.progress import progress_bar

#: The attention projections LoRA adapts (the diffusers SD LoRA recipe's targets).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class PipelineTrainConfig:
    """U-Net fine-tuning settings. ``lora_rank`` 0: full fine-tuning; > 0: LoRA of that rank.

    Defaults: learning rate 1e-5 (full) is the common SD fine-tuning rate (diffusers' text-to-image example);
    LoRA recipes use about 1e-4. Caption dropout 0.1 keeps classifier-free guidance working.

    ``cond_random_prob`` (a memorization mitigation, Somepalli et al. 2023): each example's caption is replaced by
    a uniformly random caption *of the training set* with this probability, drawn from ``(seed, step)`` exactly as
    the class model's ``train.cond_random_prob`` replaces a label (:func:`diffaudit.train.randomize_labels`), so
    "captions are conditions" holds for the mitigation too. Random caption replacement rather than appending
    random words: it needs no text-encoder pass per step (the training captions' embeddings are computed once)
    and it is the same operation on every family; random-word insertion is not implemented.
    """

    learning_rate: float = 1e-5
    batch_size: int = 4
    lora_rank: int = 0
    cond_drop_prob: float = 0.1
    grad_clip: float = 1.0
    cond_random_prob: float = 0.0

    def validate(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1 or self.lora_rank < 0:
            raise ConfigError("batch_size must be >= 1 and lora_rank >= 0")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if not 0.0 <= self.cond_random_prob <= 1.0:
            raise ConfigError(f"cond_random_prob must be in [0, 1], got {self.cond_random_prob}")


class PipelineTrainer:
    """Fine-tunes :class:`PipelineGenerator` U-Nets; ``fit`` leaves ``init`` untouched (it trains a copy)."""

    family = FAMILY

    def __init__(self, config: PipelineTrainConfig | None = None, show_progress: bool = False) -> None:
        self.config = config or PipelineTrainConfig()
        self.config.validate()
        self.show_progress = show_progress

    def fit(
        self, train_set: ImageSet, init: Generator | None, steps: int, seed: int, workdir: Path | None = None
    ) -> PipelineGenerator:
        """Fine-tune ``init`` for ``steps`` steps on ``train_set`` (labels index its ``class_names`` = captions).

        ``workdir`` is unused (fine-tuning keeps no checkpoints of its own; callers save the result).
        """
        from diffaudit.train import _step_seed, batch_indices, randomize_labels

        cfg = self.config
        if not isinstance(init, PipelineGenerator):
            raise ConfigError("a text-to-image pipeline is fine-tuned from a loaded pipeline (init is required)")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r} must be a positive integer")
        if len(train_set) == 0:
            raise ConfigError("cannot fine-tune on an empty training set")
        if train_set.shape != init.image_shape:
            raise ConfigError(f"training images are {train_set.shape}; the pipeline makes {init.image_shape}")
        model = init.with_conditions(train_set.class_names)
        model.unet = copy.deepcopy(init.unet)
        model._embeddings = dict(init._embeddings)
        params = self._trainable(model.unet)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        sched = training_scheduler(model.scheduler_config)
        n_train = model.num_train_timesteps
        with torch.no_grad():
            latents = torch.cat(
                [model._encode(to_model_tensor(train_set.images[i : i + 16])) for i in range(0, len(train_set), 16)]
            )
            captions = [train_set.class_names[c] if c >= 0 else "" for c in train_set.labels.tolist()]
            embeds = model.encode_prompts(captions)
            null = model.encode_prompts([""])[0]
            # One embedding per training caption: the pool condition randomisation draws replacements from.
            caption_embeds = model.encode_prompts(list(train_set.class_names)) if cfg.cond_random_prob > 0 else None
        labels = torch.from_numpy(train_set.labels)
        target_kind = sched.config.prediction_type
        model.unet.train()
        with progress_bar("fine-tune", total=steps, enabled=self.show_progress) as bar:
            for step in range(steps):
                gen = torch.Generator().manual_seed(_step_seed(seed, step))
                idx = torch.from_numpy(batch_indices(len(train_set), cfg.batch_size, step, seed))
                z0, e = latents[idx.to(latents.device)], embeds[idx.to(embeds.device)].clone()
                if caption_embeds is not None:
                    lab = labels[idx]
                    new = randomize_labels(lab, len(train_set.class_names), cfg.cond_random_prob, seed, step)
                    changed = new != lab
                    e[changed.to(e.device)] = caption_embeds[new[changed].to(caption_embeds.device)]
                drop = torch.rand(len(idx), generator=gen) < cfg.cond_drop_prob
                e[drop.to(e.device)] = null
                t = torch.randint(0, n_train, (len(idx),), generator=gen).to(z0.device)
                noise = torch.randn(z0.shape, generator=gen).to(z0)
                z_t = sched.add_noise(z0, noise, t)
                target = noise if target_kind == "epsilon" else sched.get_velocity(z0, noise, t)
                pred = model.unet(z_t, t, encoder_hidden_states=e).sample
                loss = (pred.float() - target.float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                bar.update(completed=step + 1, info=f"loss {float(loss.detach()):.4f}")
        if cfg.lora_rank > 0:
            model.unet.fuse_lora(lora_scale=1.0)
            model.unet.unload_lora()
        model.unet.eval().requires_grad_(False)
        model.refresh_id()
        model.path = None
        return model

    def _trainable(self, unet: Any) -> list[torch.nn.Parameter]:
        if self.config.lora_rank > 0:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=self.config.lora_rank,
                    lora_alpha=self.config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(LORA_TARGETS),
                )
            )
        else:
            unet.requires_grad_(True)
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable U-Net parameters (LoRA found no attention projections?)")
        return params

    def save(self, generator: Generator, directory: Path) -> None:
        if not isinstance(generator, PipelineGenerator):
            raise ConfigError("PipelineTrainer saves pipeline generators only")
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generator.save(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        generator.path = directory

    def load(self, directory: Path) -> PipelineGenerator:
        return PipelineGenerator.load(directory)

    def describe(self) -> dict[str, Any]:
        return {"family": FAMILY, **asdict(self.config), "trained": "U-Net only; VAE latents = posterior means"}


def caption_labels(captions: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """``int64`` labels indexing the unique captions (first-seen order), and those captions."""
    unique = tuple(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(unique)}
    return np.array([index[c] for c in captions], dtype=np.int64), unique
