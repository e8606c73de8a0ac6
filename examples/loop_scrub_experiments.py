"""The self-consuming loop with untagged synthetic data: scrubbing by tagless detectors vs tag-and-scrub vs none.

Run (CPU, a few minutes; keep OMP_NUM_THREADS=1 on a shared machine)::

    OMP_NUM_THREADS=1 nice .venv/bin/python examples/loop_scrub_experiments.py --out runs/loop-scrub

The loop is the ``gaussian-digits`` preset (analytic Gaussian backend on 8x8 digit pixels, so that a generation
costs seconds rather than a U-Net's minutes), shrunk to ``--generations`` poisoning generations, one arm of 25%
synthetic data (``replace`` mode). Arms, all with the same seeds:

* ``none``: no scrubbing;
* ``tag-scrub``: every generation's samples carry a spread-spectrum tag (amplitude 48: 8x8 images need a strong
  tag, docs/tagging.md), detected images are removed before retraining;
* ``detect-spectral`` / ``detect-cnn``: no tags; a detector trained *before* the loop (real digits vs samples of a
  Gaussian fitted to other digits) and calibrated at 1% on held-out real digits removes what it flags.

The loss detector is not an arm: it needs the model that made each generation's samples, and the loop's filter
hook receives only the mixed set. Real digits of the detectors' training and calibration sets may also be in
the loop's real pool (the pool is all digits), which flatters their false-removal rate slightly.
Results: OUT/results.json (a run directory).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.data.sources import load_source
from diffaudit.detectors.synthetic import fit_detector
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.guards.scrub import LoopTagger, make_loop_filter
from diffaudit.guards.tagging import get_tagger
from diffaudit.io import atomic_write_json, read_jsonl
from diffaudit.loop.config import LoopHooks
from diffaudit.loop.experiment import run_experiment
from diffaudit.loop.presets import build_experiment
from diffaudit.runs import RunDir

CURVES = ("all/fid", "all/precision", "all/recall")
FILTER_KEYS = ("generation", "synthetic_in", "synthetic_removed", "synthetic_slipped", "real_removed", "num_in")


def detectors(seed: int, target_fpr: float) -> dict[str, Any]:
    digits = load_source("digits")
    order = np.random.default_rng([seed, 99]).permutation(len(digits))
    fit_set, real_train, real_cal = (digits.subset(order[a:b]) for a, b in ((0, 600), (600, 1000), (1000, 1400)))
    gen = AnalyticTrainer("gaussian").fit(fit_set, None, 0, seed)
    generated = gen.sample(np.arange(400) % 10, list(range(400)))
    return {
        method: fit_detector(method, real_cal, real_train, generated, target_fpr, seed, **params)
        for method, params in (("spectral", {}), ("cnn", {"steps": 300}))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--amplitude", type=float, default=48.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    settings = {"poison_generations": args.generations, "heal_generations": 0, "seed": args.seed}
    arm = {"mode": "replace", "synthetic_share": args.share}
    dets = detectors(args.seed, args.target_fpr)
    real = load_source("digits")
    tagger = get_tagger("spread-spectrum", key=1234, amplitude=args.amplitude)
    tag_threshold = tagger.calibrate(real.images, args.target_fpr)
    arms: dict[str, LoopHooks] = {
        "none": LoopHooks(),
        "tag-scrub": LoopHooks(
            filter_fn=make_loop_filter(tagger, tag_threshold), tag_fn=LoopTagger(tagger, tag_threshold)
        ),
        **{f"detect-{m}": LoopHooks(filter_fn=make_loop_filter(None, None, detector=d)) for m, d in dets.items()},
    }
    results: dict[str, Any] = {
        "settings": settings | {"share": args.share, "preset": "gaussian-digits", "mode": "replace"},
        "detectors": {m: d.describe() for m, d in dets.items()},
        "tag": {"params": tagger.params, "threshold": tag_threshold},
        "arms": {},
    }
    with RunDir(args.out, "loop-scrub-experiments") as run:
        run.write_config({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
        for name, hooks in arms.items():
            exp = build_experiment("gaussian-digits", settings=settings, arm_override=arm)
            exp.hooks = hooks
            start = time.perf_counter()
            summary = run_experiment(exp, args.out / name, show_progress=False, plots=False)
            curves = summary["arms"]["custom"]["curves"]
            rows = [r for r in read_jsonl(args.out / name / "metrics.jsonl") if "filter" in r]
            filt = [{k: r["filter"][k] for k in FILTER_KEYS} for r in sorted(rows, key=lambda r: r["generation"])]
            totals = {k: sum(f[k] for f in filt) for k in FILTER_KEYS[1:]}
            results["arms"][name] = {
                "seconds": round(time.perf_counter() - start, 1),
                "curves": {k: curves[k]["mean"] for k in CURVES if k in curves},
                "filter_totals": totals,
                "filter": filt,
            }
            print(name, results["arms"][name]["curves"], totals, flush=True)
            atomic_write_json(run.file("results.json"), results)


if __name__ == "__main__":
    main()
