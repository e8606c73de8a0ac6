"""``diffaudit extract``: generate-and-filter training-data extraction (Carlini et al. 2023) into a run directory.

Parses options into an :class:`~diffaudit.attacks.extraction_run.ExtractConfig`, calls
:func:`~diffaudit.attacks.extraction_run.run_extract` and prints the summary. Works for class models, diffusers
text-to-image pipeline directories (``--prompts FILE`` or ``--data captioned:DIR``) and analytic models.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_table, user_text

# Defaults repeated here (not imported) so that ``--help`` imports nothing heavy; tests check they agree.
DEFAULT_PER_LABEL = 500
DEFAULT_EDGE_THRESHOLD = 0.1
DEFAULT_MIN_CLIQUE = 10
DEFAULT_DELTA = 0.15
DEFAULT_TARGET_FPR = 1e-3
DEFAULT_NUM_PAIRS = 2000
DEFAULT_NOISE_STD = 0.03

SHARD_HELP = (
    "scan only shard i/n (0-based) of the conditions into OUT/shards/, or auto (SLURM array, Kubernetes "
    "JOB_COMPLETION_INDEX + DIFFAUDIT_SHARD_COUNT, RANK/WORLD_SIZE); then: diffaudit merge OUT"
)
MODEL_HELP = (
    "model or train-run directory, analytic model directory, or diffusers pipeline directory (sd:PATH accepted); "
    "omit with --canaries to train a class model first"
)


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        out: Path = typer.Option(..., help="run directory to create (or continue with --resume)"),
        model: str = typer.Option(None, help=MODEL_HELP),
        data: str = typer.Option(
            None,
            "--data",
            "--train",
            help="training images to match (digits, folder:DIR, captioned:DIR, npz:PATH), loaded at the model's "
            "resolution and channels; default: the train run's own data config",
        ),
        prompts: Path = typer.Option(None, help="prompts file for a text-to-image pipeline (one a line, or JSONL)"),
        labels: str = typer.Option("all", help="all | comma-separated condition names or indices"),
        per_label: int = typer.Option(DEFAULT_PER_LABEL, min=1, help="generations per condition (seeds logged)"),
        grid: int = typer.Option(4, min=1, help="tiles per side of the tiled L2"),
        edge_threshold: float = typer.Option(
            None, help=f"edge when tiled L2 < this (default {DEFAULT_EDGE_THRESHOLD})"
        ),
        calibrate: bool = typer.Option(False, "--calibrate", help="pick the edge threshold by ROC on planted copies"),
        target_fpr: float = typer.Option(DEFAULT_TARGET_FPR, help="false-edge rate for --calibrate"),
        calibration_pairs: int = typer.Option(DEFAULT_NUM_PAIRS, min=10, help="pairs of each kind for --calibrate"),
        calibration_noise: float = typer.Option(DEFAULT_NOISE_STD, help="pixel noise std of planted copies"),
        min_clique: int = typer.Option(DEFAULT_MIN_CLIQUE, min=2, help="flag a condition at this clique size"),
        max_cliques: int = typer.Option(1, min=1, help="cliques per condition (1: the paper; more: peel further)"),
        delta: float = typer.Option(DEFAULT_DELTA, help="normalized-L2 extraction threshold"),
        untargeted: bool = typer.Option(False, "--untargeted", help="also run the adaptive-ratio filter"),
        alpha: float = typer.Option(0.5),
        n_neighbors: int = typer.Option(50, min=1),
        canaries: str = typer.Option(None, help="e.g. 1,2,4,8,16,32: train a class model with these canaries first"),
        preset: str = typer.Option("digits-8", help="preset for --canaries training"),
        steps: int = typer.Option(None, help="training steps for --canaries training"),
        set_: list[str] = typer.Option(None, "--set", help="override for --canaries training"),
        sampler: str = typer.Option("ddim", help="ddpm | ddim | dpm++"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(2.0, help="classifier-free guidance (Stable Diffusion's default: 7.5)"),
        temperature: float = typer.Option(1.0),
        seed: int = typer.Option(0, help="first sampling seed"),
        batch_size: int = typer.Option(256, min=1),
        dtype: str = typer.Option("auto", help="auto | fp32 | fp16 | bf16 (pipelines)"),
        resume: bool = typer.Option(False, "--resume", help="continue a run: finished conditions are not redone"),
        progress: bool = typer.Option(True, help="show progress bars"),
        keep_generations: str = typer.Option(
            "all", help="all | cliques: keep every generation, or only flagged clique members and untargeted hits"
        ),
        shard: str = typer.Option(None, help=SHARD_HELP),
        shards: int = typer.Option(0, min=0, help="run all of N shards with --engine, then merge (0: no shards)"),
        engine: str = typer.Option("local", help="local (this process) | ray (Ray tasks; needs the ray extra)"),
        address: str = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); default: a local one"),
        cpus_per_task: float = typer.Option(1.0, min=0.01, help="Ray: CPUs per task (fractions allowed)"),
    ) -> None:
        """Generate per condition, find cliques of near-identical generations, match them to the training set."""
        from diffaudit.attacks import extraction as ex
        from diffaudit.attacks.extraction_run import CalibrationConfig, ExtractConfig, run_extract
        from diffaudit.config import SampleConfig
        from diffaudit.errors import ConfigError
        from diffaudit.scale.dispatch import ShardOptions, run_sharded
        from diffaudit.scale.engines import extract_stage

        try:
            copies = tuple(int(c) for c in canaries.split(",") if c.strip()) if canaries else ()
        except ValueError as exc:
            raise ConfigError(f"--canaries must be comma-separated integers, got {canaries!r}") from exc
        config = ExtractConfig(
            model=model,
            data=data,
            prompts=None if prompts is None else str(prompts),
            labels=labels,
            per_label=per_label,
            seed=seed,
            sample=SampleConfig(sampler, num_steps, guidance_scale, temperature, batch_size),
            grid=grid,
            edge_threshold=edge_threshold,
            min_clique=min_clique,
            delta=delta,
            max_cliques=max_cliques,
            calibration=CalibrationConfig(target_fpr, calibration_pairs, calibration_noise) if calibrate else None,
            untargeted=untargeted,
            alpha=alpha,
            n_neighbors=n_neighbors,
            canaries=copies,
            preset=preset,
            steps=steps,
            overrides=tuple(set_ or ()),
            resume=resume,
            dtype=dtype,
            show_progress=progress,
            keep_generations=keep_generations,
        )
        sharding = ShardOptions(shard, shards, engine, address, cpus_per_task)
        if sharding.active:
            done = run_sharded(extract_stage(), config, out, sharding, show_progress=progress, resume=resume)
            if done.summary is None:
                err.print(
                    f"shard {done.spec.label} in {user_text(done.folder)}; when all {done.spec.count} are done: "
                    f"diffaudit merge {out}"
                )
                return
            s = done.summary
            err.print(f"{s['shards']} shards ({s['ran']} run, {s['skipped']} already finished) merged")
            results = s["results"]
        else:
            results = run_extract(config, out)
        s = results["summary"]
        rows = {k: s[k] for k in (ex.NUM_LABELS, ex.NUM_FLAGGED, ex.FLAGGED_CLIQUES, ex.NUM_EXTRACTED)}
        rows["edge_threshold"] = results["edge_threshold"]["value"]
        if untargeted:
            rows["untargeted_extracted"] = len(results["untargeted"]["extracted_and_within_delta_train_ids"])
        print_table("extraction", rows)
        err.print(f"results in {out / 'results.json'}")
