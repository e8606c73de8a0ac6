"""``diffaudit mia``: membership inference (loss threshold, online/offline LiRA) and Wen et al.'s detector.

Works on any generator (``--model RUN_OR_DIR``: our class models, analytic models, diffusers pipeline
directories), or trains its own target and shadows from a preset; see docs/mia.md for the three settings.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json, print_table
from diffaudit.errors import ConfigError

# Sources whose images keep their meaning under a horizontal flip (digits and letters do not: flips change
# the class), used when --flip/--no-flip is not given.
FLIP_SAFE_SOURCES = ("faces",)


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"10,50,100"`` -> ``(10, 50, 100)``; rejects empty, non-integer and duplicate entries."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--timesteps {text!r}: expected comma-separated integers") from exc
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--timesteps {text!r}: give distinct integers, e.g. 10,50,100,300")
    return values


COMMON_CHOICES: dict[str, dict[str, object]] = {
    "timestep_selection": {
        "value": "per attack, the largest AUC on the selection split",
        "reason": "the paper's Goldilocks zone t in [50, 300] is model dependent; AUC is the only "
        "stable criterion on a small selection split (TPR at low FPR is too coarse there)",
    },
    "lira_statistic": {
        "value": "log of the loss averaged over noise draws (and flip)",
        "reason": "losses are positive and skewed; the log makes per-sample Gaussians fit",
    },
    "lira_fallback": {
        "value": "a sample without IN (OUT) shadows uses the OUT (IN) mean shifted by the mean gap",
        "reason": "with K random halves about 2^-K of the samples lack one side",
    },
    "tpr_at_fpr_rule": {
        "value": "largest TPR at FPR <= target, no interpolation; below 1/num_nonmembers flagged",
        "reason": "never overstates the attack; the resolution is explicit",
    },
    "training_seeds": {"value": "train seed (preset's for class models, else 0) + 1000 * seed + model index"},
}


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
    ) -> None:
        """Membership inference: fit a target and K shadows on random halves of a pool (or attack --model with
        --members), attack with the loss threshold and LiRA, write the ROC; then Wen et al.'s detector."""
        if suspect is not None or unseen is not None:
            _dataset_inference(
                out, model, suspect, unseen, dtype, parse_timesteps(timesteps), noise_draws, alpha, permutations,
                pia_t, secmi_t, secmi_k, seed, batch_size, resume, dry_run,
            )  # fmt: skip
            return
        from diffaudit.attacks.mia_setup import ShadowTraining, build_setup, load_inputs
        from diffaudit.attacks.shadow import MiaConfig
        from diffaudit.cli.common import resolve_preset

        if target is not None:
            if model is not None:
                raise ConfigError("give --model only (--target is its old name)")
            model = target
        if target is not None and members is None:
            raise ConfigError("--target and --members go together (a user model and the ids it trained on)")
        if nonmembers is not None and members is None:
            raise ConfigError("--nonmembers goes with --members (the model's training images)")
        cfg = resolve_preset(preset, data if model is None else None, set_, steps)
        choices: dict[str, dict[str, object]] = {}
        if num_shadows is None:
            num_shadows = 0 if members is not None else 8
            choices["num_shadows"] = {
                "value": num_shadows,
                "reason": "user target: loss threshold only unless shadows are asked for"
                if members is not None
                else "default K=8 (Carlini et al. use 16 on CIFAR-10; CPU budget)",
            }
        if flip is None:
            spec = data or members or cfg.data.source
            base = spec.split(":", 1)[0]
            flip = base in FLIP_SAFE_SOURCES
            choices["flip"] = {
                "value": flip,
                "reason": f"source {base!r} {'keeps' if flip else 'may not keep'} its meaning under a horizontal flip",
            }
        inputs = load_inputs(cfg, model, data, members, nonmembers, prompts and str(prompts), shadow_base, None, dtype)
        if keep_models is None:
            is_pipeline = inputs.model is not None and inputs.model.describe().get("family") == "pipeline"
            keep_models = not is_pipeline
            choices["keep_models"] = {
                "value": keep_models,
                "reason": "a fine-tuned pipeline copy is large; a shard's output is its losses"
                if is_pipeline
                else "small models: kept for inspection",
            }
        mcfg = MiaConfig(
            num_shadows=num_shadows,
            timesteps=parse_timesteps(timesteps),
            noise_draws=noise_draws,
            flip=flip,
            pool_size=pool_size,
            selection_fraction=selection_fraction,
            fix_variance=fix_variance,
            seed=seed,
            batch_size=batch_size,
            steps=steps,
            keep_models=keep_models,
            query_attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
            pia_t=pia_t,
            secmi_t=secmi_t,
            secmi_k=secmi_k,
        )
        setup, made = build_setup(
            mcfg,
            cfg,
            inputs.data,
            inputs.model,
            inputs.members,
            inputs.nonmembers,
            trainer,
            inputs.shadow_base,
            ShadowTraining(lora_rank=lora_rank, learning_rate=learning_rate),
            inputs.wen_conditions,
            show_progress=True,
        )
        choices |= made | COMMON_CHOICES
        resolved = {
            "preset": cfg.to_dict(),
            "mia": {k: list(v) if isinstance(v, tuple) else v for k, v in mcfg.__dict__.items()},
            "choices": choices,
            "model": model,
            "members": members,
            "nonmembers": nonmembers,
            "setup": setup.describe,
            "wen": {"enabled": wen, "num_seeds": wen_seeds, "prompts": None if prompts is None else str(prompts)},
            "extract_run": str(extract_run) if extract_run else None,
        }
        if dry_run:
            print_json(resolved)
            return
        _run(mcfg, setup, resolved | {"data_info": inputs.data_info}, out, resume, wen, wen_seeds, extract_run, cfg)


