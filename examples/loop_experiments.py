"""Reproduce the self-consuming-loop findings at small scale (docs/loop.md).

    OMP_NUM_THREADS=1 nice python examples/loop_experiments.py --out /tmp/loop-findings [--scale small|full]

``full`` runs the presets as defined (about 20 minutes each on 2 free cores, by design); ``small`` shrinks
them (fewer steps, arms and generations) so that everything finishes in well under an hour on a shared
machine. Every experiment is an ordinary ``diffaudit loop`` run directory; a digest of the numbers the
findings quote is printed and written to ``OUT/digest.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffaudit.io import atomic_write_json
from diffaudit.loop.engine import run_experiment
from diffaudit.loop.presets import build_experiment
from diffaudit.loop.theory import variance_ratios

SMALL_MODEL = ("model.block_out_channels=[16,32]", "model.norm_num_groups=8", "train.batch_size=64")
# name -> (loop settings, diffusion overrides, arms kept (None: all)). Shrunk because the shared 2-core machine
# gave each job ~15% of a core while these ran; docs/loop.md says what each shrink changes.
SMALL = {
    "nepotism-digits": (
        {"base_steps": 300, "steps_per_generation": 20, "num_samples": 300, "train_size": 300},
        SMALL_MODEL,
        ["share-0", "share-3.3", "share-100"],
    ),
    "mad-digits": ({"backend": "gmm", "poison_generations": 5, "repeats": 3}, (), None),
    "gaussian-digits": ({"repeats": 3}, (), None),
}


def theory(repeats: int = 1000, n: int = 10, generations: int = 5, seed: int = 0) -> dict:
    """Shumailov's E[sigma_t^2] = sigma^2 ((n-1)/n)^(t+1) (t+1 fits) through the engine, 1-pixel images."""
    out = {}
    for mode in ("fully-synthetic", "accumulate"):
        vals = variance_ratios(mode, n, generations, repeats, seed)
        ratio = vals.mean(0)
        out[mode] = {
            "mean_variance_ratio": ratio.round(4).tolist(),
            "sem": (vals.std(0, ddof=1) / np.sqrt(repeats)).round(4).tolist(),
            "theory_replace": [round(((n - 1) / n) ** (t + 1), 4) for t in range(generations + 1)],
        }
    return {"n": n, "repeats": repeats, "seed": seed, **out}


def digest(summary: dict) -> dict:
    keep = {}
    for arm, data in summary["arms"].items():
        keep[arm] = {
            "curves": {
                k: [round(v, 4) for v in c["mean"]]
                for k, c in data["curves"].items()
                if k.split("/")[-1] in ("fid", "precision", "recall", "coverage", "vendi") or k.startswith("fitted_")
            },
            "healing": {
                k: {kk: v[kk] for kk in ("ratio", "reason", "base", "poisoned", "healed", "per_repeat")}
                for k, v in data["healing"].items()
            },
        }
    return keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scale", choices=("small", "full"), default="small")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    dpath = args.out / "digest.json"
    if dpath.exists():
        results = json.loads(dpath.read_text())
    for name in ("nepotism-digits", "mad-digits", "gaussian-digits"):
        if args.only and name not in args.only:
            continue
        settings, overrides, arms = SMALL[name] if args.scale == "small" else ({}, (), None)
        exp = build_experiment(name, settings=settings, overrides=overrides)
        if arms:
            # The 30-of-900 arm keeps Bohacek & Farid's 3.3% share when train_size shrinks.
            if "share-3.3" in exp.arms and exp.arms["share-3.3"].train_size != 900:
                from diffaudit.loop.engine import replace_config

                n = round(30 * exp.arms["share-3.3"].train_size / 900)
                exp.arms["share-3.3"] = replace_config(exp.arms["share-3.3"], synthetic_count=n)
            exp.arms = {k: v for k, v in exp.arms.items() if k in arms}
        t0 = time.perf_counter()
        summary = run_experiment(exp, args.out / name, resume=args.resume or (args.out / name).exists())
        results[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "scale": args.scale,
            "settings": settings,
            "overrides": list(overrides),
            "arms": digest(summary),
        }
        atomic_write_json(dpath, results)
        print(name, json.dumps(results[name])[:2000], flush=True)

    if not args.only or "theory" in args.only:
        t0 = time.perf_counter()
        results["theory"] = theory() | {"seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(dpath, results)
        print(json.dumps(results["theory"]))


if __name__ == "__main__":
    main()
