"""Choosing what a generator samples: opening ``--model`` with its conditions, labels and per-condition seeds.

Every command that takes ``--model RUN_OR_DIR`` opens it through :func:`open_generator`: our model or run
directories, analytic model directories and diffusers pipeline directories (``model_index.json``, or
``sd:PATH``) alike. A pipeline's conditions (prompts) come from ``--prompts FILE`` or from a captioned data
source (its unique captions); a class model's conditions are its classes, chosen with ``--labels``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators import PIPELINE, Generator, family_of, load_generator


def open_generator(
    model: str | os.PathLike[str],
    prompts_file: str | os.PathLike[str] | None = None,
    captions_from: ImageSet | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> tuple[Generator, dict[int, int]]:
    """Load ``model`` with its conditions; returns the generator and ``{condition: first seed}`` from the file.

    Pipelines take their prompts from ``prompts_file`` (one per line, or JSONL with an optional first ``seed``
    per prompt) or else from ``captions_from.class_names``; a pipeline with neither is an error, since a
    text-to-image model has no conditions of its own. Class and analytic models ignore both unless given,
    in which case the names must match their classes.
    """
    from diffaudit.data.prompts import read_prompts

    first_seeds: dict[int, int] = {}
    conditions: Sequence[str] | None = None
    if prompts_file is not None:
        entries = read_prompts(Path(prompts_file))
        conditions = [e.prompt for e in entries]
        first_seeds = {i: e.seed for i, e in enumerate(entries) if e.seed is not None}
    elif captions_from is not None and captions_from.class_names:
        conditions = captions_from.class_names
    if conditions is None and family_of(model) == PIPELINE:
        raise ConfigError(
            f"{model}: a text-to-image pipeline needs conditions: pass --prompts FILE (one prompt a line) or a "
            "captioned data source (captioned:DIR, whose captions become the prompts)"
        )
    return load_generator(model, conditions=conditions, device=device, dtype=dtype), first_seeds


def parse_labels(spec: str, num_images: int, conditions: Sequence[str]) -> np.ndarray:
    """Labels for ``num_images`` samples from a spec, ``int64 (num_images,)``.

    ``all``: cycle through every condition (0, 1, ..., K-1, 0, ...); ``none``: unconditional (-1);
    ``3,5`` or ``A,B``: cycle through the listed condition indices or names.
    """
    k = len(conditions)
    if num_images < 0:
        raise ConfigError(f"number of images must be >= 0, got {num_images}")
    if spec == "none" or k == 0:
        return np.full(num_images, -1, dtype=np.int64)
    if spec == "all":
        chosen = list(range(k))
    else:
        chosen = []
        for item in spec.split(","):
            item = item.strip()
            if item in conditions:
                chosen.append(list(conditions).index(item))
            elif item.lstrip("-").isdigit() and 0 <= int(item) < k:
                chosen.append(int(item))
            else:
                raise ConfigError(f"label {item!r} is neither a condition name nor an index in [0, {k})")
    return np.array([chosen[i % len(chosen)] for i in range(num_images)], dtype=np.int64)


def per_condition_seeds(
    conditions: Sequence[int], per_condition: int, seed: int, first_seeds: dict[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and seeds for ``per_condition`` images of each listed condition (``int64`` arrays).

    Condition ``c`` at position ``p`` of ``conditions`` uses seeds ``seed + p * N ... seed + p * N + N - 1``
    (disjoint across conditions), unless ``first_seeds`` names its first seed (a prompts file may).
    """
    if per_condition < 1:
        raise ConfigError(f"images per condition must be >= 1, got {per_condition}")
    first_seeds = first_seeds or {}
    labels = np.repeat(np.asarray(list(conditions), dtype=np.int64), per_condition)
    seeds = np.concatenate(
        [np.arange(per_condition) + first_seeds.get(int(c), seed + p * per_condition) for p, c in enumerate(conditions)]
        or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    return labels, seeds
