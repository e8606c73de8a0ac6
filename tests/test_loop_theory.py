"""The loop engine against theory: Gaussian variance collapse (Shumailov et al.) and replace vs accumulate
(Gerstgrasser et al.), run through the same engine as the diffusion model, on 1-pixel "images"."""

from __future__ import annotations

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.loop.engine import LoopConfig, run_repeat

SIGMA = 40 / 255  # pixel units; mean 128/255 keeps clipping at 0 and 255 beyond 3 sigma


def _variances(mode: str, n: int, generations: int, repeats: int, seed: int) -> np.ndarray:
    """Fitted variance / sigma^2, shape (repeats, generations + 1); a fresh real sample per repeat."""
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


def test_replace_variance_matches_shumailov():
    # Model t is the (t+1)-th maximum-likelihood fit to n samples: E[sigma_t^2] = sigma^2 ((n-1)/n)^(t+1).
    n, generations, repeats = 10, 4, 400
    ratios = _variances("fully-synthetic", n, generations, repeats, seed=1)
    mean = ratios.mean(0)
    sem = ratios.std(0, ddof=1) / np.sqrt(repeats)
    theory = ((n - 1) / n) ** (np.arange(generations + 1) + 1)
    assert (np.abs(mean - theory) < 4 * sem).all(), (mean, theory, sem)
    # And the collapse itself is resolved, not noise: generation 4 is far below generation 0.
    assert mean[0] - mean[-1] > 6 * np.hypot(sem[0], sem[-1])


def test_accumulate_stays_bounded_while_replace_degrades():
    n, generations, repeats = 10, 8, 120
    replace = _variances("fully-synthetic", n, generations, repeats, seed=2).mean(0)
    accumulate = _variances("accumulate", n, generations, repeats, seed=3).mean(0)
    assert replace[-1] < 0.5  # theory 0.9^9 = 0.39
    assert accumulate[-1] > 0.7  # keeps the real data: bounded loss of variance
    # Accumulating barely moves after the first generations (bounded), replacing keeps shrinking.
    assert abs(accumulate[-1] - accumulate[4]) < 0.1
    assert replace[-1] < replace[4] - 0.1
