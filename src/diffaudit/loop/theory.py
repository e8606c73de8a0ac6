"""Analytic checks of the loop engine: Shumailov et al.'s variance collapse and Gerstgrasser et al.'s
replace-vs-accumulate, run through the same engine as the diffusion model on 1-pixel "images"."""

from __future__ import annotations

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.loop.config import LoopConfig
from diffaudit.loop.engine import run_repeat

#: Pixel standard deviation of the real data (grey levels / 255); the mean 128 keeps clipping beyond 3 sigma.
SIGMA = 40 / 255


def variance_ratios(mode: str, n: int, generations: int, repeats: int, seed: int) -> np.ndarray:
    """Fitted variance / sigma^2 per repeat and generation, ``float64 (repeats, generations + 1)``.

    Each repeat draws a fresh real sample of ``n`` 1-pixel images from N(128, 40^2) grey levels and runs a fully
    synthetic loop of the Gaussian backend in ``mode`` (``fully-synthetic`` = replace, or ``accumulate``).
    Theory for replace: E[ratio_t] = ((n - 1) / n) ** (t + 1) (generation 0 is already one fit).
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((repeats, generations + 1))
    for r in range(repeats):
        x = np.clip(np.round(128 + 40 * rng.standard_normal(n)), 0, 255).astype(np.uint8).reshape(n, 1, 1, 1)
        cfg = LoopConfig(
            backend="gaussian",
            mode=mode,
            train_size=n,
            synthetic_share=1.0,
            poison_generations=generations,
            heal_generations=0,
            num_samples=n,
            features="none",
            seed=seed * 100_000 + r,
        )
        rows = run_repeat(cfg, ImageSet(x, np.full(n, -1)))
        out[r] = [row["fitted_variance"] for row in rows]
    return out / SIGMA**2
