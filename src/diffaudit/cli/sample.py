"""``diffaudit sample``: generate an ImageSet (with provenance and seeds) from a model directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from diffaudit.cli.common import err
from diffaudit.config import SampleConfig
from diffaudit.data.grid import save_grid
from diffaudit.guards.copy_filter import CopyFilter
from diffaudit.guards.guarded_sampling import guarded_generate, write_guard_record
from diffaudit.guards.index import TrainingIndex
from diffaudit.models.checkpoint import load_model
from diffaudit.sampling import generate, parse_labels


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample(
        model: Path = typer.Option(..., help="model directory, or a train run directory"),
        out: Path = typer.Option(..., help="output .npz (a grid PNG is written beside it)"),
        num_images: int = typer.Option(100, min=1),
        labels: str = typer.Option("all", help="all | none | comma-separated class names or indices"),
        sampler: str = typer.Option("ddim", help="ddpm | ddim | dpm++"),
        num_steps: int = typer.Option(50, min=1),
        guidance_scale: float = typer.Option(2.0),
        temperature: float = typer.Option(1.0, help="scale of the sampling noise (<1: less diverse)"),
        seed: int = typer.Option(0, help="image i uses seed SEED + i"),
        batch_size: int = typer.Option(256, min=1),
        guard: Path = typer.Option(None, help="copy-filter index (diffaudit guard build): re-sample blocked outputs"),
        guard_retries: int = typer.Option(5, min=0, help="re-samples allowed per blocked image"),
    ) -> None:
        """Sample NUM_IMAGES images; image i depends only on its seed and label, never on the batch."""
        net, meta = load_model(model)
        class_names = meta.get("class_names") or [str(i) for i in range(net.config.num_classes)]
        cfg = dataclasses.replace(
            SampleConfig(),
            sampler=sampler,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            temperature=temperature,
            batch_size=batch_size,
        )
        lab = parse_labels(labels, num_images, class_names)
        seeds = range(seed, seed + num_images)
        if guard is None:
            images = generate(net, str(meta["model_id"]), lab, seeds, cfg, class_names)
        else:
            copy_filter = CopyFilter(TrainingIndex.load(guard))
            images, record = guarded_generate(
                net, str(meta["model_id"]), lab, seeds, cfg, copy_filter, class_names, max_retries=guard_retries
            )
            record_path = write_guard_record(out, record)
            err.print(f"copy filter: {len(record['blocked'])} outputs blocked and re-sampled; record {record_path}")
        images.save(out)
        grid = out.with_suffix(".png")
        save_grid(images.images, grid, ncols=max(1, min(len(class_names) or 10, 20)))
        err.print(f"{num_images} images written to {out}; grid {grid}")
