"""Merging loop runs that differ only in their seed (e.g. one seed per machine) into one multi-repeat run.

``diffaudit loop --set seed=S`` with one repeat computes exactly the repeat ``S - seed0`` of a run started with
``--set seed=seed0 --repeats R`` (every random choice is seeded by ``seed + repeat``). Merging relabels each
row's repeat as ``seed + repeat - min(seeds)`` and recomputes the summary (curves with 95% bands over the
merged repeats, healing ratios with their noise), so several short runs give the bands of one long one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.io import atomic_write_json
from diffaudit.loop.config import KEY_ARM, KEY_GENERATION, KEY_REPEAT, SUMMARY_FILE, LoopConfig, replace_config
from diffaudit.loop.summary import summarize as summarize_rows

#: Arm settings allowed to differ between merged runs.
_FREE_FIELDS = ("seed", "repeats")


def _read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config_file, metrics_file = path / "config.json", path / "metrics.jsonl"
    for f in (config_file, metrics_file):
        if not f.is_file():
            raise ConfigError(f"{path}: not a loop run directory (no {f.name})")
    config = json.loads(config_file.read_text())
    if "arms" not in config:
        raise ConfigError(f"{config_file}: not a loop run (no 'arms')")
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return config, rows


def _comparable(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {k: v for k, v in cfg.items() if k not in _FREE_FIELDS} for name, cfg in arms.items()}


def merge_runs(runs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], plots: bool = True) -> dict:
    """Merge loop run directories ``runs`` (same experiment, different seeds) into ``out``; returns the summary.

    Raises ConfigError when the runs' arms differ in anything but seed and repeats, or when two runs share a
    seed (the same repeat would be counted twice).
    """
    from diffaudit.runs import RunDir

    if len(runs) < 2:
        raise ConfigError("give at least two loop runs to merge")
    paths = [Path(r) for r in runs]
    loaded = [_read_run(p) for p in paths]
    first_cfg = loaded[0][0]
    for path, (cfg, _) in zip(paths[1:], loaded[1:], strict=True):
        if _comparable(cfg["arms"]) != _comparable(first_cfg["arms"]):
            raise ConfigError(f"{path}: its arms differ from {paths[0]}'s in more than seed and repeats")
        if cfg.get("hooks") != first_cfg.get("hooks"):  # e.g. one run with --tag-and-scrub, one without
            raise ConfigError(f"{path}: its safeguard hooks differ from {paths[0]}'s ({cfg.get('hooks')})")
    merged: list[dict[str, Any]] = []
    seen: dict[tuple[str, int, int], int] = {}  # (arm, repeat, generation) -> index of the run that holds it
    seeds = [next(iter(cfg["arms"].values()))["seed"] for cfg, _ in loaded]
    base_seed = min(seeds)
    for index, (path, seed, (_, rows)) in enumerate(zip(paths, seeds, loaded, strict=True)):
        for row in rows:
            repeat = seed + int(row[KEY_REPEAT]) - base_seed
            key = (row[KEY_ARM], repeat, int(row[KEY_GENERATION]))
            if key in seen and seen[key] != index:
                other = paths[seen[key]]
                raise ConfigError(f"{path} and {other} both hold seed {seed + row[KEY_REPEAT]}: merge each once")
            seen[key] = index
            merged.append({**row, KEY_REPEAT: repeat, "source_run": str(path)})
    arms = {
        name: replace_config(LoopConfig(), **{**cfg, "seed": base_seed, "repeats": len({k[1] for k in seen})})
        for name, cfg in first_cfg["arms"].items()
    }
    with RunDir(out, kind="loop-merge") as run:
        run.write_config(
            {
                "experiment": first_cfg.get("experiment"),
                "merged_from": [str(p) for p in paths],
                "seeds": seeds,
                "arms": {k: v.to_dict() for k, v in arms.items()},
            }
        )
        for row in merged:
            run.log(row)
        summary = summarize_rows(merged, arms)
        doc = {"experiment": first_cfg.get("experiment"), "arms": summary, "merged_from": [str(p) for p in paths]}
        atomic_write_json(run.file(SUMMARY_FILE), doc)
        if plots:
            from diffaudit.loop.plots import plot_curves

            plot_curves(summary, run.file("curves.png"), title=f"{first_cfg.get('experiment')} ({len(paths)} runs)")
    return doc
