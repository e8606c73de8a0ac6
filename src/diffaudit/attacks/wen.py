"""Wen et al. (ICLR 2024) memorization detector, with class labels as prompts.

A memorized prompt pulls generation toward one training image from the very first steps, so the conditional
noise prediction differs strongly from the unconditional one. Per label ``c`` the signal is

    m(c) = mean over seeds s and the first ``measure_steps`` sampling steps of
           ||eps(x_t, c) - eps(x_t, null)||_2 / sqrt(d)

along the classifier-free-guided DDIM trajectory that starts from seed ``s`` (``d`` values per image; the
division makes the number comparable across resolutions, Wen et al. use the plain norm). Every label uses the
same seeds, so labels are compared on identical starting noise.

:func:`compare_with_extraction` lines the per-label signal up with the clique flags of an extraction run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffaudit.errors import ConfigError, DataError
from diffaudit.models.diffusion import DiffusionModel, per_sample_noise
from diffaudit.progress import progress_bar

KEY_LABEL = "label"
KEY_NAME = "name"
KEY_SCORE = "noise_gap"
KEY_STD = "noise_gap_std"
KEY_PER_SEED = "per_seed"


@torch.inference_mode()
def noise_gaps(
    model: DiffusionModel,
    labels: Sequence[int],
    seeds: Sequence[int],
    num_steps: int = 50,
    measure_steps: int = 10,
    guidance_scale: float = 2.0,
) -> np.ndarray:
    """Mean RMS of ``eps(x_t, c) - eps(x_t, null)`` ``float64 (len(labels), len(seeds))``.

    The trajectory for (label, seed) is a DDIM run of ``num_steps`` steps with guidance ``guidance_scale``;
    the gap is averaged over its first ``measure_steps`` steps (where Wen et al. find the signal strongest).
    """
    cfg = model.config
    if not cfg.conditional:
        raise ConfigError("Wen et al.'s detector needs a class-conditional model (label vs null prediction)")
    if not 1 <= measure_steps <= num_steps:
        raise ConfigError(f"measure_steps must be in [1, num_steps={num_steps}], got {measure_steps}")
    bad = [c for c in labels if not 0 <= c < cfg.num_classes]
    if bad:
        raise ConfigError(f"labels {bad} outside [0, {cfg.num_classes})")
    model.eval()
    shape = (cfg.channels, cfg.resolution, cfg.resolution)
    out = np.zeros((len(labels), len(seeds)), dtype=np.float64)
    x_init = per_sample_noise(shape, seeds, model.device)
    for i, c in enumerate(labels):
        sched = model.make_sampler("ddim", num_steps)
        x = x_init * sched.init_noise_sigma
        lab = torch.full((len(seeds),), int(c), dtype=torch.long, device=model.device)
        null = torch.full_like(lab, -1)
        for t in sched.timesteps[:measure_steps]:
            tt = torch.full((len(seeds),), int(t), dtype=torch.long, device=model.device)
            xin = sched.scale_model_input(x, t)
            both = model.predict_noise(torch.cat([xin, xin]), torch.cat([tt, tt]), torch.cat([lab, null]))
            eps_c, eps_n = both.chunk(2)
            out[i] += (eps_c - eps_n).flatten(1).pow(2).mean(1).sqrt().double().cpu().numpy()
            x = sched.step(eps_n + guidance_scale * (eps_c - eps_n), t, x).prev_sample
        out[i] /= measure_steps
    return out


def wen_report(
    model: DiffusionModel,
    class_names: Sequence[str],
    num_seeds: int = 16,
    num_steps: int = 50,
    measure_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, object]:
    """Per-label memorization signal for every class of ``model``: rows ``{label, name, noise_gap, ...}``.

    Seeds are ``seed .. seed + num_seeds - 1`` for every label. Rows are sorted by label.
    """
    labels = list(range(model.config.num_classes))
    seeds = list(range(seed, seed + num_seeds))
    rows = []
    with progress_bar("wen detector", total=len(labels), enabled=show_progress) as bar:
        for c in labels:
            gaps = noise_gaps(model, [c], seeds, num_steps, measure_steps, guidance_scale)[0]
            rows.append(
                {
                    KEY_LABEL: c,
                    KEY_NAME: class_names[c] if c < len(class_names) else str(c),
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
            "norm": "RMS over pixels of eps(x_t, label) - eps(x_t, null)",
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
