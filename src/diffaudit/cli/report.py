"""``diffaudit report RUN... --out report.html``: one self-contained HTML page for run directories."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from diffaudit.cli.common import err
from diffaudit.io import atomic_write_text
from diffaudit.report.html import build_report


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        runs: list[Path] = typer.Argument(..., help="run directories (train, loop, extract, mia, guard, ...)"),
        out: Path = typer.Option(Path("report.html"), help="where to write the HTML page"),
        title: str = typer.Option("diffaudit report"),
    ) -> None:
        """Write one HTML page (images and plots embedded, nothing fetched) covering RUNS."""
        atomic_write_text(out, build_report(list(runs), title=title))
        # The path is user text: escaped so "[/]" or "[bold]" in a file name is printed, not parsed as markup.
        err.print(f"report written to {escape(str(out))}")
