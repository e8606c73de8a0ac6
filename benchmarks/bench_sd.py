"""Throughput and memory of ``sd:PATH`` sampling on CPU with tiny random-weight pipelines.

For each (pipeline size, prompt batch size) a fresh child process loads the pipeline, warms up once, and times
``generate_sd`` on one batch (DDIM, NUM_STEPS steps, guidance 7.5, so two U-Net passes per step); the child
reports images per second and its peak resident memory (``ru_maxrss``, which includes the ~0.5 GB of torch +
diffusers + transformers themselves, reported separately as the baseline). Single-threaded
(``OMP_NUM_THREADS=1``) on a shared machine, so read the numbers as orders of magnitude.

Usage: ``OMP_NUM_THREADS=1 nice python benchmarks/bench_sd.py [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    # name: TinyPipelineConfig kwargs
    "tiny-32px": dict(resolution=32),
    "tiny-256px": dict(resolution=256, unet_channels=(8, 16), vae_channels=(4, 4, 8, 8)),
}
BATCHES = (1, 4, 8)
NUM_STEPS = 20


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, batch: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from diffaudit.pipelines.audit import generate_sd
    from diffaudit.pipelines.sd import load_sd
    from diffaudit.pipelines.tiny import TinyPipelineConfig, save_tiny_pipeline

    torch.set_num_threads(1)
    baseline = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        model = load_sd(save_tiny_pipeline(f"{tmp}/p", TinyPipelineConfig(**CONFIGS[name])), device="cpu")
    loaded = _rss_mb()
    prompts = [f"prompt {i}" for i in range(batch)]
    labels = np.arange(batch)
    kw = dict(num_steps=NUM_STEPS, guidance_scale=7.5, batch_size=batch, show_progress=False)
    generate_sd(model, prompts, labels, list(range(batch)), **kw)  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        generate_sd(model, prompts, labels, [1000 * (r + 1) + i for i in range(batch)], **kw)
    seconds = (time.perf_counter() - t0) / repeats
    return {
        "pipeline": name,
        "resolution": model.resolution,
        "unet_parameters": model.describe()["unet_parameters"],
        "batch": batch,
        "num_steps": NUM_STEPS,
        "seconds_per_batch": seconds,
        "images_per_second": batch / seconds,
        "peak_rss_mb": _rss_mb(),
        "rss_after_imports_mb": baseline,
        "rss_after_load_mb": loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, metavar=("PIPELINE", "BATCH"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(child(args.one[0], int(args.one[1]), args.repeats)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for name in CONFIGS:
        for batch in BATCHES:
            cmd = [sys.executable, __file__, "--one", name, str(batch), "--repeats", str(args.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{name:11s} batch {batch:2d}: {row['images_per_second']:.2f} img/s "
                f"({row['seconds_per_batch']:.2f} s/batch), peak RSS {row['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
