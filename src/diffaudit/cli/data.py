"""``diffaudit data show SOURCE``: summarise an image source and write a grid."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import data_config_from_options, print_json


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(
        help="Inspect image sources (digits, faces, glyphs, folder:PATH, npz:PATH).", no_args_is_help=True
    )

    @data_app.command("show")
    def show(
        source: str = typer.Argument(..., help="digits | faces | glyphs | folder:PATH | npz:PATH"),
        grid: Path = typer.Option(None, help="where to write a PNG grid (default: SOURCE-grid.png)"),
        resolution: int = typer.Option(None, help="resize every image to this square size"),
        channels: int = typer.Option(None, help="convert to 1 (grey) or 3 (RGB) channels"),
        subset: int = typer.Option(None, help="keep a seeded random subset of this size"),
        seed: int = typer.Option(0),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable files and count them"),
        save: Path = typer.Option(None, help="also save the loaded set as .npz"),
    ) -> None:
        """Print a summary of SOURCE and write a grid of its first images."""
        from diffaudit.data.show import show_source

        cfg = data_config_from_options(source, resolution, channels, subset, seed, skip_bad)
        print_json(show_source(cfg, grid, save))

    app.add_typer(data_app, name="data")
