"""``diffaudit train``: train or fine-tune a class-conditional diffusion model into a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json, resolve_preset


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        out: Path = typer.Option(..., help="run directory to create (or continue with --resume)"),
        preset: str = typer.Option("digits-8", help="named preset (see `diffaudit presets`)"),
        data: str = typer.Option(None, help="image source; default: the preset's"),
        steps: int = typer.Option(None, help="number of optimiser steps; default: the preset's"),
        init: Path = typer.Option(None, help="fine-tune this model (directory) instead of starting fresh"),
        resume: bool = typer.Option(False, "--resume", help="continue from the run's last checkpoint"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
        set_: list[str] = typer.Option(None, "--set", help="override, e.g. --set train.lr=1e-3"),
        grid_images: int = typer.Option(100, help="images in the sample grid written at the end (0: none)"),
    ) -> None:
        """Train a model; writes RUN/model (safetensors + config.json), checkpoints, metrics.jsonl, a grid."""
        cfg = resolve_preset(preset, data, set_, steps)
        resolved = cfg.to_dict() | {"init": str(init) if init else None}
        if dry_run:
            print_json(resolved)
            return
        from diffaudit.data.grid import save_grid
        from diffaudit.data.loading import load_data
        from diffaudit.scale.ddp import open_train_run, world_from_env
        from diffaudit.train import train as train_model

        images, info = load_data(cfg.data)
        ctx = world_from_env()  # under torchrun / accelerate launch: only rank 0 writes
        with open_train_run(out, resume) as run:
            run.write_config(resolved | {"data_info": info})
            if "canaries" in info:
                run.update_manifest(canaries=info["canaries"])
            model_id = train_model(cfg, images, run, init=init)
            if ctx is not None and not ctx.is_writer:
                return
            if grid_images > 0:
                from diffaudit.generators.classcond import ClassCondGenerator
                from diffaudit.generators.select import parse_labels
                from diffaudit.sampling import sample_options

                gen = ClassCondGenerator.load(run.file("model"))
                labels = parse_labels("all", grid_images, gen.conditions)
                samples = gen.sample(labels, range(grid_images), **sample_options(cfg.sample))
                save_grid(
                    samples.images,
                    run.file("samples-grid.png"),
                    ncols=images.num_classes if images.num_classes >= 2 else 10,
                )
            save_grid(images.images, run.file("data-grid.png"))
        err.print(f"model {model_id} written to {out / 'model'}")

    @app.command("presets")
    def presets() -> None:
        """List the named presets."""
        from diffaudit.config import PRESETS

        for name, p in sorted(PRESETS.items()):
            typer.echo(f"{name:16s} {p.description}")
