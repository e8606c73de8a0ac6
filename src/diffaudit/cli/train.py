"""``diffaudit train``: train or fine-tune a model (ours, or a diffusers pipeline's U-Net) into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json, resolve_preset
from diffaudit.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        out: Path = typer.Option(..., help="run directory to create (or continue with --resume)"),
        preset: str = typer.Option("digits-8", help="named preset (see `diffaudit presets`)"),
        data: str = typer.Option(None, help="image source; default: the preset's"),
        steps: int = typer.Option(None, help="number of optimiser steps; default: the preset's"),
        init: Path = typer.Option(
            None, help="fine-tune this model directory, or a diffusers pipeline directory (--data captioned:DIR)"
        ),
        dtype: str = typer.Option("fp32", help="pipelines: fp32 | bf16 | fp16 (GPU only) for fine-tuning"),
        resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
        set_: list[str] = typer.Option(None, "--set", help="override, e.g. --set train.lr=1e-3"),
        grid_images: int = typer.Option(100, help="images in the sample grid written at the end (0: none)"),
    ) -> None:
        """Train a model (or fine-tune --init, a model or a diffusers pipeline directory) into RUN."""
        from diffaudit.generators import PIPELINE, family_of

        if init is not None and family_of(init) == PIPELINE:
            # A user's text-to-image pipeline: its U-Net fine-tuned on captioned data (full, or LoRA via --set).
            from diffaudit.train_run import pipeline_settings, run_pipeline_finetune

            settings = pipeline_settings(set_)
            if dry_run:
                print_json({"init": str(init), "data": data, "steps": steps, **settings})
                return
            if data is None or steps is None:
                raise ConfigError("fine-tuning a pipeline needs --data captioned:DIR and --steps N")
            model_id = run_pipeline_finetune(init, data, out, steps, settings, dtype=dtype)
            err.print(f"pipeline {model_id} written to {out / 'model'}")
            return
        cfg = resolve_preset(preset, data, set_, steps)
        if dry_run:
            print_json(cfg.to_dict() | {"init": str(init) if init else None})
            return
        from diffaudit.train_run import run_train

        model_id = run_train(cfg, out, init=init, resume=resume, grid_images=grid_images)
        err.print(f"model {model_id} written to {out / 'model'}")

    @app.command("presets")
    def presets() -> None:
        """List the named presets."""
        from diffaudit.config import PRESETS

        for name, p in sorted(PRESETS.items()):
            typer.echo(f"{name:16s} {p.description}")
