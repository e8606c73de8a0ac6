"""``diffaudit merge RUN``: check a run's shards (same config and model, every item exactly once) and merge them."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, user_text


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        run: Path = typer.Argument(..., help="run directory whose shards/ folder holds the finished shards"),
    ) -> None:
        """Merge the shards of RUN into RUN, as one process would have written it (refuses gaps and doubles)."""
        from diffaudit.scale.merge import merge_run

        summary = merge_run(run)
        err.print(
            f"merged {summary['shards']} {user_text(summary['kind'])} shards of model "
            f"{user_text(summary['model_id'])} into {user_text(run)}"
        )
