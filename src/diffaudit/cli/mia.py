"""``diffaudit mia``: membership inference (loss threshold, online/offline LiRA) and Wen et al.'s detector."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json, print_table
from diffaudit.errors import ConfigError, DataError

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


def read_member_ids(path: Path) -> set[str]:
    """Member ids from a JSON list of ids, or an object with a ``members`` list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read member ids ({exc})") from exc
    ids = data.get("members") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{path}: expected a non-empty JSON list of image ids (or {{'members': [...]}})")
    return set(ids)


def register(app: typer.Typer) -> None:
    @app.command("mia")
    def mia(
        out: Path = typer.Option(..., help="run directory to create (or continue with --resume)"),
        data: str = typer.Option(None, help="candidate pool source; default: the preset's"),
        preset: str = typer.Option("digits-8", help="preset for the target and shadow models"),
        steps: int = typer.Option(None, help="training steps of every model; default: the preset's"),
        set_: list[str] = typer.Option(None, "--set", help="preset override, e.g. --set train.lr=1e-3"),
        num_shadows: int = typer.Option(None, help="shadow models (default 8; 0 with --target)"),
        timesteps: str = typer.Option("10,25,50,100,200,300,500", help="timesteps swept (of 1000)"),
        noise_draws: int = typer.Option(20, min=1, help="noise draws averaged per candidate (strong LiRA)"),
        flip: bool = typer.Option(
            None, "--flip/--no-flip", help="also average over a flipped copy (default: by source)"
        ),
        pool_size: int = typer.Option(None, help="candidates drawn from the source (default: all unique images)"),
        selection_fraction: float = typer.Option(0.3, help="share of candidates used only to choose t"),
        fix_variance: bool = typer.Option(True, "--fix-variance/--per-sample-variance", help="LiRA variance"),
        seed: int = typer.Option(0, help="seeds memberships, splits, query noise and training"),
        target: Path = typer.Option(None, help="attack this model instead of training a target"),
        members: Path = typer.Option(None, help="with --target: JSON list of the ids it was trained on"),
        wen: bool = typer.Option(True, "--wen/--no-wen", help="run Wen et al.'s per-label detector on the target"),
        wen_seeds: int = typer.Option(16, min=2, help="seeds per label for the Wen detector"),
        extract_run: Path = typer.Option(None, help="an extract run (results.json) to compare clique flags with"),
        resume: bool = typer.Option(False, "--resume", help="continue; finished models are not retrained"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
    ) -> None:
        """Membership inference: train a target and K shadows on random halves of a pool, attack, write ROC."""
        from diffaudit.attacks.shadow import MiaConfig
        from diffaudit.cli.common import resolve_preset

        cfg = resolve_preset(preset, data, set_, steps)
        if (target is None) != (members is None):
            raise ConfigError("--target and --members go together (a user model and the ids it trained on)")
        choices: dict[str, dict[str, object]] = {}
        if num_shadows is None:
            num_shadows = 0 if target is not None else 8
            choices["num_shadows"] = {
                "value": num_shadows,
                "reason": "user target: loss threshold only unless shadows are asked for"
                if target is not None
                else "default K=8 (Carlini et al. use 16 on CIFAR-10; CPU budget)",
            }
        if flip is None:
            base = cfg.data.source.split(":", 1)[0]
            flip = base in FLIP_SAFE_SOURCES
            choices["flip"] = {
                "value": flip,
                "reason": f"source {base!r} {'keeps' if flip else 'may not keep'} its meaning under a horizontal flip",
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
        )
        mcfg.validate()
        choices.update(
            {
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
                "training_seeds": {"value": "preset.train.seed + 1000 * seed + model index (target 0)"},
            }
        )
        resolved = {
            "preset": cfg.to_dict(),
            "mia": {k: list(v) if isinstance(v, tuple) else v for k, v in mcfg.__dict__.items()},
            "choices": choices,
            "target": str(target) if target else None,
            "members": str(members) if members else None,
            "wen": {"enabled": wen, "num_seeds": wen_seeds},
            "extract_run": str(extract_run) if extract_run else None,
        }
        if dry_run:
            print_json(resolved)
            return
        _run(cfg, mcfg, resolved, out, resume, target, members, wen, wen_seeds, extract_run)


def _run(cfg, mcfg, resolved, out, resume, target, members, wen, wen_seeds, extract_run) -> None:  # noqa: ANN001
    from diffaudit.attacks import wen as wen_mod
    from diffaudit.attacks.shadow import run_mia
    from diffaudit.data.loading import load_data
    from diffaudit.io import atomic_write_json
    from diffaudit.models.checkpoint import load_model
    from diffaudit.runs import RunDir

    images, info = load_data(cfg.data)
    member_ids = read_member_ids(members) if members is not None else None
    if member_ids is not None and not (set(images.ids.tolist()) & member_ids):
        raise DataError(f"{members}: none of its ids are in the candidate pool {cfg.data.source!r}")
    with RunDir(out, kind="mia", resume=resume) as run:
        run.write_config(resolved | {"data_info": {k: v for k, v in info.items() if k != "canaries"}})
        results = run_mia(cfg, images, run, mcfg, target=target, target_member_ids=member_ids)
        for name, r in results["attacks"].items():
            print_table(
                f"{name} (t={r['t']})",
                {k: r[k] for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "num_members", "num_nonmembers")},
            )
        if wen:
            model_dir = target if target is not None else run.file("models") / "target"
            model, meta = load_model(model_dir)
            if not model.config.conditional:
                err.print("Wen detector skipped: the target is unconditional")
                run.update_manifest(wen="skipped: unconditional model")
            else:
                names = meta.get("class_names") or [str(i) for i in range(model.config.num_classes)]
                report = wen_mod.wen_report(
                    model, names, num_seeds=wen_seeds, guidance_scale=cfg.sample.guidance_scale, seed=mcfg.seed
                )
                if extract_run is not None:
                    report["extraction"] = wen_mod.compare_with_extraction(
                        report, wen_mod.read_extraction_flags(extract_run)
                    )
                atomic_write_json(run.file("wen.json"), report)
    err.print(f"results in {out / 'results.json'}, ROC {out / 'roc.png'}")
