"""Training and sampling throughput of diffaudit against a plain loop, measured in the same process.

Training: ``diffaudit.train.train`` (AdamW, EMA, warm-up, clipping, logging, per-step seeded RNG) against a plain
loop with the same ``UNet2DModel``, ``DDPMScheduler``, AdamW and batch and nothing else. Rounds alternate between
the two so that load from other processes hits both alike; the median per-round rate is reported.

Sampling: images/s for DDPM-1000, DDIM-50 and DPM-Solver++-20 through ``DiffusionModel.sample`` (inference mode,
per-sample seeds, guidance 2 with both passes in one batch), against a plain diffusers loop under ``no_grad``.

Usage: ``python benchmarks/bench_train_sample.py [--presets digits-8,faces-32,glyphs-32] [--steps 30]``
Writes a markdown table to stdout and to ``--out`` (results are copied into docs/benchmarks.md by hand).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffaudit.config import get_preset
from diffaudit.data.loading import load_data
from diffaudit.models.diffusion import build_unet
from diffaudit.runs import RunDir, environment_info
from diffaudit.train import model_config_for, train

WARMUP_STEPS = 3  # steps excluded from the rate: first-call allocations, and our setup/final save


def plain_train_rate(model_cfg, images, labels, batch_size: int, steps: int, lr: float) -> float:
    """Steady-state steps/s of the baseline: UNet2DModel + DDPMScheduler + AdamW, nothing else."""
    torch.manual_seed(0)
    unet = build_unet(model_cfg)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=model_cfg.beta_schedule)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    for step in range(steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        idx = torch.randint(0, len(images), (batch_size,))
        x0, y = images[idx], labels[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,))
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (steps - WARMUP_STEPS) / (time.perf_counter() - start)


def ours_train_rate(preset, data, steps: int) -> float:
    """Steady-state steps/s of diffaudit.train.train, timed between step callbacks (setup and saving excluded,
    as the plain loop has neither; periodic checkpoints are off, logging every 25 steps stays on)."""
    p = dataclasses.replace(preset, train=dataclasses.replace(preset.train, steps=steps, checkpoint_every=10**9))
    stamps: dict[int, float] = {}

    def stamp(step: int, loss: float) -> None:
        stamps[step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp, RunDir(Path(tmp) / "run", "train") as run:
        train(p, data, run, callback=stamp, show_progress=False)
    return (steps - WARMUP_STEPS) / (stamps[steps] - stamps[WARMUP_STEPS])


def plain_sample_rate(unet, sched, n: int, shape, steps: int, labels) -> float:
    sched.set_timesteps(steps)
    start = time.perf_counter()
    with torch.no_grad():
        x = torch.randn((n, *shape))
        null = torch.full_like(labels, unet.config.num_class_embeds - 1)
        for t in sched.timesteps:
            tt = torch.full((n,), int(t))
            both = unet(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
            cond, unc = both.chunk(2)
            x = sched.step(unc + 2.0 * (cond - unc), t, x).prev_sample
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="digits-8,faces-32,glyphs-32")
    parser.add_argument("--steps", type=int, default=30, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample-images", type=int, default=64)
    parser.add_argument("--out", default="benchmark-train-sample.md", help="markdown table written here")
    args = parser.parse_args()

    env = environment_info()
    lines = [
        "# Training and sampling throughput",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']} (torch threads: "
        f"{torch.get_num_threads()}), diffusers {env.get('diffusers')}. Median of {args.rounds} alternating rounds.",
        "",
        "| preset | plain loop steps/s | diffaudit steps/s | ratio (ours / plain) |",
        "|---|---|---|---|",
    ]
    sample_rows = []
    for name in args.presets.split(","):
        preset = get_preset(name)
        data, _ = load_data(preset.data)
        model_cfg = model_config_for(preset, data)
        images, labels = data.to_model_tensor(), torch.from_numpy(data.labels)
        plain, ours = [], []
        for _ in range(args.rounds):
            plain.append(
                plain_train_rate(model_cfg, images, labels, preset.train.batch_size, args.steps, preset.train.lr)
            )
            ours.append(ours_train_rate(preset, data, args.steps))
        p, o = statistics.median(plain), statistics.median(ours)
        lines.append(f"| {name} (batch {preset.train.batch_size}) | {p:.2f} | {o:.2f} | {o / p:.2f} |")
        print(lines[-1], flush=True)

        # sampling
        from diffaudit.generators.classcond import ClassCondGenerator
        from diffaudit.models.diffusion import DiffusionModel

        model = DiffusionModel(model_cfg).eval()
        gen = ClassCondGenerator(model, "bench", [str(i) for i in range(model_cfg.num_classes)])
        n = args.sample_images
        lab = torch.arange(n) % max(1, model_cfg.num_classes)
        shape = (model_cfg.channels, model_cfg.resolution, model_cfg.resolution)
        common = dict(num_train_timesteps=1000, beta_schedule=model_cfg.beta_schedule)
        for kind, steps, sched in [
            ("ddpm", 1000, DDPMScheduler(**common)),
            ("ddim", 50, DDIMScheduler(**common, clip_sample=False)),
            (
                "dpm++",
                20,
                DPMSolverMultistepScheduler(
                    **common, algorithm_type="dpmsolver++", thresholding=True, sample_max_value=1.0
                ),
            ),
        ]:
            count = n if kind != "ddpm" else max(8, n // 8)
            base = plain_sample_rate(model.unet, sched, count, shape, steps, lab[:count])
            start = time.perf_counter()
            gen.sample(lab[:count].numpy(), list(range(count)), sampler=kind, num_steps=steps, guidance_scale=2.0,
                       batch_size=count)  # fmt: skip
            mine = count / (time.perf_counter() - start)
            sample_rows.append(f"| {name} | {kind}-{steps} | {base:.1f} | {mine:.1f} | {mine / base:.2f} |")
            print(sample_rows[-1], flush=True)
    lines += [
        "",
        "| preset | sampler | plain loop images/s | diffaudit images/s | ratio |",
        "|---|---|---|---|---|",
        *sample_rows,
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
