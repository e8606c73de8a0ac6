"""``data show`` as a library function: load a data source, summarise it and write a grid of its first images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffaudit.config import DataConfig

#: Unreadable files listed in the summary at most (the count is always complete).
MAX_LISTED_SKIPPED = 20


def default_grid_path(source: str) -> Path:
    """``folder:imgs/a`` -> ``folder_imgs_a-grid.png`` (in the current directory)."""
    return Path(f"{source.replace(':', '_').replace('/', '_')}-grid.png")


def show_source(
    cfg: DataConfig,
    grid: str | os.PathLike[str] | None = None,
    save: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load ``cfg`` (a validated DataConfig), write a PNG grid of its first images to ``grid`` (default
    :func:`default_grid_path`) and, when ``save`` is given, the loaded set as an ``.npz`` there.

    Returns:
        :meth:`ImageSet.summary` plus the loader's info (``skipped_files`` cut to the first
        :data:`MAX_LISTED_SKIPPED`), ``grid`` and, when saved, ``saved``.
    """
    from diffaudit.data.grid import save_grid
    from diffaudit.data.loading import load_data

    data, info = load_data(cfg)
    summary = data.summary() | {k: v for k, v in info.items() if k != "skipped_files"}
    if info.get("skipped_files"):
        summary["skipped_files"] = info["skipped_files"][:MAX_LISTED_SKIPPED]
    grid_path = Path(grid) if grid else default_grid_path(cfg.source)
    save_grid(data.images, grid_path)
    summary["grid"] = str(grid_path)
    if save:
        data.save(Path(save))
        summary["saved"] = str(save)
    return summary