def _run(mcfg, setup, resolved, out, resume, wen, wen_seeds, extract_run, cfg) -> None:  # noqa: ANN001
    from diffaudit.attacks.mia_run import run_mia, run_wen
    from diffaudit.runs import RunDir

    with RunDir(out, kind="mia", resume=resume) as run:
        run.write_config(resolved)
        results = run_mia(mcfg, setup, run)
        for name, r in results["attacks"].items():
            print_table(
                f"{name} (t={r['t']})",
                {k: r[k] for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "num_members", "num_nonmembers")},
            )
        if wen:
            report = run_wen(setup, run, wen_seeds, cfg.sample.guidance_scale, mcfg.seed, extract_run)
            if report is None:
                err.print("Wen detector skipped: the target is unconditional")
    err.print(f"results in {out / 'results.json'}, ROC {out / 'roc.png'}")


def _dataset_inference(  # noqa: PLR0913
    out: Path,
    model: str | None,
    suspect: str | None,
    unseen: str | None,
    dtype: str,
    timesteps: tuple[int, ...],
    noise_draws: int,
    alpha: float,
    permutations: int,
    pia_t: int,
    secmi_t: int,
    secmi_k: int,
    seed: int,
    batch_size: int,
    resume: bool,
    dry_run: bool,
) -> None:
    """``--suspect SOURCE --unseen SOURCE --model M``: was the suspect set used to train the model?"""
    from diffaudit.attacks.dataset_inference import DatasetInferenceConfig, run_dataset_inference
    from diffaudit.attacks.mia_setup import load_suspect_sets
    from diffaudit.runs import RunDir

    if suspect is None or unseen is None:
        raise ConfigError("dataset inference needs both --suspect and --unseen (images known not to be in training)")
    if model is None:
        raise ConfigError("dataset inference needs --model (the model suspected of training on --suspect)")
    cfg = DatasetInferenceConfig(
        timesteps=timesteps, noise_draws=noise_draws, pia_t=pia_t, secmi_t=secmi_t, secmi_k=secmi_k,
        alpha=alpha, permutations=permutations, seed=seed, batch_size=min(batch_size, 64),
    )  # fmt: skip
    cfg.validate()
    gen, sus, uns, info = load_suspect_sets(model, suspect, unseen, None, dtype)
    resolved = {
        "dataset_inference": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "model": model,
        "suspect": suspect,
        "unseen": unseen,
        "data_info": info,
        "choices": {
            "test": {
                "value": "permutation test of the cross-fitted AUC of a ridge combination of per-image signals",
                "reason": "exact under the null (suspect and unseen exchangeable) for any set sizes",
            }
        },
    }
    if dry_run:
        print_json(resolved)
        return
    with RunDir(out, kind="mia", resume=resume) as run:
        run.write_config(resolved)
        found = run_dataset_inference(cfg, gen, sus, uns, run)["dataset_inference"]
    print_table(
        "dataset inference",
        {k: found[k] for k in ("p_value", "statistic", "num_suspect", "num_unseen", "used", "images_needed")},
    )
    err.print(f"results in {out / 'results.json'}")
