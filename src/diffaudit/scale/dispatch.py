"""Shard dispatch: the ``--shard i/n`` / ``--shards N --engine E`` options of a shardable stage as one call.

:func:`run_sharded` either runs one shard in this process (``--shard i/n``, or ``auto`` from the SLURM /
Kubernetes / torchrun environment; the run is merged later by ``diffaudit merge``), or runs every shard with an
engine (:func:`diffaudit.scale.engines.run_stage`) and merges the run. Both ``diffaudit sample`` and
``diffaudit extract`` go through it, so the option rules are the same for every stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError


@dataclass(frozen=True)
class ShardOptions:
    """How to split a stage: ``shard`` ``"i/n"`` or ``"auto"`` (one shard), or ``shards`` N run by ``engine``
    (``local`` | ``ray``; Ray at ``address``, ``cpus_per_task`` CPUs per task). The defaults mean "no shards"."""

    shard: str | None = None
    shards: int = 0
    engine: str = "local"
    address: str | None = None
    cpus_per_task: float = 1.0

    @property
    def active(self) -> bool:
        """True when any sharding option is set (else the stage runs as one ordinary run)."""
        return self.shard is not None or self.shards > 0 or self.engine != "local"


@dataclass(frozen=True)
class ShardedRun:
    """What :func:`run_sharded` did: one shard (``spec`` and its ``folder``), or all of them (``summary``,
    :func:`diffaudit.scale.merge.merge_run`'s summary plus ``ran`` / ``skipped`` shard counts)."""

    spec: Any = None  # diffaudit.scale.shards.ShardSpec of the one shard run
    folder: Path | None = None
    summary: dict[str, Any] | None = None


def default_shard_count(engine: str) -> int:
    """Shards when ``--shards`` is not given: Ray, one per CPU of this machine (a cluster: pass ``--shards``)."""
    return max(1, os.cpu_count() or 1) if engine == "ray" else 1


def run_sharded(
    stage: Any,
    config: Any,
    run_dir: str | os.PathLike[str],
    options: ShardOptions,
    *,
    show_progress: bool = True,
    resume: bool = False,
) -> ShardedRun:
    """Run ``stage`` (a :class:`diffaudit.scale.engines.Stage`) on ``config`` into ``run_dir`` as ``options`` say.

    ``resume``: the stage's own resume flag, refused here since finished shards are skipped anyway.

    Raises:
        ConfigError: an unknown engine, ``resume``, ``--shard`` combined with ``--shards`` or a non-local engine,
            or a malformed shard spec.
    """
    from diffaudit.scale.engines import ENGINES, run_stage
    from diffaudit.scale.shards import parse_shard

    if options.engine not in ENGINES:
        raise ConfigError(f"--engine {options.engine!r}: choose one of {', '.join(ENGINES)}")
    if resume:
        raise ConfigError("--resume with shards: finished shards are skipped anyway; drop --resume")
    run_dir = Path(run_dir)
    if options.shard is not None:
        if options.shards or options.engine != "local":
            raise ConfigError("--shard i/n runs one shard in this process; use --shards N --engine E to run them all")
        spec = parse_shard(options.shard)
        if spec is None:  # an empty --shard
            raise ConfigError("--shard '': expected i/n (e.g. 0/4; shards are numbered from 0) or auto")
        return ShardedRun(spec=spec, folder=stage.run_unit(config, run_dir, spec, show_progress))
    count = options.shards or default_shard_count(options.engine)
    summary = run_stage(
        stage,
        config,
        run_dir,
        count,
        engine=options.engine,
        address=options.address,
        num_cpus=options.cpus_per_task,
        show_progress=show_progress,
    )
    return ShardedRun(summary=summary)
