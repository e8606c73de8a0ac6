"""Sampling behind a copy filter: blocked outputs are re-sampled with new seeds, a bounded number of times.

:func:`guarded_generate` wraps any generator's ``sample``. Image ``i`` is first sampled with
``seeds[i]``; while the filter blocks it, it is re-sampled with :func:`retry_seed` ``(seeds[i], attempt)`` for
``attempt = 1 .. max_retries``. The retry seed depends only on the original seed and the attempt, so the
result for one image still never depends on the batch or on which other images were blocked. An image still
blocked after ``max_retries`` re-samples is dropped (default) or kept and flagged, and the record says which.
Every blocked attempt is recorded with its seed, nearest training id and distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.base import Generator
from diffaudit.guards.copy_filter import CopyFilter

DEFAULT_MAX_RETRIES = 5
#: Retry seeds live below 2**62, so that int64 provenance columns and torch generators take them.
_RETRY_SEED_BITS = 62


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of re-sample ``attempt`` (>= 1) of the image first sampled with ``seed``.

    Hashed with ``np.random.SeedSequence`` rather than ``seed + attempt`` so that retries do not collide
    with the next images' ordinary seeds (a run uses consecutive seeds).
    """
    if attempt == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(attempt), 0x6775617264]).generate_state(2, np.uint32)
    return int(((int(state[0]) << 32) | int(state[1])) >> (64 - _RETRY_SEED_BITS))


def guarded_generate(
    gen: Generator,
    labels: np.ndarray,
    seeds: Sequence[int],
    options: dict[str, Any],
    copy_filter: CopyFilter,
    generation: int = -1,
    max_retries: int = DEFAULT_MAX_RETRIES,
    keep_exhausted: bool = False,
    show_progress: bool = True,
) -> tuple[ImageSet, dict[str, Any]]:
    """Sample like ``gen.sample``, re-sampling images the copy filter blocks.

    Args:
        gen, labels, seeds, generation, show_progress: as for :meth:`Generator.sample` (``labels`` ``int64``
            ``(N,)``, one seed per image); ``options``: its other keyword arguments (sampler, steps, guidance...).
        copy_filter: decides which outputs are copies of training images.
        max_retries: re-samples allowed per image (0: only filter, never re-sample).
        keep_exhausted: keep images still blocked after ``max_retries`` (flagged in the record) instead of
            dropping them.

    Returns:
        ``(images, record)``: the passed images in request order (the provenance ``seed`` column holds the
        seed that produced each), and a JSON-ready record with ``blocked`` (every blocked attempt: position,
        label, seed, attempt, nearest id, distance, threshold), ``gave_up`` (positions still blocked after the
        bound) and counts.
    """
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be a non-negative integer; got {max_retries!r}")
    labels = np.asarray(labels, dtype=np.int64)
    seeds = [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise ConfigError(f"got {len(labels)} labels for {len(seeds)} seeds")
    result = gen.sample(labels, seeds, generation=generation, show_progress=show_progress, **options)
    images = result.images.copy()
    used_seeds = np.array(seeds, dtype=np.int64)
    blocked_log: list[dict[str, Any]] = []
    pending = np.arange(len(seeds))
    current = result
    for attempt in range(max_retries + 1):
        decisions = copy_filter.check(current)
        still = []
        for row, d in zip(pending.tolist(), decisions, strict=True):
            if d.blocked:
                still.append(row)
                blocked_log.append(
                    {
                        "position": row,
                        "label": int(labels[row]),
                        "seed": int(used_seeds[row]),
                        "attempt": attempt,
                        "nearest_id": d.nearest_id,
                        "distance": d.distance,
                        "threshold": d.threshold,
                        "l2": d.l2,
                        "delta": d.delta,
                    }
                )
        pending = np.array(still, dtype=np.int64)
        if pending.size == 0 or attempt == max_retries:
            break
        new_seeds = [retry_seed(seeds[i], attempt + 1) for i in pending.tolist()]
        current = gen.sample(labels[pending], new_seeds, generation=generation, **options)
        images[pending] = current.images
        used_seeds[pending] = new_seeds
    gave_up = pending.tolist()
    keep = np.ones(len(seeds), dtype=bool)
    if not keep_exhausted:
        keep[gave_up] = False
    out = ImageSet(
        images,
        labels,
        result.class_names,
        {k: v.copy() for k, v in result.provenance.items()} | {"seed": used_seeds},
    ).subset(keep)
    retried = sorted({b["position"] for b in blocked_log})
    record = {
        "filter": copy_filter.describe(),
        "max_retries": max_retries,
        "retry_seed_rule": "numpy SeedSequence([seed, attempt, 'guard']) -> 62-bit seed (retry_seed)",
        "keep_exhausted": keep_exhausted,
        "num_requested": len(seeds),
        "num_returned": len(out),
        "num_blocked_attempts": len(blocked_log),
        "num_images_resampled": len(retried),
        "num_gave_up": len(gave_up),
        "blocked": blocked_log,
        "gave_up": [
            {
                "position": i,
                "label": int(labels[i]),
                "seeds_tried": [retry_seed(seeds[i], a) for a in range(max_retries + 1)],
                "kept": keep_exhausted,
            }
            for i in gave_up
        ],
    }
    return out, record
