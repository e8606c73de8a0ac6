"""``diffaudit sd ...``: audit a local diffusers text-to-image pipeline directory (bring your own model).

``sd sample`` (images per prompt, seeds logged), ``sd extract`` (generate-and-filter with cliques, matched to a
training folder), ``sd mia`` (latent loss threshold on member/non-member folders) and ``sd loop`` (Bohacek & Farid
self-consuming fine-tuning). Each writes a run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer

from diffaudit.cli.common import err, print_table
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.runs import RunDir

MODEL_HELP = "diffusers pipeline directory (sd:PATH or PATH), safetensors weights"


def _check(model: str) -> None:
    """Validate the pipeline directory before a run directory is created (a bad model leaves no failed run)."""
    from diffaudit.pipelines.sd import check_pipeline_dir

    check_pipeline_dir(Path(model.removeprefix("sd:")))


def _load(model: str, device: str, dtype: str):
    from diffaudit.pipelines.sd import load_sd

    return load_sd(model, device=device, dtype=dtype)


def _prompt_seeds(path: Path, num_per_prompt: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """Prompts, labels (prompt index per image), seeds per image, and each prompt's first seed."""
    from diffaudit.data.prompts import read_prompts

    if num_per_prompt < 1:
        raise ConfigError(f"num-per-prompt must be >= 1, got {num_per_prompt}")
    entries = read_prompts(path)
    # Prompt p without its own seed uses seeds SEED + p * N ... SEED + p * N + N - 1: disjoint across prompts.
    firsts = [e.seed if e.seed is not None else seed + p * num_per_prompt for p, e in enumerate(entries)]
    labels = np.repeat(np.arange(len(entries)), num_per_prompt)
    seeds = np.concatenate([np.arange(f, f + num_per_prompt) for f in firsts])
    return [e.prompt for e in entries], labels, seeds, firsts


