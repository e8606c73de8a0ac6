"""Quality per cost of the samplers: FID (classifier features) and images/s on one model and the same seeds.

Run: ``python benchmarks/bench_samplers.py --model RUN --reference digits --num-images 256``. For each
``SAMPLER:STEPS`` it samples the same requests (labels cycling over the conditions, seeds 0..N-1, the model's
default guidance) unless ``--runs DIR`` already holds ``DIR/<sampler>-<steps>/samples.npz`` (e.g. written by
``diffaudit sample --out DIR/ddpm-1000 --sampler ddpm --num-steps 1000``, possibly as shards), then scores each
set with ``diffaudit.metrics.evaluate.evaluate`` against the reference. Every set is cut to the size of the
smallest one, so all FIDs use the same seeds and the same N (FID is biased by N: compare within one table only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", default="digits")
    ap.add_argument("--samplers", default="ddpm:1000,ddim:50,dpm++:20")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--runs", type=Path, default=None, help="reuse DIR/<sampler>-<steps>/samples.npz when present")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from diffaudit.data.imageset import ImageSet
    from diffaudit.data.sources import load_source
    from diffaudit.generators import load_generator
    from diffaudit.metrics.evaluate import evaluate
    from diffaudit.sampling import load_samples

    torch.set_num_threads(args.threads)
    sets: dict[str, ImageSet] = {}
    speed: dict[str, float] = {}
    gen = None
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        key = f"{name}-{steps}"
        path = args.runs / key / "samples.npz" if args.runs else None
        if path is not None and path.exists():
            sets[key] = load_samples(path)
            continue
        gen = gen or load_generator(args.model)
        labels = np.arange(args.num_images) % len(gen.conditions)
        t0 = time.perf_counter()
        sets[key] = gen.sample(
            labels,
            list(range(args.num_images)),
            sampler=name,
            num_steps=int(steps),
            guidance_scale=gen.default_guidance_scale,
        )
        speed[key] = args.num_images / (time.perf_counter() - t0)
    n = min(len(s) for s in sets.values())
    first = next(iter(sets.values()))
    reference = load_source(args.reference, resolution=first.shape[1], channels=first.shape[0])
    print(f"| sampler | images/s | FID (N={n}, classifier features) |")
    print("|---|---|---|")
    for key, s in sets.items():
        sub = ImageSet(s.images[:n], s.labels[:n], s.class_names)
        fid = evaluate(sub, reference, memorization=False)["metrics"]["fid"]
        rate = f"{speed[key]:.2f}" if key in speed else "(from --runs)"
        print(f"| {key} | {rate} | {fid:.3f} |", flush=True)


if __name__ == "__main__":
    main()
