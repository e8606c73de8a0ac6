"""``merge_run``: turn a run's finished shards into the run one process would have written.

Before anything is written the shards are checked: one kind, one configuration (hash), one model id, one work
list (same ``total``), and together they cover every item exactly once. A gap names the missing shards (and
their items); an overlap names the shards that both hold the items. Then the stage's merger puts every result
at its key (a request's position, a condition, a shadow model's index), never by the order shards finished in.

Stages register a merger by kind in :data:`MERGERS` (``"module:function"``, imported on use), with signature
``merge(run: RunDir, shards: list[Shard]) -> dict`` (a summary to print). ``run`` is the run directory opened
for writing; ``shards`` are in work order.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.scale.shards import SHARD_MANIFEST, read_shard_manifest, shards_root, split_even

#: kind -> "module:function" of the stage's merger. Extraction, MIA and loops add theirs here.
MERGERS: dict[str, str] = {
    "sample": "diffaudit.sampling:merge_sample_shards",
    "extract": "diffaudit.attacks.extraction_shards:merge_extract_shards",
    "loop": "diffaudit.loop.shards:merge_loop_shards",
    "mia": "diffaudit.attacks.mia_shards:merge_mia_shards",
}


@dataclass(frozen=True)
class Shard:
    """A finished shard folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.manifest.get("shard", self.path.name))

    @property
    def start(self) -> int:
        return int(self.manifest["work"]["start"])

    @property
    def stop(self) -> int:
        return int(self.manifest["work"]["stop"])


def read_shards(run_dir: str | os.PathLike[str]) -> list[Shard]:
    """The finished shards of ``run_dir`` in work order (temporary folders of unfinished shards are ignored)."""
    root = shards_root(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{run_dir}: has no shards (no {root.name}/ folder); run the stage with --shard i/n first")
    shards = [
        Shard(p, read_shard_manifest(p))
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / SHARD_MANIFEST).is_file()
    ]
    if not shards:
        raise ConfigError(f"{root}: no finished shard yet")
    return sorted(shards, key=lambda s: (s.start, s.stop, s.path.name))


def _same(shards: list[Shard], key: str, what: str) -> Any:
    values: dict[str, list[str]] = {}
    for s in shards:
        values.setdefault(str(s.manifest.get(key)), []).append(s.label)
    if len(values) > 1:
        groups = "; ".join(f"{v} in shards {', '.join(labels)}" for v, labels in values.items())
        raise ConfigError(f"shards differ in {what}: {groups}; they cannot be merged into one run")
    return shards[0].manifest.get(key)


def _items(unit: str, start: int, stop: int) -> str:
    return f"{unit} items {start}..{stop - 1}" if stop - start > 1 else f"{unit} item {start}"


def check_coverage(shards: list[Shard]) -> None:
    """Refuse shards that do not cover the work list exactly once, naming the missing or doubled shards."""
    total = int(_same([_WorkView(s) for s in shards], "total", "the size of the work list"))
    unit = str(shards[0].manifest["work"].get("unit", "work"))
    counts = {int(s.manifest["count"]) for s in shards}
    problems: list[str] = []
    # Sweep the ranges in order: a start beyond the covered prefix is a gap, one inside it an overlap.
    covered, last = 0, None
    for s in shards:
        if s.start > covered:
            problems.append(_missing(covered, s.start, counts, total, unit))
        elif s.start < covered and s.stop > s.start and last is not None:
            a, b = (last.label, s.label) if last.label != s.label else (str(last.path), str(s.path))
            problems.append(f"doubled: shards {a} and {b} both hold {_items(unit, s.start, min(s.stop, covered))}")
        if s.stop > covered:
            covered, last = s.stop, s
    if covered < total:
        problems.append(_missing(covered, total, counts, total, unit))
    if problems:
        raise ConfigError("shards do not cover the work exactly once: " + "; ".join(problems))


def _missing(start: int, stop: int, counts: set[int], total: int, unit: str) -> str:
    if len(counts) == 1:
        (n,) = counts
        names = [f"{i}/{n}" for i, (a, b) in enumerate(split_even(total, n)) if a < stop and b > start and b > a]
        if names:
            return f"missing shard{'s' if len(names) > 1 else ''} {', '.join(names)} ({_items(unit, start, stop)})"
    return f"missing {_items(unit, start, stop)}"


class _WorkView:
    """A shard seen through its ``work`` record (for :func:`_same`)."""

    def __init__(self, shard: Shard) -> None:
        self.manifest = shard.manifest["work"]
        self.label = shard.label


def check_shards(shards: list[Shard]) -> dict[str, Any]:
    """Check kind, configuration, model and coverage; returns ``{"kind", "config_hash", "model_id"}``."""
    kind = _same(shards, "kind", "kind")
    chash = _same(shards, "config_hash", "configuration (config hash)")
    model_id = _same(shards, "model_id", "model id")
    check_coverage(shards)
    return {"kind": kind, "config_hash": chash, "model_id": model_id}


def merger_for(kind: str) -> Any:
    """The merge function registered for ``kind``."""
    target = MERGERS.get(kind)
    if target is None:
        raise ConfigError(f"shards of kind {kind!r} cannot be merged (known: {', '.join(sorted(MERGERS))})")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def merge_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check and merge the shards of ``run_dir`` into it; returns the stage's summary plus the checks.

    The run directory is opened (locked) as a resumed run of the shards' kind, so its manifest ends
    ``finished`` like a one-process run's; merging again rewrites the same files.
    """
    from diffaudit.runs import RunDir

    shards = read_shards(run_dir)
    checked = check_shards(shards)
    merge = merger_for(checked["kind"])
    with RunDir(run_dir, kind=checked["kind"], resume=True) as run:
        summary = merge(run, shards)
        run.update_manifest(
            sharded={
                "shards": len(shards),
                "unit": shards[0].manifest["work"].get("unit"),
                "config_hash": checked["config_hash"],
                "machines": sorted({str(s.manifest.get("device", "?")) for s in shards}),
            }
        )
    return checked | {"shards": len(shards)} | dict(summary)
