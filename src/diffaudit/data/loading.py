"""Load the training data a :class:`~diffaudit.config.DataConfig` describes (source, options, canaries, dedup).

Order: source -> canaries -> deduplication. Deduplication runs on the training set *as the trainer would get it*
(Carlini et al. deduplicate the set as given), so canaries planted as duplicates are exactly what it removes: a
canary planted 8 times is trained on once. The canary table keeps the planted count (``copies``) and records
``copies_after_dedup``, so an extraction audit of a deduplicated model still knows which images were planted.
"""

from __future__ import annotations

from diffaudit.config import DataConfig
from diffaudit.data.canaries import plant_canaries
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import SourceOptions, load_source_with_info


def load_data(cfg: DataConfig) -> tuple[ImageSet, dict[str, object]]:
    """Return the image set and an info dict (files read/skipped, canary table, dedup record when set)."""
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
    table: list[dict[str, object]] = []
    if cfg.canaries:
        data, table = plant_canaries(data, cfg.canaries, cfg.canaries_per_count, seed=cfg.seed)
        info["canaries"] = table
    if cfg.dedup is not None:
        from collections import Counter

        from diffaudit.data.dedup import deduplicate

        data, record = deduplicate(data, float(cfg.dedup))
        info["dedup"] = {k: v for k, v in record.items() if k != "removed"}
        counts = Counter(data.ids.tolist())
        for row in table:
            row["copies_after_dedup"] = int(counts.get(str(row["id"]), 0))
    return data, info
