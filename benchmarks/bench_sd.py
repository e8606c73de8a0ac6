"""Sampling a diffusers text-to-image pipeline: diffaudit's generator against a plain diffusers loop.

Both sides run in the same process on the same tiny random-weight pipeline (built from configs; nothing is
downloaded), with the same prompts, the same initial latents (diffaudit's per-seed noise, passed to diffusers as
``latents=``), DDIM, ``NUM_STEPS`` steps and guidance 7.5 (two U-Net passes per step). Timings alternate between
the two sides ``REPEATS`` times and the median is reported, so load on a shared machine hits both alike. The
ratio ``plain / diffaudit`` (seconds) above 1 means diffaudit is faster. The outputs are also compared: they must
agree to one grey level (the shared sampler is diffusers' own scheduler).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_sd.py [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

CONFIGS = {
    # name: TinyPipelineConfig kwargs
    "tiny-32px": dict(resolution=32),
    "tiny-256px": dict(resolution=256, unet_channels=(8, 16), vae_channels=(4, 4, 8, 8)),
}
BATCHES = (1, 8)
NUM_STEPS = 20
REPEATS = 5


def _plain_pipeline(gen):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=gen.vae,
        text_encoder=gen.text_encoder,
        tokenizer=gen.tokenizer,
        unet=gen.unet,
        scheduler=DDIMScheduler.from_config(gen.scheduler_config, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(name: str, batch: int) -> dict:
    import numpy as np
    import torch

    from diffaudit.generators import load_generator
    from diffaudit.generators.base import seeded_noise
    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

    prompts = [f"prompt {i}" for i in range(batch)]
    with tempfile.TemporaryDirectory() as tmp:
        gen = load_generator(save_tiny_pipeline(f"{tmp}/p", TinyPipelineConfig(**CONFIGS[name])), prompts, "cpu")
    pipe = _plain_pipeline(gen)
    labels, seeds = np.arange(batch), list(range(batch))
    side = gen.image_shape[-1]

    def ours() -> np.ndarray:
        return gen.sample(labels, seeds, num_steps=NUM_STEPS, guidance_scale=7.5, batch_size=batch).images

    def plain() -> np.ndarray:
        out = pipe(
            prompt=prompts,
            latents=seeded_noise(gen.latent_shape, seeds),
            num_inference_steps=NUM_STEPS,
            guidance_scale=7.5,
            output_type="pt",
            height=side,
            width=side,
        ).images
        return (out.float() * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    a, b = ours(), plain()  # warm-up, and the agreement check
    times: dict[str, list[float]] = {"diffaudit": [], "plain": []}
    for _ in range(REPEATS):
        for key, fn in (("diffaudit", ours), ("plain", plain)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    ours_s, plain_s = statistics.median(times["diffaudit"]), statistics.median(times["plain"])
    return {
        "pipeline": name,
        "resolution": side,
        "batch": batch,
        "num_steps": NUM_STEPS,
        "diffaudit_images_per_s": batch / ours_s,
        "plain_images_per_s": batch / plain_s,
        "ratio_plain_over_diffaudit": plain_s / ours_s,
        "max_abs_difference_grey_levels": int(np.abs(a.astype(int) - b.astype(int)).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [measure(name, batch) for name in CONFIGS for batch in BATCHES]
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": machine, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
