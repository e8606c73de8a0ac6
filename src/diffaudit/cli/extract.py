"""``diffaudit extract``: generate-and-filter training-data extraction (Carlini et al. 2023) into a run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from diffaudit.attacks import extraction as ex
from diffaudit.attacks.calibration import (
    DEFAULT_NOISE_STD,
    DEFAULT_NUM_PAIRS,
    DEFAULT_TARGET_FPR,
    calibrate_edge_threshold,
)
from diffaudit.cli.common import err, print_table, resolve_preset
from diffaudit.config import DataConfig, SampleConfig
from diffaudit.data.loading import load_data
from diffaudit.errors import ConfigError
from diffaudit.models.checkpoint import load_model, resolve_model_dir
from diffaudit.runs import RunDir
from diffaudit.sampling import generate, parse_labels

REASONS = {
    "per_label": "Carlini et al. generate 500 images per prompt",
    "grid": "4x4 tiles (16), as in Carlini et al. Sec. 4",
    "min_clique": "the paper flags a prompt when the largest clique has >= 10 members",
    "delta": "the paper's (l2, 0.15)-extraction threshold",
    "edge_threshold_default": "the paper does not publish it; 0.1 is the middle of the 0.05-0.15 used by public "
    "re-implementations",
    "edge_threshold_calibrated": "largest tiled-L2 threshold with at most target_fpr false edges between different "
    "training images, planted near-copies (Gaussian pixel noise) as positives",
    "untargeted": "Carlini's adaptive ratio for unconditional models: alpha = 0.5, n = 50",
    "seeds": "label at position p of the scan uses seeds seed + p * per_label + [0, per_label)",
}


def _train_run_dir(model_dir: Path) -> Path | None:
    """The train run that holds ``model_dir`` (RUN/model), if any."""
    # RUN/model, or RUN/checkpoints/step-N/model for a checkpoint of a run still training.
    for cand in (model_dir, *list(model_dir.parents)[:3]):
        if (cand / "manifest.json").exists() and (cand / "config.json").exists():
            return cand
    return None


def _training_data(train: str | None, run_dir: Path | None, resolution: int, channels: int):
    """The training set: the train run's own data config, or ``train`` re-loaded at the model's size (with the run's
    canaries re-planted, so duplicates and canary ids match the model's training data)."""
    run_data: dict = {}
    if run_dir is not None:
        run_data = json.loads((run_dir / "config.json").read_text()).get("data") or {}
    if train is None:
        if not run_data:
            raise ConfigError("--train is required when --model is not a diffaudit train run (no data config found)")
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        cfg = DataConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in run_data.items() if k in fields})
    else:
        cfg = DataConfig(
            source=train,
            resolution=resolution,
            channels=channels,
            canaries=tuple(run_data.get("canaries") or ()),
            canaries_per_count=int(run_data.get("canaries_per_count", 1)),
            seed=int(run_data.get("seed", 0)),
        )
    return load_data(cfg)


