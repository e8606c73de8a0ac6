"""The loop engine against theory: Gaussian variance collapse (Shumailov et al.) and replace vs accumulate
(Gerstgrasser et al.), run through the same engine as the diffusion model, on 1-pixel "images"."""

from __future__ import annotations

import numpy as np

from diffaudit.loop.theory import variance_ratios


def test_replace_variance_matches_shumailov():
    # Model t is the (t+1)-th maximum-likelihood fit to n samples: E[sigma_t^2] = sigma^2 ((n-1)/n)^(t+1).
    n, generations, repeats = 10, 4, 400
    ratios = variance_ratios("fully-synthetic", n, generations, repeats, seed=1)
    mean = ratios.mean(0)
    sem = ratios.std(0, ddof=1) / np.sqrt(repeats)
    theory = ((n - 1) / n) ** (np.arange(generations + 1) + 1)
    assert (np.abs(mean - theory) < 4 * sem).all(), (mean, theory, sem)
    # And the collapse itself is resolved, not noise: generation 4 is far below generation 0.
    assert mean[0] - mean[-1] > 6 * np.hypot(sem[0], sem[-1])


def test_accumulate_stays_bounded_while_replace_degrades():
    n, generations, repeats = 10, 8, 120
    replace = variance_ratios("fully-synthetic", n, generations, repeats, seed=2).mean(0)
    accumulate = variance_ratios("accumulate", n, generations, repeats, seed=3).mean(0)
    assert replace[-1] < 0.5  # theory 0.9^9 = 0.39
    assert accumulate[-1] > 0.7  # keeps the real data: bounded loss of variance
    # Accumulating barely moves after the first generations (bounded), replacing keeps shrinking.
    assert abs(accumulate[-1] - accumulate[4]) < 0.1
    assert replace[-1] < replace[4] - 0.1
