"""Wen et al. (ICLR 2024) memorization detector over any generator: class labels or prompts as conditions.

A memorized prompt pulls generation toward one training image from the very first steps, so the conditional
noise prediction differs strongly from the unconditional one. Per condition ``c`` the signal is

    m(c) = mean over seeds s of guidance_gap(c, s)

where :meth:`diffaudit.generators.base.Generator.guidance_gap` is the RMS of ``eps(z_t, c) - eps(z_t, null)``
over the first ``measure_steps`` steps of the guided DDIM trajectory from seed ``s`` (RMS over the ``d`` values
the network denoises, pixels or VAE latents: comparable across resolutions, where Wen et al. use the plain
norm). Every condition uses the same seeds, so conditions are compared on identical starting noise. This module
only arranges requests and reports; it computes no trajectory of its own.

:func:`compare_with_extraction` lines the per-label signal up with the clique flags of an extraction run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator
from diffaudit.progress import progress_bar

KEY_LABEL = "label"
KEY_NAME = "name"
KEY_SCORE = "noise_gap"
KEY_STD = "noise_gap_std"
KEY_PER_SEED = "per_seed"


def noise_gaps(
    generator: Generator,
    labels: Sequence[int],
    seeds: Sequence[int],
    num_steps: int = 50,
    measure_steps: int = 10,
    guidance_scale: float = 2.0,
    batch_size: int = 64,
) -> np.ndarray:
    """The guidance gap of every (label, seed) pair, ``float64 (len(labels), len(seeds))``.

    Entry ``[i, j]`` is :meth:`Generator.guidance_gap` of ``(labels[i], seeds[j])``: the RMS of
    ``eps(z_t, c) - eps(z_t, null)`` over the first ``measure_steps`` of a ``num_steps``-step DDIM trajectory
    guided at ``guidance_scale`` (the one definition of the statistic; this module only arranges requests).
    """
    labels = [int(c) for c in labels]
    seeds = [int(s) for s in seeds]
    bad = [c for c in labels if not 0 <= c < len(generator.conditions)]
    if bad:
        raise ConfigError(f"labels {bad} outside [0, {len(generator.conditions)}) (the model's conditions)")
    flat_labels = np.repeat(np.asarray(labels, dtype=np.int64), len(seeds))
    flat_seeds = seeds * len(labels)
    gaps = generator.guidance_gap(
        flat_labels,
        flat_seeds,
        num_steps=num_steps,
        measure_steps=measure_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    return np.asarray(gaps, dtype=np.float64).reshape(len(labels), len(seeds))


def wen_report(
    generator: Generator,
    labels: Sequence[int] | None = None,
    num_seeds: int = 16,
    num_steps: int = 50,
    measure_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict[str, object]:
    """Per-condition memorization signal: rows ``{label, name, noise_gap, noise_gap_std, per_seed}``.

    ``labels``: condition indices to score (default: all of the generator's conditions: classes, or prompts).
    Seeds are ``seed .. seed + num_seeds - 1`` for every label, so conditions are compared on identical
    starting noise. Rows are sorted by label; the keys are the same for every generator family.
    """
    if num_seeds < 1:
        raise ConfigError(f"num_seeds must be >= 1, got {num_seeds}")
    names = generator.conditions
    if not names:
        raise ConfigError("Wen et al.'s detector needs a conditional model (condition vs null prediction)")
    labels = sorted(range(len(names)) if labels is None else {int(c) for c in labels})
    seeds = list(range(seed, seed + num_seeds))
    rows = []
    with progress_bar("wen detector", total=len(labels), enabled=show_progress) as bar:
        for c in labels:
            gaps = noise_gaps(generator, [c], seeds, num_steps, measure_steps, guidance_scale, batch_size)[0]
            rows.append(
                {
                    KEY_LABEL: c,
                    KEY_NAME: names[c],
                    KEY_SCORE: float(gaps.mean()),
                    KEY_STD: float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0,
                    KEY_PER_SEED: gaps.tolist(),
                }
            )
            bar.update(advance=1)
    return {
        "settings": {
            "num_seeds": num_seeds,
            "seeds": [seed, seed + num_seeds - 1],
            "sampler": "ddim",
            "num_steps": num_steps,
            "measure_steps": measure_steps,
            "guidance_scale": guidance_scale,
            "norm": "RMS over the denoised space of eps(z_t, condition) - eps(z_t, null)",
            "model_id": generator.model_id,
        },
        "per_label": rows,
    }


def read_extraction_flags(path: str | os.PathLike[str]) -> dict[int, dict[str, object]]:
    """Per-label clique results ``{label: {"flagged", "clique_size", "extracted"}}`` from an extract run.

    Accepts a run directory or its ``results.json``: the ``labels`` rows of :mod:`diffaudit.attacks.extraction`
    (keys ``label``, ``flagged``, ``clique_size``, ``extracted``); rows keyed ``prompt_index`` (the Stable
    Diffusion pipeline) and a top-level list of rows are accepted too.
    """
    from diffaudit.attacks import extraction as ex

    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: cannot read extraction results ({exc})") from exc
    rows = data
    if isinstance(data, dict):
        rows = next((data[k] for k in ("labels", "prompts", "rows") if isinstance(data.get(k), list)), None)
    if not isinstance(rows, list):
        raise DataError(f"{p}: no per-label rows found (expected a 'labels' list as written by diffaudit extract)")
    out: dict[int, dict[str, object]] = {}
    for row in rows:
        label = row.get(ex.LABEL, row.get("prompt_index")) if isinstance(row, dict) else None
        if not isinstance(label, int) or ex.FLAGGED not in row:
            raise DataError(f"{p}: row {str(row)[:80]} lacks an integer label or a '{ex.FLAGGED}' field")
        out[label] = {
            "flagged": bool(row[ex.FLAGGED]),
            "clique_size": row.get(ex.CLIQUE_SIZE),
            "extracted": row.get(ex.EXTRACTED),
        }
    return out


def compare_with_extraction(report: dict[str, object], flags: dict[int, dict[str, object]]) -> dict[str, object]:
    """Agreement of the Wen signal with clique flags: per-label rows, AUC (flag vs signal), Spearman rho."""
    from scipy.stats import spearmanr

    from diffaudit.attacks.roc import roc_auc, roc_curve

    rows = [r for r in report["per_label"] if r[KEY_LABEL] in flags]  # type: ignore[index, union-attr]
    if not rows:
        raise DataError("the extraction results share no labels with this model")
    scores = np.array([r[KEY_SCORE] for r in rows])
    flagged = np.array([flags[r[KEY_LABEL]]["flagged"] for r in rows])
    sizes = [flags[r[KEY_LABEL]]["clique_size"] for r in rows]
    out: dict[str, object] = {
        "labels": [
            {KEY_LABEL: r[KEY_LABEL], KEY_NAME: r[KEY_NAME], KEY_SCORE: r[KEY_SCORE], **flags[r[KEY_LABEL]]}
            for r in rows
        ],
        "num_flagged": int(flagged.sum()),
        "auc_flag_vs_noise_gap": None,
        "spearman_clique_size_vs_noise_gap": None,
    }
    if 0 < flagged.sum() < len(flagged):
        fpr, tpr, _ = roc_curve(scores, flagged)
        out["auc_flag_vs_noise_gap"] = roc_auc(fpr, tpr)
    if all(isinstance(s, int) for s in sizes) and len(set(sizes)) > 1 and len(rows) > 2:
        out["spearman_clique_size_vs_noise_gap"] = float(spearmanr(sizes, scores).statistic)
    return out
