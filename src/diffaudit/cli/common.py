"""Small helpers shared by the command modules (console output, option parsing)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from diffaudit.config import DataConfig, Preset, apply_overrides, get_preset

out = Console()
err = Console(stderr=True)


def print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str))


def print_table(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)


def resolve_preset(name: str, data: str | None, overrides: list[str] | None, steps: int | None = None) -> Preset:
    """A preset with ``--data``, ``--steps`` and ``--set`` overrides applied (in that order)."""
    preset = get_preset(name)
    extra: list[str] = []
    if data is not None:
        extra.append(f"data.source={data}")
    if steps is not None:
        extra.append(f"train.steps={steps}")
    return apply_overrides(preset, extra + list(overrides or []))


def data_config_from_options(
    source: str, resolution: int | None, channels: int | None, subset: int | None, seed: int, skip_bad: bool
) -> DataConfig:
    return DataConfig(
        source=source, resolution=resolution, channels=channels, subset=subset, seed=seed, skip_bad=skip_bad
    )