def _labels(spec: str, class_names: list[str], conditional: bool) -> list[int]:
    if not conditional or not class_names:
        return [-1]
    if spec == "all":
        return list(range(len(class_names)))
    return [int(parse_labels(item.strip(), 1, class_names)[0]) for item in spec.split(",")]


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        out: Path = typer.Option(..., help="run directory to create (or continue with --resume)"),
        model: Path = typer.Option(None, help="model directory or train run; omit with --canaries to train one"),
        train: str = typer.Option(None, help="training image source; default: the train run's own data config"),
        per_label: int = typer.Option(ex.DEFAULT_PER_LABEL, min=1, help="generations per label (seeds logged)"),
        labels: str = typer.Option("all", help="all | comma-separated class names or indices"),
        grid: int = typer.Option(4, min=1, help="tiles per side of the tiled L2"),
        edge_threshold: float = typer.Option(
            None, help=f"edge when tiled L2 < this (default {ex.DEFAULT_EDGE_THRESHOLD})"
        ),
        calibrate: bool = typer.Option(False, "--calibrate", help="pick the edge threshold by ROC on planted copies"),
        target_fpr: float = typer.Option(DEFAULT_TARGET_FPR, help="false-edge rate for --calibrate"),
        calibration_pairs: int = typer.Option(DEFAULT_NUM_PAIRS, min=10, help="pairs of each kind for --calibrate"),
        calibration_noise: float = typer.Option(DEFAULT_NOISE_STD, help="pixel noise std of planted copies"),
        min_clique: int = typer.Option(ex.DEFAULT_MIN_CLIQUE, min=2, help="flag a label at this clique size"),
        max_cliques: int = typer.Option(1, min=1, help="cliques per label (1: the paper; more: peel further ones)"),
        delta: float = typer.Option(ex.DEFAULT_DELTA, help="normalized-L2 extraction threshold"),
        untargeted: bool = typer.Option(False, "--untargeted", help="also run the adaptive-ratio filter"),
        alpha: float = typer.Option(0.5),
        n_neighbors: int = typer.Option(50, min=1),
        canaries: str = typer.Option(None, help="e.g. 1,2,4,8,16,32: train a model with these canaries first"),
        preset: str = typer.Option("digits-8", help="preset for --canaries training"),
        steps: int = typer.Option(None, help="training steps for --canaries training"),
        set_: list[str] = typer.Option(None, "--set", help="override for --canaries training"),
        sampler: str = typer.Option("ddim", help="ddpm | ddim | dpm++"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(2.0),
        temperature: float = typer.Option(1.0),
        seed: int = typer.Option(0, help="first sampling seed"),
        batch_size: int = typer.Option(256, min=1),
        resume: bool = typer.Option(False, "--resume", help="continue a run: finished labels are not redone"),
    ) -> None:
        """Generate per label, find cliques of near-identical generations, match them to the training set."""
        if calibrate and edge_threshold is not None:
            raise ConfigError("give either --edge-threshold or --calibrate, not both")
        if model is None and canaries is None:
            raise ConfigError("give --model, or --canaries to train a model with planted duplicates first")
        params_kw = dict(grid=grid, min_clique=min_clique, delta=delta, max_cliques=max_cliques)
        ex.ExtractionParams(edge_threshold=edge_threshold or ex.DEFAULT_EDGE_THRESHOLD, **params_kw)  # validate
        with RunDir(out, kind="extract", resume=resume) as run:
            if model is None:
                model = _train_with_canaries(run, canaries, preset, steps, set_)
            model_dir = resolve_model_dir(model)
            net, meta = load_model(model_dir)
            run_dir = _train_run_dir(model_dir)
            data, info = _training_data(train, run_dir, net.config.resolution, net.config.channels)
            class_names = list(meta.get("class_names") or [])
            if not class_names and len(data.class_names) == net.config.num_classes:
                class_names = list(data.class_names)  # checkpoints do not store class names; the data does
            canary_table = info.get("canaries")
            scan = _labels(labels, class_names, net.config.conditional)
            names = [class_names[i] if i >= 0 else "(none)" for i in scan]
            sample_cfg = SampleConfig(sampler, num_steps, guidance_scale, temperature, batch_size)
            config = {
                "model": str(model_dir),
                "model_id": meta["model_id"],
                "train": train,
                "train_size": len(data),
                "labels": scan,
                "per_label": per_label,
                "seed": seed,
                "sample": dataclasses.asdict(sample_cfg),
                "params": {**params_kw, "edge_threshold": edge_threshold, "calibrate": calibrate},
                "calibration": {"target_fpr": target_fpr, "pairs": calibration_pairs, "noise_std": calibration_noise}
                if calibrate
                else None,
                "untargeted": {"alpha": alpha, "n_neighbors": n_neighbors} if untargeted else None,
                "reasons": REASONS,
            }
            run.write_config(config)
            if calibrate:
                cal = calibrate_edge_threshold(data, grid, target_fpr, calibration_pairs, calibration_noise, seed)
                threshold = cal.threshold
                chosen = {"source": "calibrated", "value": threshold, "reason": REASONS["edge_threshold_calibrated"]}
                chosen["calibration"] = cal.to_dict()
                ex.save_roc_plot(cal.roc_fpr, cal.roc_tpr, (cal.fpr, cal.tpr), run.file("roc.png"))
            else:
                threshold = edge_threshold if edge_threshold is not None else ex.DEFAULT_EDGE_THRESHOLD
                source = "given" if edge_threshold is not None else "default"
                chosen = {"source": source, "value": threshold, "reason": REASONS["edge_threshold_default"]}
            run.update_manifest(edge_threshold=threshold, canaries=canary_table)
            params = ex.ExtractionParams(edge_threshold=threshold, **params_kw)

            def gen(label: int, seeds) -> object:
                lab = parse_labels("none" if label < 0 else str(label), len(seeds), class_names)
                return generate(net, str(meta["model_id"]), lab, seeds, sample_cfg, class_names, show_progress=False)

            results = ex.run_extraction(
                run,
                gen,
                scan,
                names,
                data,
                params,
                per_label=per_label,
                seed=seed,
                untargeted=untargeted,
                alpha=alpha,
                n_neighbors=n_neighbors,
                canaries=canary_table,
                extra_results={"edge_threshold": chosen, "model_id": meta["model_id"]},
            )
        s = results["summary"]
        rows = {k: s[k] for k in (ex.NUM_LABELS, ex.NUM_FLAGGED, ex.FLAGGED_CLIQUES, ex.NUM_EXTRACTED)}
        rows["edge_threshold"] = threshold
        if untargeted:
            rows["untargeted_extracted"] = len(results["untargeted"]["extracted_and_within_delta_train_ids"])
        print_table("extraction", rows)
        err.print(f"results in {out / 'results.json'}")


def _train_with_canaries(run: RunDir, canaries: str, preset: str, steps: int | None, overrides: list[str] | None):
    """Train a model on the preset's data with planted canaries into RUN/train (reused when it already exists)."""
    from diffaudit.models.checkpoint import WEIGHTS_FILE
    from diffaudit.train import train as train_model

    try:
        copies = [int(c) for c in canaries.split(",") if c.strip()]
    except ValueError as exc:
        raise ConfigError(f"--canaries must be comma-separated integers, got {canaries!r}") from exc
    cfg = resolve_preset(preset, None, [f"data.canaries={copies}", *(overrides or [])], steps)
    train_dir = run.file("train")
    if (train_dir / "model" / WEIGHTS_FILE).exists():
        return train_dir
    images, info = load_data(cfg.data)
    with RunDir(train_dir, kind="train", resume=train_dir.exists()) as trun:
        trun.write_config(cfg.to_dict() | {"init": None, "data_info": info})
        trun.update_manifest(canaries=info["canaries"])
        train_model(cfg, images, trun)
    return train_dir
