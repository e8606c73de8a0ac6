"""Engines: run every shard of a stage, here in this process or as Ray tasks, then merge by key.

A :class:`Stage` is what a heavy stage exposes to engines: its kind, its unit-of-work function
``run_unit(config, run_dir, spec, show_progress) -> shard folder`` (the same function ``--shard i/n`` calls in a
SLURM array task) and the hash that says whether a finished shard belongs to this configuration. Engines add
no logic of their own, so a run through any engine equals the one-process run.

Ray: plain tasks (no actors holding whole CPUs, which starve other Ray work on small nodes), ``num_cpus`` per
task fractional if asked, ``num_gpus=1`` when the cluster has GPUs. A task runs the unit in a scratch folder on
its worker and returns the shard folder's files as bytes, which this process writes into ``RUN/shards`` as they
finish, in any order: the workers need the model and data but no shared filesystem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.scale.shards import ShardSpec, finished_shard

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Stage:
    """A shardable stage. ``run_unit`` and ``config_hash`` must be module-level functions (Ray pickles them)."""

    kind: str
    run_unit: Callable[[Any, Path, ShardSpec, bool], Path]
    config_hash: Callable[[Any], str]


def sample_stage() -> Stage:
    """Sampling: one unit is a contiguous range of the planned (label, seed) requests."""
    from diffaudit.sampling import sample_shard, shard_config_hash

    return Stage("sample", sample_shard, shard_config_hash)


def extract_stage() -> Stage:
    """Extraction: one unit is a contiguous range of conditions (a clique needs all of a condition's images)."""
    from diffaudit.attacks.extraction_shards import extract_shard, shard_config_hash

    return Stage("extract", extract_shard, shard_config_hash)


def loop_stage() -> Stage:
    """Loop experiments: one unit is an (arm, repeat) pair (generation 0 recomputed per shard, checked at merge)."""
    from diffaudit.loop.shards import loop_shard, shard_config_hash

    return Stage("loop", loop_shard, shard_config_hash)


def mia_stage() -> Stage:
    """Membership inference: one unit is a trained model (the target or a shadow), fitted and scored."""
    from diffaudit.attacks.mia_shards import mia_shard, shard_config_hash

    return Stage("mia", mia_shard, shard_config_hash)


def pending(stage: Stage, config: Any, run_dir: Path, count: int) -> list[ShardSpec]:
    """The shards of ``count`` not yet finished with this configuration."""
    chash = stage.config_hash(config)
    return [
        ShardSpec(i, count)
        for i in range(count)
        if finished_shard(run_dir, ShardSpec(i, count), stage.kind, chash) is None
    ]


def run_stage(
    stage: Stage,
    config: Any,
    run_dir: str | os.PathLike[str],
    count: int,
    engine: str = "local",
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    show_progress: bool = True,
    ray_init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the ``count`` shards of ``stage`` (skipping finished ones) with ``engine``, then merge the run.

    ``address``: an existing Ray cluster (``auto``, ``ray://host:10001``); ``None`` starts a local one
    (``ray_init`` adds ``ray.init`` arguments, e.g. ``num_cpus`` in tests). ``num_gpus`` per task: ``None``
    gives 1 when the cluster has GPUs, else 0. Returns :func:`diffaudit.scale.merge.merge_run`'s summary.
    """
    from diffaudit.scale.merge import merge_run

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if count < 1:
        raise ConfigError(f"number of shards must be >= 1, got {count}")
    run_dir = Path(run_dir)
    todo = pending(stage, config, run_dir, count)
    if engine == "local":
        for spec in todo:
            stage.run_unit(config, run_dir, spec, show_progress)
    elif todo:
        _run_ray(stage, config, run_dir, todo, address, num_cpus, num_gpus, ray_init or {})
    return merge_run(run_dir) | {"ran": len(todo), "skipped": count - len(todo)}


# ---- Ray --------------------------------------------------------------------------------------------------
def _unit_files(stage: Stage, config: Any, spec: ShardSpec) -> dict[str, bytes]:
    """Ray task body: run one unit in a scratch run directory; return its shard folder's files."""
    scratch = Path(tempfile.mkdtemp(prefix="diffaudit-shard-"))
    try:
        folder = stage.run_unit(config, scratch, spec, False)
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def install_shard(run_dir: Path, spec: ShardSpec, kind: str, files: dict[str, bytes]) -> Path:
    """Write a shard folder received from a worker: to a temporary folder, renamed into place when complete."""
    from diffaudit.io import ensure_dir, fsync_dir
    from diffaudit.scale.shards import SHARD_MANIFEST, ensure_run_manifest, shards_root

    if SHARD_MANIFEST not in files:
        raise ConfigError(f"shard {spec.label}: the worker returned no {SHARD_MANIFEST}")
    ensure_run_manifest(run_dir, kind)
    root = ensure_dir(shards_root(run_dir))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}-", dir=root))
    try:
        # The manifest goes last: a folder holding it is complete, as for shards written in place.
        for name in sorted(files, key=lambda n: n == SHARD_MANIFEST):
            path = (tmp / name).resolve()
            if tmp.resolve() not in path.parents:
                raise ConfigError(f"shard {spec.label}: the worker returned a file outside its folder ({name!r})")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
        final = root / spec.name
        if not (final / SHARD_MANIFEST).is_file():
            os.replace(tmp, final)
            fsync_dir(root)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_ray(
    stage: Stage,
    config: Any,
    run_dir: Path,
    todo: list[ShardSpec],
    address: str | None,
    num_cpus: float,
    num_gpus: float | None,
    ray_init: dict[str, Any],
) -> None:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--engine ray needs Ray: pip install 'diffaudit[ray]'") from exc

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **ray_init)
    try:
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(_unit_files)
        refs = {task.remote(stage, config, spec): spec for spec in todo}
        waiting = list(refs)
        while waiting:
            # Results arrive in completion order; each shard is written under its own name (merged by key later).
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                spec = refs[ref]
                install_shard(run_dir, spec, stage.kind, ray.get(ref))
    finally:
        if started:
            ray.shutdown()
