"""Throughput and memory of ``sd:PATH`` sampling on CPU with tiny random-weight pipelines.

For each (pipeline size, prompt batch size) a fresh child process loads the pipeline, warms up once, and times
``generate_sd`` on one batch (DDIM, NUM_STEPS steps, guidance 7.5, so two U-Net passes per step); the child
reports images per second and its peak resident memory (``ru_maxrss``, which includes the ~0.5 GB of torch +
diffusers + transformers themselves, reported separately as the baseline). Single-threaded
(``OMP_NUM_THREADS=1``) on a shared machine, so read the numbers as orders of magnitude.

Usage: ``OMP_NUM_THREADS=1 nice python benchmarks/bench_sd.py [--out results.json]``

``--experiment memorize`` is a plumbing check of the attacks on a bring-your-own model: a tiny pipeline's U-Net
is over-fitted on a few captioned glyph images (members), then ``sd mia`` (latent loss at t=100) and the
extraction filter are run before and after, on member captions and on captions of held-out glyphs. The random
VAE does not reconstruct images, so generations are matched against the VAE reconstructions of the members
(what the U-Net actually saw), not the raw glyphs.
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
    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

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


def memorize(num_members: int, steps: int, per_prompt: int, seed: int, lr: float = 1e-3) -> dict:
    import numpy as np
    import torch

    from diffaudit.attacks import extraction as ex
    from diffaudit.attacks.roc import summarize
    from diffaudit.data.imageset import ImageSet
    from diffaudit.data.sources import load_source
    from diffaudit.data.transforms import convert_channels, resize_images
    from diffaudit.pipelines.audit import extract_prompts, generate_sd, latent_losses
    from diffaudit.pipelines.loop import SDLoopConfig, _fine_tune, _trainable
    from diffaudit.pipelines.sd import images_to_tensor, load_sd
    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_sd(save_tiny_pipeline(f"{tmp}/p", TinyPipelineConfig(resolution=32), seed=seed), device="cpu")
    glyphs = load_source("glyphs", seed=seed)
    pick = np.random.default_rng(seed).permutation(len(glyphs))[: 2 * num_members]
    imgs = convert_channels(resize_images(glyphs.images[pick], model.resolution), 3)
    caps = [f"glyph {glyphs.class_names[glyphs.labels[i]]} number {k}" for k, i in enumerate(pick)]
    members = ImageSet(imgs[:num_members], np.full(num_members, -1))
    held = ImageSet(imgs[num_members:], np.full(num_members, -1))
    is_member = np.r_[np.ones(num_members, bool), np.zeros(num_members, bool)]

    def audit(tag: str) -> dict:
        losses = np.r_[
            latent_losses(model, members, caps[:num_members], t=100, num_noise=4, seed=seed, show_progress=False),
            latent_losses(model, held, caps[num_members:], t=100, num_noise=4, seed=seed, show_progress=False),
        ]
        mia = summarize(-losses, is_member)
        labels = np.repeat(np.arange(len(caps)), per_prompt)
        seeds = np.arange(len(labels)) + 10_000
        gens = generate_sd(model, caps, labels, seeds, num_steps=20, guidance_scale=3.0, show_progress=False)
        recon = model.decode_latents(model.encode_images(images_to_tensor(members.images)))
        train = ImageSet.from_model_tensor(recon, np.full(num_members, -1))
        rows = extract_prompts(gens, edge_threshold=0.1, min_clique=per_prompt // 2, train=train, show_progress=False)
        flagged = {r["prompt_index"] for r in rows if r[ex.FLAGGED]}
        extracted = {r["prompt_index"] for r in rows if r[ex.FLAGGED] and r[ex.EXTRACTED]}
        return {
            "stage": tag,
            "mia_auc": mia["auc"],
            "mia_tpr@1%fpr": mia["tpr@1%fpr"],
            "member_loss_mean": float(losses[is_member].mean()),
            "heldout_loss_mean": float(losses[~is_member].mean()),
            "flagged_member_prompts": sum(p < num_members for p in flagged),
            "flagged_heldout_prompts": sum(p >= num_members for p in flagged),
            "extracted_member_prompts": sum(p < num_members for p in extracted),
            "median_clique_size": float(np.median([r[ex.CLIQUE_SIZE] for r in rows])),
        }

    before = audit("before")
    print(json.dumps(before), flush=True)
    cfg = SDLoopConfig(steps=steps, batch_size=num_members, learning_rate=lr, cond_drop_prob=0.1, seed=seed)
    params = _trainable(model, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    latents = model.encode_images(images_to_tensor(members.images)).float()
    t0 = time.perf_counter()
    loss = _fine_tune(
        model,
        opt,
        params,
        latents,
        model.encode_prompts(caps[:num_members]),
        model.encode_prompts([""])[0],
        cfg,
        torch.Generator().manual_seed(seed),
    )
    after = audit("after")
    after.update(train_steps=steps, train_seconds=time.perf_counter() - t0, final_train_loss=loss)
    print(json.dumps(after), flush=True)
    return {
        "num_members": num_members,
        "per_prompt": per_prompt,
        "seed": seed,
        "lr": lr,
        "before": before,
        "after": after,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, metavar=("PIPELINE", "BATCH"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--experiment", choices=("throughput", "memorize"), default="throughput")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    if args.experiment == "memorize":
        res = memorize(args.members, args.steps, args.per_prompt, args.seed, args.lr)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(res, fh, indent=2)
        return
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
