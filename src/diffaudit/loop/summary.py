"""Summaries of loop rows: curves (mean and 95% interval over repeats per generation) and healing ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffaudit.loop.config import HEALING_METRICS, KEY_ARM, KEY_GENERATION, KEY_REPEAT, LoopConfig
from diffaudit.loop.evaluate import healing_ratio


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a 95% Student-t interval over repeats (the interval collapses to the mean for one repeat)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, mean, mean
    from scipy import stats

    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return mean, mean - half, mean + half


def metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric metric keys present in the rows (group metrics and backend stats)."""
    keys = []
    for row in rows:
        for k, v in row.items():
            numeric = isinstance(v, int | float) and not isinstance(v, bool)
            if numeric and ("/" in k or k.startswith("fitted_")) and k not in keys:
                keys.append(k)
    return keys


def _healing(cfg: LoopConfig, keys: list[str], by: dict, repeats: list[int]) -> dict[str, Any]:
    healing: dict[str, Any] = {}
    g_p, g_h = cfg.poison_generations, cfg.num_generations - 1
    if cfg.heal_generations == 0 or cfg.poison_generations == 0:
        return healing
    for key in keys:
        if key.split("/")[-1] not in HEALING_METRICS:
            continue
        triples = [
            (by[(r, 0)].get(key), by[(r, g_p)].get(key), by[(r, g_h)].get(key))
            for r in repeats
            if all((r, g) in by for g in (0, g_p, g_h))
        ]
        triples = [t for t in triples if all(v is not None for v in t)]
        if not triples:
            continue
        b, p, h = (float(np.mean([t[i] for t in triples])) for i in range(3))
        # Noise of the denominator: the 95% half-width of (poisoned - base) over repeats.
        noise, note = 0.0, "one repeat: no noise estimate, the ratio is indicative"
        if len(triples) >= 2:
            _, lo, hi = interval([t[1] - t[0] for t in triples])
            noise, note = (hi - lo) / 2, "noise = 95% half-width of (poisoned - base) over repeats"
        res = healing_ratio(b, p, h, noise)
        res.update(base=b, poisoned=p, healed=h, repeats=len(triples), noise_note=note)
        res["per_repeat"] = [healing_ratio(*t)["ratio"] for t in triples]
        healing[key] = res
    return healing


def summarize(rows: Sequence[dict[str, Any]], arms: dict[str, LoopConfig]) -> dict[str, Any]:
    """Curves (mean and 95% interval over repeats per generation) and healing ratios, per arm.

    Rows are merged by ``(arm, repeat, generation)``: a row logged twice counts once.
    """
    unique = {(r[KEY_ARM], r[KEY_REPEAT], r[KEY_GENERATION]): r for r in rows}
    out: dict[str, Any] = {}
    for name, cfg in arms.items():
        arm_rows = [r for (a, _, _), r in unique.items() if a == name]
        keys = metric_keys(arm_rows)
        gens = list(range(cfg.num_generations))
        repeats = sorted({r[KEY_REPEAT] for r in arm_rows})
        by = {(r[KEY_REPEAT], r[KEY_GENERATION]): r for r in arm_rows}
        curves: dict[str, dict[str, list[float]]] = {}
        for key in keys:
            stats = [interval([by[(rep, g)].get(key) for rep in repeats if (rep, g) in by]) for g in gens]
            curves[key] = {"mean": [s[0] for s in stats], "low": [s[1] for s in stats], "high": [s[2] for s in stats]}
        out[name] = {
            "generations": gens,
            "phases": [cfg.phase(g) for g in gens],
            "repeats": repeats,
            "curves": curves,
            "healing": _healing(cfg, keys, by, repeats),
            "config": cfg.to_dict(),
        }
    return out
