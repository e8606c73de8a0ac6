"""``diffaudit mia``: membership inference (loss threshold, online/offline LiRA) and Wen et al.'s detector.

Works on any generator (``--model RUN_OR_DIR``: our class models, analytic models, diffusers pipeline
directories), or trains its own target and shadows from a preset; see docs/mia.md for the three settings.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json, print_table
from diffaudit.errors import ConfigError


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"10,50,100"`` -> ``(10, 50, 100)``; rejects empty, non-integer and duplicate entries."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--timesteps {text!r}: expected comma-separated integers") from exc
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--timesteps {text!r}: give distinct integers, e.g. 10,50,100,300")
    return values


def register(app: typer.Typer) -> None:
    @app.command("mia")
    def mia(
        out: Path = typer.Option(..., help="run directory to create (or continue with --resume)"),
        model: str = typer.Option(None, help="RUN_OR_DIR: our model/run dir, an analytic dir, a pipeline (sd:PATH)"),
        data: str = typer.Option(None, help="candidate pool source (captioned:DIR for pipelines); default: preset's"),
        members: str = typer.Option(None, help="with --model: its training images (ids.json, or a SOURCE)"),
        nonmembers: str = typer.Option(None, help="with --members SOURCE: images the model did not train on"),
        prompts: Path = typer.Option(None, help="pipelines: prompts the Wen detector scores (default: captions)"),
        dtype: str = typer.Option("auto", help="pipelines: auto | fp32 | fp16 | bf16"),
        trainer: str = typer.Option("auto", help="auto (the model's family; class U-Net without) | gaussian | gmm"),
        shadow_base: str = typer.Option(None, help="with --members: model the shadows start from (e.g. the base)"),
        lora_rank: int = typer.Option(4, min=1, help="pipelines: LoRA rank of the shadow fine-tunes"),
        learning_rate: float = typer.Option(1e-4, help="pipelines: LoRA learning rate of the shadow fine-tunes"),
        preset: str = typer.Option("digits-8", help="preset for class-model targets and shadows"),
        steps: int = typer.Option(None, help="training steps of every model; default: preset's (pipelines 300)"),
        set_: list[str] = typer.Option(None, "--set", help="preset override, e.g. --set train.lr=1e-3"),
        num_shadows: int = typer.Option(None, help="shadow models (default 8; 0 with --members)"),
        timesteps: str = typer.Option("10,25,50,100,200,300,500", help="timesteps swept (of 1000)"),
        noise_draws: int = typer.Option(20, min=1, help="noise draws averaged per candidate (strong LiRA)"),
        flip: bool = typer.Option(
            None, "--flip/--no-flip", help="also average over a flipped copy (default: by source)"
        ),
        pool_size: int = typer.Option(None, help="candidates drawn from the source (default: all unique images)"),
        selection_fraction: float = typer.Option(0.3, help="share of candidates used only to choose t"),
        fix_variance: bool = typer.Option(True, "--fix-variance/--per-sample-variance", help="LiRA variance"),
        seed: int = typer.Option(0, help="seeds memberships, splits, query noise and training"),
        batch_size: int = typer.Option(512, min=1, help="images per loss batch"),
        keep_models: bool = typer.Option(None, "--keep-models/--no-keep-models", help="save shadow weights"),
        target: str = typer.Option(None, hidden=True, help="old name of --model (with --members)"),
        wen: bool = typer.Option(True, "--wen/--no-wen", help="run Wen et al.'s per-condition detector on the target"),
        wen_seeds: int = typer.Option(16, min=2, help="seeds per condition for the Wen detector"),
        extract_run: Path = typer.Option(None, help="an extract run (results.json) to compare clique flags with"),
        attacks: str = typer.Option(
            "pia,pian,secmi-stat,secmi-nn,gsa", help="attacks beside loss/LiRA, comma-separated ('' for none)"
        ),
        pia_t: int = typer.Option(200, help="PIA/PIAN timestep (Kong et al.: 200 of 1000)"),
        secmi_t: int = typer.Option(100, help="SecMI t_sec (Duan et al.: 100 of 1000)"),
        secmi_k: int = typer.Option(10, help="SecMI DDIM interval k (Duan et al.: 10)"),
        suspect: str = typer.Option(None, help="dataset inference: SOURCE suspected to be in --model's training"),
        unseen: str = typer.Option(None, help="dataset inference: SOURCE known not to be in training"),
        alpha: float = typer.Option(0.01, help="dataset inference: significance level"),
        permutations: int = typer.Option(499, help="dataset inference: permutations of the test"),
        resume: bool = typer.Option(False, "--resume", help="continue; finished models are not retrained"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
        shard: str = typer.Option(
            None,
            help="fit only shard i/n (0-based) of the models (target, shadows) into OUT/shards/, or auto (SLURM "
            "array, Kubernetes JOB_COMPLETION_INDEX + DIFFAUDIT_SHARD_COUNT, RANK/WORLD_SIZE); then: diffaudit merge",
        ),
        shards: int = typer.Option(0, min=0, help="run all of N shards with --engine, then merge (0: no shards)"),
        engine: str = typer.Option("local", help="local (this process) | ray (Ray tasks; needs the ray extra)"),
        address: str = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); default: a local one"),
        cpus_per_task: float = typer.Option(1.0, min=0.01, help="with --engine ray: CPUs per shard task"),
    ) -> None:
        """Membership inference: fit a target and K shadows on random halves of a pool (or attack --model with
        --members), attack with the loss threshold and LiRA, write the ROC; then Wen et al.'s detector."""
        if suspect is not None or unseen is not None:
            from diffaudit.attacks.mia_audit import DatasetInferenceRequest, run_dataset_inference_audit

            if suspect is None or unseen is None:
                raise ConfigError("dataset inference needs both --suspect and --unseen (images known not in training)")
            if model is None:
                raise ConfigError("dataset inference needs --model (the model suspected of training on --suspect)")
            di = DatasetInferenceRequest(
                model=model, suspect=suspect, unseen=unseen, dtype=dtype, timesteps=parse_timesteps(timesteps),
                noise_draws=noise_draws, alpha=alpha, permutations=permutations, pia_t=pia_t, secmi_t=secmi_t,
                secmi_k=secmi_k, seed=seed, batch_size=batch_size,
            )  # fmt: skip
            if dry_run:
                from diffaudit.attacks.mia_audit import resolve_dataset_inference

                print_json(resolve_dataset_inference(di)[2])
                return
            found = run_dataset_inference_audit(di, out, resume=resume)
            keys = ("p_value", "statistic", "num_suspect", "num_unseen", "used", "images_needed")
            print_table("dataset inference", {k: found[k] for k in keys})
            err.print(f"results in {out / 'results.json'}")
            return
        from diffaudit.attacks.mia_audit import MiaRequest, resolve_mia, run_mia_audit

        if target is not None:
            if model is not None:
                raise ConfigError("give --model only (--target is its old name)")
            if members is None:
                raise ConfigError("--target and --members go together (a user model and the ids it trained on)")
            model = target
        request = MiaRequest(
            model=model, data=data, members=members, nonmembers=nonmembers,
            prompts=None if prompts is None else str(prompts), dtype=dtype, trainer=trainer, shadow_base=shadow_base,
            lora_rank=lora_rank, learning_rate=learning_rate, preset=preset, steps=steps, overrides=tuple(set_ or ()),
            num_shadows=num_shadows, timesteps=parse_timesteps(timesteps), noise_draws=noise_draws, flip=flip,
            pool_size=pool_size, selection_fraction=selection_fraction, fix_variance=fix_variance, seed=seed,
            batch_size=batch_size, keep_models=keep_models, wen=wen, wen_seeds=wen_seeds,
            extract_run=None if extract_run is None else str(extract_run),
            attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), pia_t=pia_t, secmi_t=secmi_t,
            secmi_k=secmi_k,
        )  # fmt: skip
        if dry_run:
            resolved = resolve_mia(request)[2]
            resolved.pop("data_info", None)
            print_json(resolved)
            return
        if shard is not None or shards > 0 or engine != "local":
            from diffaudit.scale.dispatch import ShardOptions, run_sharded
            from diffaudit.scale.engines import mia_stage

            request.validate()
            sharding = ShardOptions(shard, shards, engine, address, cpus_per_task)
            done = run_sharded(mia_stage(), request, out, sharding, resume=resume)
            if done.folder is not None:
                spec = done.spec
                err.print(f"shard {spec.label} in {done.folder}; when all {spec.count} are done: diffaudit merge")
                return
            results = done.summary["results"]
        else:
            results = run_mia_audit(request, out, resume=resume)
        for name, r in results["attacks"].items():
            keys = ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "num_members", "num_nonmembers")
            print_table(f"{name} (t={r['t']})", {k: r[k] for k in keys})
        if request.wen and results.get("wen") is None:
            err.print("Wen detector skipped: the target is unconditional")
        err.print(f"results in {out / 'results.json'}, ROC {out / 'roc.png'}")
