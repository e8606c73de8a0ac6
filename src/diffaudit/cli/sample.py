"""``diffaudit sample``: generate an ImageSet (with provenance and seeds) from a model directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from diffaudit.cli.common import err
from diffaudit.config import SampleConfig
from diffaudit.data.grid import save_grid
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
        images = generate(net, str(meta["model_id"]), lab, range(seed, seed + num_images), cfg, class_names)
        images.save(out)
        grid = out.with_suffix(".png")
        save_grid(images.images, grid, ncols=max(1, min(len(class_names) or 10, 20)))
        err.print(f"{num_images} images written to {out}; grid {grid}")
