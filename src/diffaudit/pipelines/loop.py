"""A compact self-consuming loop for text-to-image pipelines (Bohacek & Farid 2023 protocol).

Each generation: (1) the current model makes image-to-image copies of some real training images from their own
captions; (2) they replace that many real images, so the training set keeps its size with a fraction
``synthetic_fraction`` self-generated (the paper: 30 of 900, 3.3%); (3) only the U-Net is fine-tuned, fully or
with LoRA (peft), for ``steps`` steps; (4) the model is measured on fixed seeds, for prompts used in retraining
and for held-out prompts (the paper saw distortion spread to prompts not retrained on). Optional healing
generations retrain on real images only. The paper publishes no hyper-parameters, so every one is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.distances import nearest_neighbors, pairwise_distances
from diffaudit.errors import ConfigError
from diffaudit.pipelines.audit import generate_sd, latent_losses
from diffaudit.pipelines.sd import SDModel, images_to_tensor, unet_state_id

# Keys of the per-generation rows.
KEY_GENERATION = "generation"
KEY_PHASE = "phase"
KEY_NUM_SYNTHETIC = "num_synthetic"
KEY_TRAIN_LOSS = "train_loss"
KEY_REAL_LOSS_T100 = "real_loss_t100"
KEY_DRIFT_TRAIN = "drift_l2_train_prompts"
KEY_DRIFT_HELDOUT = "drift_l2_heldout_prompts"
KEY_NN_REAL = "nearest_real_l2"
KEY_DIVERSITY = "diversity_l2"
KEY_MODEL_ID = "model_id"


@dataclass(frozen=True)
class SDLoopConfig:
    """Hyper-parameters of the loop (defaults: small CPU-friendly values; a GPU audit raises ``steps``)."""

    generations: int = 5
    heal_generations: int = 0
    synthetic_fraction: float = 30 / 900  # Bohacek & Farid's smallest mix
    steps: int = 100  # U-Net optimizer steps per generation (not published)
    batch_size: int = 4
    learning_rate: float = 1e-5  # a common SD fine-tuning rate; LoRA usually uses 1e-4
    lora_rank: int = 0  # 0: fine-tune the whole U-Net; > 0: LoRA on the attention projections
    cond_drop_prob: float = 0.1  # keep classifier-free guidance working while fine-tuning
    strength: float = 0.5  # img2img strength of the self-generated images
    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 7.5
    eval_seeds: int = 4  # fixed seeds per evaluation prompt
    seed: int = 0

    def validate(self) -> None:
        if self.generations < 1 or self.heal_generations < 0:
            raise ConfigError("generations must be >= 1 and heal_generations >= 0")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ConfigError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_seeds < 1 or self.lora_rank < 0:
            raise ConfigError("steps, batch_size and eval_seeds must be >= 1 and lora_rank >= 0")


def _trainable(model: SDModel, cfg: SDLoopConfig) -> list[torch.nn.Parameter]:
    if cfg.lora_rank > 0:
        from peft import LoraConfig

        model.unet.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    else:
        model.unet.requires_grad_(True)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable U-Net parameters (LoRA found no attention projections?)")
    return params


def _fine_tune(
    model: SDModel,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    latents: torch.Tensor,
    embeds: torch.Tensor,
    null: torch.Tensor,
    cfg: SDLoopConfig,
    gen: torch.Generator,
) -> float:
    """``cfg.steps`` optimizer steps on (latents, text embeddings); returns the mean loss."""
    model.unet.train()
    total = 0.0
    n_train = model.train_scheduler.config.num_train_timesteps
    for _ in range(cfg.steps):
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=gen)
        z0, e = latents[idx], embeds[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_drop_prob
        e[drop] = null
        t = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        loss = model.per_sample_loss(z0, e, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        total += float(loss.detach())
    model.unet.eval()
    return total / cfg.steps


def run_sd_loop(
    model: SDModel,
    real: ImageSet,
    captions: Sequence[str],
    heldout_prompts: Sequence[str],
    cfg: SDLoopConfig,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Run the loop in place on ``model`` (its U-Net is fine-tuned); returns and logs one row per generation.

    ``real`` are RGB ``uint8`` images at the model's resolution with one caption each. Row 0 measures the
    starting model. Drift is the mean normalized L2 between the images the model makes now and at generation 0
    from the same prompts and seeds (``train`` prompts: the first captions; ``heldout`` prompts: never trained).
    """
    cfg.validate()
    if len(captions) != len(real):
        raise ConfigError(f"got {len(captions)} captions for {len(real)} real images")
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = _trainable(model, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    train_prompts = list(dict.fromkeys(captions))[: max(1, len(heldout_prompts))]
    eval_prompts = train_prompts + list(heldout_prompts)
    labels = np.repeat(np.arange(len(eval_prompts)), cfg.eval_seeds)
    seeds = np.tile(np.arange(cfg.eval_seeds), len(eval_prompts)) + 10_000 * cfg.seed
    is_train = labels < len(train_prompts)
    real_latents = model.encode_images(images_to_tensor(real.images)).float().cpu()
    null = model.encode_prompts([""])[0]
    sample_kw = dict(
        sampler=cfg.sampler, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, show_progress=show_progress
    )

    def measure(g: int, phase: str, n_syn: int, train_loss: float | None, base: np.ndarray | None) -> np.ndarray:
        out = generate_sd(model, eval_prompts, labels, seeds, generation=g, **sample_kw).images
        f0 = out.reshape(len(out), -1).astype(np.float32) / 255
        drift = (
            np.sqrt(((f0 - base.reshape(len(out), -1).astype(np.float32) / 255) ** 2).mean(1))
            if base is not None
            else np.zeros(len(out))
        )
        nn_d, _ = nearest_neighbors(out, real.images, k=1, metric="l2")
        div = []
        for p in range(len(eval_prompts)):
            d = pairwise_distances(out[labels == p], out[labels == p], metric="l2")
            div.append(d[~np.eye(len(d), dtype=bool)].mean() if len(d) > 1 else 0.0)
        row = {
            KEY_GENERATION: g,
            KEY_MODEL_ID: model.model_id,
            KEY_PHASE: phase,
            KEY_NUM_SYNTHETIC: n_syn,
            KEY_TRAIN_LOSS: train_loss,
            KEY_REAL_LOSS_T100: float(
                latent_losses(model, real, captions, t=100, seed=cfg.seed, show_progress=False).mean()
            ),
            KEY_DRIFT_TRAIN: float(drift[is_train].mean()),
            KEY_DRIFT_HELDOUT: float(drift[~is_train].mean()) if (~is_train).any() else None,
            KEY_NN_REAL: float(nn_d[:, 0].mean()),
            KEY_DIVERSITY: float(np.mean(div)),
        }
        log(row)
        rows.append(row)
        return out

    rows: list[dict[str, Any]] = []
    base = measure(0, "start", 0, None, None)
    total = cfg.generations + cfg.heal_generations
    for g in range(1, total + 1):
        healing = g > cfg.generations
        n_syn = 0 if healing else int(round(cfg.synthetic_fraction * len(real)))
        pick = rng.choice(len(real), size=n_syn, replace=False) if n_syn else np.zeros(0, dtype=np.int64)
        latents, texts = real_latents.clone(), list(captions)
        if n_syn:
            # Self-generated images: img2img from the real images they replace, with those images' captions.
            syn = generate_sd(
                model,
                [captions[i] for i in pick],
                np.arange(n_syn),
                [cfg.seed * 1_000_000 + g * 10_000 + i for i in range(n_syn)],
                init_images=real.images[pick],
                strength=cfg.strength,
                generation=g,
                **sample_kw,
            )
            latents[torch.from_numpy(pick)] = model.encode_images(images_to_tensor(syn.images)).float().cpu()
        embeds = model.encode_prompts(texts)
        loss = _fine_tune(model, opt, params, latents, embeds, null, cfg, gen)
        model.model_id = unet_state_id(model.unet)  # the fine-tuned U-Net is a new model for provenance
        measure(g, "heal" if healing else "loop", n_syn, loss, base)
    return rows


def config_dict(cfg: SDLoopConfig) -> dict[str, Any]:
    """The loop configuration with the reason for each choice the paper leaves open."""
    return {
        **asdict(cfg),
        "reasons": {
            "synthetic_fraction": "Bohacek & Farid: 30 self-generated of 900 already collapsed by generation 5",
            "mix": "synthetic images replace the real images they were made from, so the set keeps its size",
            "steps/learning_rate/batch_size": "not published by the paper; recorded here",
            "latents": "VAE posterior means of the training images, cached per generation",
            "eval": "fixed seeds per prompt; first captions as retrained prompts plus held-out prompts",
        },
    }
