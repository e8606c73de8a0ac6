"""Small helpers shared by the command modules (console output, option parsing).

Imported by every command module, so it imports nothing heavy (rich's console, the config dataclasses).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from diffaudit.config import DataConfig, resolve_preset, validate_data

__all__ = ["data_config_from_options", "err", "out", "print_json", "print_table", "resolve_preset"]
from diffaudit.errors import one_line

out = Console()
err = Console(stderr=True)


def user_text(value: object) -> str:
    """``value`` made safe to embed in a rich markup string: markup escaped, newlines shown as ``\\n``."""
    return escape(one_line(value))


def print_json(obj: Any) -> None:
    """Print ``obj`` as highlighted JSON on stdout (values that JSON cannot hold printed as strings)."""
    out.print_json(json.dumps(obj, default=str))


def print_table(title: str, rows: dict[str, Any]) -> None:
    """Print ``rows`` as a two-column table (keys and values are plain text, never markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), show_header=False)
    for key, value in rows.items():
        table.add_row(Text(str(key)), Text(f"{value:.4g}" if isinstance(value, float) else str(value)))
    out.print(table)


def data_config_from_options(
    source: str, resolution: int | None, channels: int | None, subset: int | None, seed: int, skip_bad: bool
) -> DataConfig:
    """A validated DataConfig from the usual ``data`` options (a bad value is a ConfigError naming it)."""
    cfg = DataConfig(
        source=source, resolution=resolution, channels=channels, subset=subset, seed=seed, skip_bad=skip_bad
    )
    return validate_data(cfg, where="option")
