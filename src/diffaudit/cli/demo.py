"""``diffaudit demo``: train, loop, tag-and-scrub loop, extraction, membership inference, copy filter, report."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), help="directory for every stage's run and report.html"),
        quick: bool = typer.Option(False, "--quick", help="tiny models, about a minute; numbers are meaningless"),
    ) -> None:
        """Run the whole audit on built-in data (about 10-18 minutes on 2 CPU cores) and write OUT/report.html.

        Running it again with the same OUT skips finished stages and resumes an interrupted one.
        """
        from diffaudit.demo import run_demo

        report = run_demo(out, quick=quick, log=err.print)
        err.print(f"[bold green]report:[/bold green] {report}")
