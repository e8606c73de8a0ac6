"""Inference-time mitigations of memorization, as sampling options of every denoising generator.

* **Wen et al. (ICLR 2024)**, :func:`wen_mitigate` / :func:`sample_wen`: before sampling, the condition embedding
  of each request (text embeddings of a pipeline; the class-embedding vector of our U-Net,
  :meth:`~diffaudit.generators.denoising.DenoisingGenerator.condition_embedding`) is optimised with Adam to
  shrink the text-conditional noise gap ``RMS(eps(x_T, e) - eps(x_T, null))`` at the first sampling step (x_T: the
  request's seeded initial noise), stopping per request as soon as the gap is at most ``target``. Memorized
  prompts have large gaps (the detection statistic, ``Generator.guidance_gap``); the paper mitigates by pulling
  the gap under a target (``l_target``) and then sampling from the perturbed embedding.
* **Anti-memorization guidance** (Chen et al., CVPR 2024, AMG), :func:`amg_generator` / :func:`sample_amg`: at
  every sampling step the prediction of the clean image ``x0_hat`` is compared with its nearest training image
  (normalized pixel L2, the copy filter's distance); when it is closer than the threshold, ``x0_hat`` is pushed
  straight away from that neighbour to ``margin * threshold`` (``scale`` 1; a fraction of the way for smaller
  scales), and the step continues from the network output that predicts the pushed ``x0`` (the dissimilarity
  guidance of AMG in its simplest form; despecification and caption-deduplication guidance need captions and
  are not implemented). Requests whose prediction never comes close are sampled exactly as without AMG.

Both return a *copy* of the generator with a hook set (``_sampling_condition`` or ``sampling_hook``), so the
shared generator is never changed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import NULL_CONDITION, check_requests, seeded_noise
from diffaudit.generators.denoising import DenoisingGenerator
from diffaudit.generators.schedulers import make_scheduler, training_scheduler


def _denoising(gen: Any) -> DenoisingGenerator:
    if not isinstance(gen, DenoisingGenerator):
        raise ConfigError(f"{type(gen).__name__} is not a denoising generator; this mitigation needs one")
    return gen


# ---- Wen et al.: minimise the conditional noise gap before sampling ---------------------------------------------
@dataclass(frozen=True)
class WenConfig:
    """``target``: stop once a request's first-step gap is at most this (Wen et al.'s ``l_target``; same units as
    ``Generator.guidance_gap``, RMS per element). ``max_steps`` Adam steps at ``lr`` (the paper: lr 0.05)."""

    target: float
    max_steps: int = 10
    lr: float = 0.05
    num_steps: int = 50  # the sampler's step count: fixes the first timestep the gap is measured at

    def validate(self) -> None:
        if not self.target >= 0:
            raise ConfigError(f"Wen target gap must be >= 0, got {self.target}")
        if self.max_steps < 0 or not self.lr > 0 or self.num_steps < 1:
            raise ConfigError("Wen mitigation needs max_steps >= 0, lr > 0 and num_steps >= 1")


def first_step_gap(
    gen: DenoisingGenerator, emb: torch.Tensor, null: torch.Tensor, seeds: Sequence[int], num_steps: int
) -> torch.Tensor:
    """``RMS(eps(x_T, emb) - eps(x_T, null))`` per request ``(N,)`` at the first DDIM step, differentiable in ``emb``.

    Equals ``gen.guidance_gap(labels, seeds, num_steps=num_steps, measure_steps=1)`` when ``emb`` is the
    labels' own embedding (tested).
    """
    sched = make_scheduler("ddim", gen.scheduler_config, num_steps, gen.pixel_space)
    t = sched.timesteps[0]
    z = seeded_noise(gen.latent_shape, list(seeds)).to(gen.device, gen.dtype) * sched.init_noise_sigma
    zin = sched.scale_model_input(z, t)
    tt = torch.full((len(seeds),), int(t), dtype=torch.long, device=gen.device)
    eps_c = gen._predict(zin, tt, emb)
    with torch.no_grad():
        eps_n = gen._predict(zin, tt, null)
    return (eps_c.float() - eps_n.float()).flatten(1).pow(2).mean(1).sqrt()


def wen_mitigate(
    gen: Any, labels: np.ndarray, seeds: Sequence[int], cfg: WenConfig, batch_size: int = 64
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimised condition embeddings, one per request ``(N, ...)``, and a record.

    The record holds ``gap_before`` / ``gap_after`` (``float`` lists, first-step gap), ``steps`` (Adam steps each
    request took; 0 when already under the target), ``reached`` (how many end at or under the target),
    ``seconds`` and the config.
    """
    gen = _denoising(gen)
    cfg.validate()
    seeds = [int(s) for s in seeds]
    labels = check_requests(labels, seeds, len(gen.conditions))
    if not gen.conditional:
        raise ConfigError("Wen et al.'s mitigation needs a conditional generator")
    if labels.size and labels.min() < 0:
        raise ConfigError("Wen et al.'s mitigation applies to real conditions, not the null condition (-1)")
    start = time.perf_counter()
    outs, before, after, used = [], [], [], []
    for lo in range(0, len(seeds), batch_size):
        hi = min(lo + batch_size, len(seeds))
        lab = torch.from_numpy(labels[lo:hi]).to(gen.device)
        with torch.no_grad():
            e0 = gen.condition_embedding(lab).detach().clone()
            null = gen.condition_embedding(torch.full_like(lab, NULL_CONDITION)).detach()
        emb = e0.clone().float().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=cfg.lr)
        final = e0.clone()
        steps = np.zeros(hi - lo, dtype=np.int64)
        active = np.ones(hi - lo, dtype=bool)
        gap = first_step_gap(gen, emb.to(e0.dtype), null, seeds[lo:hi], cfg.num_steps)
        before.extend(gap.detach().double().cpu().tolist())
        for step in range(cfg.max_steps + 1):
            done = (gap.detach().cpu().numpy() <= cfg.target) & active
            for i in np.flatnonzero(done):  # first time under the target: keep this embedding
                final[i] = emb.detach()[i].to(final.dtype)
                steps[i] = step
            active &= ~done
            if not active.any() or step == cfg.max_steps:
                break
            opt.zero_grad(set_to_none=True)
            # Requests are independent through the network, so the summed loss gives each embedding its own gradient.
            gap.pow(2).sum().backward()
            opt.step()
            gap = first_step_gap(gen, emb.to(e0.dtype), null, seeds[lo:hi], cfg.num_steps)
        for i in np.flatnonzero(active):  # never reached the target: the last iterate
            final[i] = emb.detach()[i].to(final.dtype)
            steps[i] = cfg.max_steps
        with torch.no_grad():
            after.extend(first_step_gap(gen, final, null, seeds[lo:hi], cfg.num_steps).double().cpu().tolist())
        outs.append(final)
        used.extend(steps.tolist())
    record = {
        "mitigation": "wen",
        "config": asdict(cfg),
        "gap_before": before,
        "gap_after": after,
        "steps": used,
        "reached": int(sum(a <= cfg.target + 1e-12 for a in after)),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return torch.cat(outs) if outs else torch.zeros(0), record


def with_embeddings(gen: DenoisingGenerator, seeds: Sequence[int], embeddings: torch.Tensor) -> DenoisingGenerator:
    """A copy of ``gen`` that samples request ``seed`` from ``embeddings[i]`` (``seeds[i] == seed``).

    Its ``_condition`` returns continuous embeddings (so the null condition is one too and guidance mixes the two
    as usual); sampling any seed not in ``seeds`` is an error.
    """
    table = {int(s): i for i, s in enumerate(seeds)}
    if len(table) != len(seeds):
        raise ConfigError("Wen-mitigated sampling needs distinct seeds (each seed carries its own embedding)")
    other = copy.copy(gen)
    other._condition = gen.condition_embedding  # type: ignore[method-assign]

    def sampling_condition(labels: torch.Tensor, batch_seeds: Sequence[int]) -> torch.Tensor:
        missing = [int(s) for s in batch_seeds if int(s) not in table]
        if missing:
            raise ConfigError(f"no optimised embedding for seeds {missing[:5]}")
        rows = torch.tensor([table[int(s)] for s in batch_seeds], dtype=torch.long, device=embeddings.device)
        return embeddings[rows].to(gen.device, gen.dtype)

    other._sampling_condition = sampling_condition  # type: ignore[method-assign]
    return other


def sample_wen(
    gen: Any, labels: np.ndarray, seeds: Sequence[int], cfg: WenConfig, **sample_kwargs: Any
) -> tuple[ImageSet, dict[str, Any]]:
    """Wen et al.'s mitigation as a sampling option: optimise the embeddings, then ``sample`` from them."""
    gen = _denoising(gen)
    emb, record = wen_mitigate(gen, labels, seeds, cfg, batch_size=int(sample_kwargs.get("batch_size", 64)))
    sample_kwargs.setdefault("num_steps", cfg.num_steps)
    out = with_embeddings(gen, seeds, emb).sample(np.asarray(labels), seeds, **sample_kwargs)
    return out, record


# ---- anti-memorization guidance ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AMGConfig:
    """``threshold``: normalized pixel L2 under which ``x0_hat`` counts as a copy (None: the index's calibrated
    threshold when the index is a pixel-L2 one, else Carlini's 0.15); ``margin``: push to ``margin * threshold``;
    ``scale`` in (0, 1]: the fraction of the way pushed at each step."""

    threshold: float | None = None
    margin: float = 1.0
    scale: float = 1.0

    def validate(self) -> None:
        if self.threshold is not None and not self.threshold > 0:
            raise ConfigError(f"AMG threshold must be > 0, got {self.threshold}")
        if not self.margin >= 1.0 or not 0.0 < self.scale <= 1.0:
            raise ConfigError(f"AMG needs margin >= 1 and scale in (0, 1]; got {self.margin}, {self.scale}")


def amg_threshold(index: Any, cfg: AMGConfig) -> float:
    """The AMG trigger distance for ``index`` (a :class:`~diffaudit.guards.index.TrainingIndex`)."""
    if cfg.threshold is not None:
        return float(cfg.threshold)
    calibrated = (index.calibration or {}).get("calibrated", {})
    if index.features == "pixels" and index.metric == "l2" and "threshold" in calibrated:
        return float(calibrated["threshold"])
    return float((index.calibration or {}).get("absolute", {}).get("threshold", 0.15))


class _AMGHook:
    """The per-step hook: push ``x0_hat`` away from its nearest training image when it is within the threshold."""

    def __init__(self, gen: DenoisingGenerator, train: np.ndarray, threshold: float, cfg: AMGConfig) -> None:
        self.train = torch.from_numpy(train.reshape(len(train), -1).astype(np.float32) / 255.0)
        self.threshold, self.cfg = threshold, cfg
        sched = training_scheduler(gen.scheduler_config)
        self.alphas = sched.alphas_cumprod.double()
        self.prediction = sched.config.prediction_type
        self.pushes = 0  # (request, step) pairs pushed
        self.min_distance: list[float] = []

    def nearest(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized L2 (pixels in [0, 1]) to the nearest training image and its row, for ``p`` ``(B, D)``."""
        d2 = (p.pow(2).sum(1, keepdim=True) - 2 * p @ self.train.T + self.train.pow(2).sum(1)).clamp_min(0)
        d2, idx = d2.min(1)
        return (d2 / p.shape[1]).sqrt(), idx

    def __call__(self, gen: DenoisingGenerator, out: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
        ab = self.alphas[t].item()
        a, s = ab**0.5, (1 - ab) ** 0.5
        zf, of = z.double(), out.double()
        x0 = (zf - s * of) / a if self.prediction == "epsilon" else a * zf - s * of
        pix = ((gen._decode(x0.to(z.dtype)).float().clamp(-1, 1) + 1) / 2).flatten(1).cpu()
        d, idx = self.nearest(pix)
        self.min_distance.append(float(d.min()) if len(d) else float("nan"))
        close = torch.nonzero(d < self.threshold).flatten()
        if not len(close):
            return out
        self.pushes += len(close)
        p, n = pix[close], self.train[idx[close]]
        diff = p - n
        norm = diff.norm(dim=1, keepdim=True)
        # An exact copy has no direction away from its neighbour: take a fixed pseudo-random one.
        fallback = torch.randn(diff.shape, generator=torch.Generator().manual_seed(0))
        diff = torch.where(norm > 1e-8, diff, fallback)
        unit = diff / diff.norm(dim=1, keepdim=True)
        goal = self.cfg.margin * self.threshold * p.shape[1] ** 0.5  # un-normalized target distance
        step = self.cfg.scale * (goal - d[close, None] * p.shape[1] ** 0.5)
        now = torch.where(norm > 1e-8, norm, torch.zeros_like(norm))
        pushed = ((n + (now + step) * unit) * 2 - 1).clamp(-1, 1)
        shape = (len(close), *gen.image_shape)
        x0_new = gen._encode(pushed.reshape(shape).to(gen.device)).double()
        rows = close.to(out.device)
        # The network output that predicts the pushed x0 at this z_t (epsilon, or velocity).
        new = (zf[rows] - a * x0_new) / s if self.prediction == "epsilon" else (a * zf[rows] - x0_new) / s
        out = out.clone()
        out[rows] = new.to(out.dtype)
        return out


def amg_generator(gen: Any, index: Any, cfg: AMGConfig | None = None) -> tuple[DenoisingGenerator, _AMGHook]:
    """A copy of ``gen`` sampling with anti-memorization guidance against ``index``'s training images, and its hook
    (``hook.pushes``: request-steps pushed so far)."""
    gen = _denoising(gen)
    cfg = cfg or AMGConfig()
    cfg.validate()
    if tuple(index.shape) != tuple(gen.image_shape):
        raise ConfigError(f"the index holds {index.shape} images but the generator makes {gen.image_shape}")
    hook = _AMGHook(gen, index.images, amg_threshold(index, cfg), cfg)
    other = copy.copy(gen)
    other.sampling_hook = hook
    return other, hook


def sample_amg(
    gen: Any, labels: np.ndarray, seeds: Sequence[int], index: Any, cfg: AMGConfig | None = None, **sample_kwargs: Any
) -> tuple[ImageSet, dict[str, Any]]:
    """Sample with AMG. Generators with a sampler of their own (the analytic family's exact draws) are sampled by
    the shared denoising sampler (``sampler``, default DDIM) over their denoiser, which AMG can guide."""
    guided, hook = amg_generator(gen, index, cfg)
    sampler = sample_kwargs.setdefault("sampler", "ddim")
    sched = make_scheduler(sampler, guided.scheduler_config, int(sample_kwargs.get("num_steps", 50)), True)
    if float(sched.init_noise_sigma) != 1.0:
        raise ConfigError(f"AMG needs a variance-preserving sampler (ddim, ddpm, dpm++), not {sampler!r}")
    start = time.perf_counter()
    out = DenoisingGenerator.sample(guided, np.asarray(labels), seeds, **sample_kwargs)
    record = {
        "mitigation": "amg",
        "config": asdict(cfg or AMGConfig()),
        "threshold": hook.threshold,
        "pushes": hook.pushes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return out, record