def register(app: typer.Typer) -> None:
    sd = typer.Typer(help="Audit a local diffusers text-to-image pipeline (Stable Diffusion 1.x/2.x layout).")
    app.add_typer(sd, name="sd")

    @sd.command("sample")
    def sample(
        model: str = typer.Option(..., help=MODEL_HELP),
        prompts: Path = typer.Option(..., help="prompts file: one per line, or JSONL with prompt and optional seed"),
        out: Path = typer.Option(..., help="run directory to create"),
        num_per_prompt: int = typer.Option(4, min=1, help="images per prompt (Carlini et al.: 500)"),
        sampler: str = typer.Option("ddim", help="ddim | ddpm | dpm++ | pipeline (the directory's own scheduler)"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(7.5),
        seed: int = typer.Option(0, help="prompt p image j uses seed SEED + p*N + j (unless the prompt has a seed)"),
        batch_size: int = typer.Option(8, min=1),
        watermark: str = typer.Option("none", help="none | sd-v1 (dwtDct 'StableDiffusionV1', needs >= 256 px)"),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
        progress: bool = typer.Option(True, help="show a progress bar"),
    ) -> None:
        """Generate NUM_PER_PROMPT images per prompt into RUN/samples.npz (labels = prompt index)."""
        from diffaudit.data.grid import save_grid
        from diffaudit.pipelines.audit import generate_sd

        texts, labels, seeds, firsts = _prompt_seeds(prompts, num_per_prompt, seed)
        _check(model)
        with RunDir(out, "sd-sample") as run:
            net = _load(model, device, dtype)
            run.write_config(
                {
                    "model": net.describe(),
                    "prompts_file": str(prompts),
                    "prompts": texts,
                    "num_per_prompt": num_per_prompt,
                    "first_seeds": firsts,
                    "sampler": sampler,
                    "num_steps": num_steps,
                    "guidance_scale": guidance_scale,
                    "batch_size": batch_size,
                    "watermark": watermark,
                }
            )
            images = generate_sd(
                net,
                texts,
                labels,
                seeds,
                sampler,
                num_steps,
                guidance_scale,
                batch_size,
                watermark=watermark,
                show_progress=progress,
            )
            images.save(run.file("samples.npz"))
            save_grid(images.images, run.file("grid.png"), ncols=num_per_prompt)
            for p, text in enumerate(texts):
                sel = labels == p
                run.log({"prompt_index": p, "prompt": text, "seeds": seeds[sel], "ids": images.ids[sel]})
            run.update_manifest(model_id=net.model_id, num_images=len(images))
        err.print(f"{len(images)} images of {len(texts)} prompts written to {out / 'samples.npz'}")

    @sd.command("extract")
    def extract(
        model: str = typer.Option(..., help=MODEL_HELP),
        out: Path = typer.Option(..., help="run directory to create"),
        prompts: Path = typer.Option(None, help="prompts file (e.g. captions of the most duplicated training images)"),
        samples: list[Path] = typer.Option(None, help="reuse generations: samples.npz of sd sample (repeat per shard)"),
        train: Path = typer.Option(None, help="folder of training images to match flagged cliques against"),
        num_per_prompt: int = typer.Option(16, min=2, help="generations per prompt (Carlini et al.: 500)"),
        edge_threshold: float = typer.Option(0.1, help="tiled-L2 edge threshold (unpublished; 0.05-0.15 used)"),
        min_clique: int = typer.Option(10, min=2, help="clique size that flags a prompt (paper: 10)"),
        delta: float = typer.Option(0.15, help="normalized L2 to a training image that counts as extracted"),
        sampler: str = typer.Option("ddim"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(7.5),
        seed: int = typer.Option(0),
        batch_size: int = typer.Option(8, min=1),
        noise_gap: bool = typer.Option(True, help="also score prompts with Wen et al.'s noise gap"),
        device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"),
        progress: bool = typer.Option(True),
    ) -> None:
        """Generate, find the largest clique of near-identical generations per prompt, and match it to TRAIN."""
        from diffaudit.attacks import extraction as ex
        from diffaudit.data.folder import read_folder
        from diffaudit.pipelines import audit
        from diffaudit.pipelines.audit import extract_prompts, generate_sd

        if (prompts is None) == (not samples):
            raise ConfigError("give exactly one of --prompts (generate) or --samples (reuse generations)")
        reused = None
        if samples:
            # Shards merge by (prompt, seed), not by content id: identical images from different seeds are exactly
            # what the clique filter looks for, while a (prompt, seed) pair generated twice is one generation.
            merged = ImageSet.concat([ImageSet.load(p) for p in samples])
            keys = np.stack([merged.labels, merged.provenance["seed"]], axis=1)
            _, first = np.unique(keys, axis=0, return_index=True)
            reused = merged.subset(np.sort(first))
            texts, labels, seeds = list(reused.class_names), reused.labels, reused.provenance["seed"]
            firsts = [int(seeds[labels == p].min()) for p in range(len(texts)) if (labels == p).any()]
        else:
            texts, labels, seeds, firsts = _prompt_seeds(prompts, num_per_prompt, seed)
        _check(model)
        with RunDir(out, "sd-extract") as run:
            net = _load(model, device, dtype)
            if reused is not None and set(reused.provenance["model_id"].tolist()) != {net.model_id}:
                found = sorted(set(reused.provenance["model_id"].tolist()))
                raise ConfigError(
                    f"{[str(p) for p in samples]}: generations come from {found}, not from {model} ({net.model_id})"
                )
            run.write_config(
                {
                    "model": net.describe(),
                    "prompts_file": None if prompts is None else str(prompts),
                    "samples": [str(p) for p in samples or []],
                    "num_prompts": len(texts),
                    "num_per_prompt": num_per_prompt,
                    "first_seeds": firsts,
                    "edge_threshold": edge_threshold,
                    "edge_threshold_reason": "unpublished by Carlini et al.; public re-implementations use 0.05-0.15",
                    "min_clique": min_clique,
                    "delta": delta,
                    "tiles": "4x4 grid at full resolution (Carlini et al. Sec. 4)",
                    "train": None if train is None else str(train),
                    "sampler": sampler,
                    "num_steps": num_steps,
                    "guidance_scale": guidance_scale,
                }
            )
            if reused is None:
                gens = generate_sd(
                    net, texts, labels, seeds, sampler, num_steps, guidance_scale, batch_size, show_progress=progress
                )
                gens.save(run.file("samples.npz"))
            else:
                gens = reused
            train_set = None
            if train is not None:
                imgs, lab, names, _ = read_folder(train, resolution=net.resolution, channels=3)
                train_set = ImageSet(imgs, lab, names, {"source": f"folder:{train}"})
            rows = extract_prompts(
                gens, edge_threshold, min_clique, train=train_set, delta=delta, show_progress=progress
            )
            if noise_gap:
                gaps = np.zeros(len(texts))
                for p in range(len(texts)):
                    sel = labels == p
                    gaps[p] = net.noise_gap([texts[p]] * int(sel.sum()), seeds[sel], sampler, num_steps).mean()
                for row in rows:
                    row[audit.KEY_NOISE_GAP] = float(gaps[row[audit.KEY_PROMPT_INDEX]])
            for row in rows:
                run.log(row)
            summary = ex.summarize(rows)
            run.update_manifest(model_id=net.model_id, summary=summary)
        print_table("sd extract", {k: summary[k] for k in (ex.NUM_LABELS, ex.NUM_FLAGGED, ex.NUM_EXTRACTED)})

    @sd.command("mia")
    def mia(
        model: str = typer.Option(..., help=MODEL_HELP),
        members: Path = typer.Option(..., help="captioned folder of training images (metadata.jsonl or .txt)"),
        nonmembers: Path = typer.Option(..., help="captioned folder of images not trained on"),
        out: Path = typer.Option(..., help="run directory to create"),
        t: int = typer.Option(100, help="timestep of the loss (Carlini et al.: 100, in [50, 300])"),
        num_noise: int = typer.Option(1, min=1, help="noise draws averaged per image"),
        seed: int = typer.Option(0),
        batch_size: int = typer.Option(8, min=1),
        device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"),
        progress: bool = typer.Option(True),
    ) -> None:
        """Loss-threshold membership inference in latent space: low loss at t means member."""
        from diffaudit.attacks.roc import summarize
        from diffaudit.pipelines.audit import latent_losses
        from diffaudit.data.prompts import read_captioned_folder

        _check(model)
        with RunDir(out, "sd-mia") as run:
            net = _load(model, device, dtype)
            cfg = {"model": net.describe(), "members": str(members), "nonmembers": str(nonmembers), "t": t}
            cfg.update(num_noise=num_noise, seed=seed, score="-loss (threshold attack)", latents="VAE posterior mean")
            run.write_config(cfg)
            result: dict[str, Any] = {}
            losses = {}
            for name, folder in (("member", members), ("nonmember", nonmembers)):
                data, caps = read_captioned_folder(folder, net.resolution)
                losses[name] = latent_losses(net, data, caps, t, num_noise, seed, batch_size, show_progress=progress)
                for i, loss in zip(data.ids, losses[name], strict=True):
                    run.log({"id": i, "member": name == "member", "loss": float(loss)})
            scores = -np.concatenate([losses["member"], losses["nonmember"]])
            is_member = np.r_[np.ones(len(losses["member"]), bool), np.zeros(len(losses["nonmember"]), bool)]
            result = summarize(scores, is_member)
            run.update_manifest(model_id=net.model_id, result=result)
        print_table("sd mia", {k: v for k, v in result.items() if not isinstance(v, list)})

    @sd.command("loop")
    def loop(
        model: str = typer.Option(..., help=MODEL_HELP),
        data: Path = typer.Option(..., help="captioned folder of real training images"),
        out: Path = typer.Option(..., help="run directory to create"),
        heldout_prompts: Path = typer.Option(None, help="prompts file never used in retraining (to measure spread)"),
        generations: int = typer.Option(5, min=1),
        heal: int = typer.Option(0, min=0, help="extra generations retrained on real images only"),
        synthetic_fraction: float = typer.Option(30 / 900, help="share of self-generated training images"),
        steps: int = typer.Option(100, min=1, help="U-Net optimizer steps per generation"),
        batch_size: int = typer.Option(4, min=1),
        learning_rate: float = typer.Option(1e-5),
        lora_rank: int = typer.Option(0, min=0, help="0: full U-Net fine-tuning; > 0: LoRA rank (peft)"),
        strength: float = typer.Option(0.5, help="img2img strength of self-generated images"),
        sampler: str = typer.Option("ddim"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(7.5),
        eval_seeds: int = typer.Option(4, min=1),
        seed: int = typer.Option(0),
        device: str = typer.Option("auto"),
        dtype: str = typer.Option("fp32", help="training needs fp32 (or bf16) weights"),
    ) -> None:
        """Fine-tune only the U-Net on real + self-generated (img2img) images for several generations."""
        from diffaudit.pipelines.loop import SDLoopConfig, config_dict, run_sd_loop
        from diffaudit.data.prompts import read_captioned_folder, read_prompts

        cfg = SDLoopConfig(
            generations=generations,
            heal_generations=heal,
            synthetic_fraction=synthetic_fraction,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            strength=strength,
            sampler=sampler,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eval_seeds=eval_seeds,
            seed=seed,
        )
        cfg.validate()
        held = [e.prompt for e in read_prompts(heldout_prompts)] if heldout_prompts is not None else []
        _check(model)
        with RunDir(out, "sd-loop") as run:
            net = _load(model, device, dtype)
            real, caps = read_captioned_folder(data, net.resolution)
            run.write_config({"model": net.describe(), "data": str(data), "heldout_prompts": held, **config_dict(cfg)})
            rows = run_sd_loop(net, real, caps, held, cfg, log=run.log)
            _save_unet(net, run.file("unet"), lora=lora_rank > 0)
            run.update_manifest(model_id=net.model_id, generations=len(rows) - 1)
        last = rows[-1]
        print_table("sd loop (last generation)", {k: v for k, v in last.items() if v is not None})


def _save_unet(net: Any, directory: Path, lora: bool) -> None:
    """The fine-tuned U-Net as safetensors + JSON (LoRA: only the adapter weights)."""
    if lora:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net.unet).items()}
        save_file(state, str(directory / "lora.safetensors"))
    else:
        net.unet.save_pretrained(directory, safe_serialization=True)
