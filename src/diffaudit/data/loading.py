"""Load the training data a :class:`~diffaudit.config.DataConfig` describes (source, options, canaries)."""

from __future__ import annotations

from diffaudit.config import DataConfig
from diffaudit.data.canaries import plant_canaries
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import SourceOptions, load_source_with_info


def load_data(cfg: DataConfig) -> tuple[ImageSet, dict[str, object]]:
    """Return the image set and an info dict (files read/skipped, canary table when canaries are planted)."""
    opts = SourceOptions(
        resolution=cfg.resolution,
        channels=cfg.channels,
        resize_policy=cfg.resize_policy,
        subset=cfg.subset,
        classes=tuple(cfg.classes) if cfg.classes else None,
        seed=cfg.seed,
        skip_bad=cfg.skip_bad,
    )
    data, info = load_source_with_info(cfg.source, opts)
    if cfg.canaries:
        data, table = plant_canaries(data, cfg.canaries, cfg.canaries_per_count, seed=cfg.seed)
        info["canaries"] = table
    return data, info
