"""Shards: one unit of a heavy stage's work, written to its own folder atomically, skipped when finished.

A stage's work is a list of ``total`` items in a fixed order (sampling: the planned ``(label, seed)`` requests;
extraction: conditions; kNN: query blocks; MIA: shadow models; loops: ``(arm, seed)`` pairs). Shard ``i/n``
(``0 <= i < n``) takes the contiguous items ``[i*total//n, (i+1)*total//n)``, so the edges fall wherever the
division puts them, not on batch boundaries: stages must not depend on the batch (ours do not: sample ``i``
depends only on its seed and condition).

Layout inside a run directory::

    RUN/manifest.json                      kind, status "sharded" (until ``diffaudit merge RUN``)
    RUN/shards/shard-00002-of-00004/       one finished shard: manifest.json (written last) + the stage's files
    RUN/shards/.tmp-shard-...              a shard being written (renamed into place when complete)

Shard processes never take the run's lock (many write the same run at once); each writes its own folder to a
temporary name and renames it, so a reader sees a shard either complete or not at all. A rerun of a finished
shard with the same configuration returns at once; with another configuration it is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.io import atomic_write_json, ensure_dir, fsync_dir, read_json, to_jsonable

SHARDS_DIR = "shards"
SHARD_MANIFEST = "manifest.json"
SHARD_FORMAT = 1
#: Environment variable holding the shard count for Kubernetes indexed Jobs (which only give the index).
COUNT_ENV = "DIFFAUDIT_SHARD_COUNT"


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (0-based: ``0 <= index < count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: need 0 <= i < n (shards are numbered from 0)")

    @property
    def label(self) -> str:
        """``i/n`` as the user writes it."""
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """The shard's folder name, e.g. ``shard-00002-of-00004`` (sorts in shard order)."""
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def range(self, total: int) -> tuple[int, int]:
        """The items ``[start, stop)`` of a work list of ``total`` items this shard takes."""
        return split_even(total, self.count)[self.index]


def split_even(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges ``[start, stop)`` covering ``range(total)``, sizes differing by at most one.

    Edges are ``k * total // count``; with more shards than items some ranges are empty.
    """
    if total < 0 or count < 1:
        raise ConfigError(f"cannot split {total} items into {count} shards")
    edges = [k * total // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise ConfigError(f"${name}={env[name]!r} is not an integer") from exc


def shard_from_env(env: Mapping[str, str] | None = None) -> ShardSpec:
    """The shard a job runner assigned this process, from its environment.

    In order: a SLURM job array (``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN``, of
    ``SLURM_ARRAY_TASK_COUNT``; so ``--array=1-8`` works as well as ``0-7``), a Kubernetes indexed Job
    (``JOB_COMPLETION_INDEX`` of ``$DIFFAUDIT_SHARD_COUNT``, which the Job spec must set to its
    ``completions``), torchrun/Accelerate (``RANK`` of ``WORLD_SIZE``).
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ConfigError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; use --shard i/n")
        first = _int_env(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return ShardSpec(_int_env(env, "SLURM_ARRAY_TASK_ID") - first, _int_env(env, "SLURM_ARRAY_TASK_COUNT"))
    if "JOB_COMPLETION_INDEX" in env:
        if COUNT_ENV not in env:
            raise ConfigError(
                f"JOB_COMPLETION_INDEX is set but {COUNT_ENV} is not; set it to the Job's completions (or --shard i/n)"
            )
        return ShardSpec(_int_env(env, "JOB_COMPLETION_INDEX"), _int_env(env, COUNT_ENV))
    if "RANK" in env and "WORLD_SIZE" in env:
        return ShardSpec(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"))
    raise ConfigError(
        "--shard auto: no shard in the environment (SLURM_ARRAY_TASK_ID/COUNT, JOB_COMPLETION_INDEX + "
        f"{COUNT_ENV}, or RANK/WORLD_SIZE); pass --shard i/n"
    )


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> ShardSpec | None:
    """``None`` for no sharding; ``"i/n"`` (0-based) or ``"auto"`` (see :func:`shard_from_env`) otherwise."""
    if text is None or text == "":
        return None
    if text.strip().lower() == "auto":
        return shard_from_env(env)
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return ShardSpec(int(index), int(count))
    except ValueError as exc:
        raise ConfigError(f"--shard {text!r}: expected i/n (e.g. 0/4; shards are numbered from 0) or auto") from exc


def config_hash(config: Any) -> str:
    """A 16-hex-digit SHA-256 of ``config`` as canonical JSON (sorted keys; numpy values converted)."""
    text = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def shards_root(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / SHARDS_DIR


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_shard_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished shard folder (ConfigError naming the folder when damaged)."""
    manifest = read_json(folder / SHARD_MANIFEST, "shard manifest", ConfigError)
    if not isinstance(manifest, dict) or "work" not in manifest or "config_hash" not in manifest:
        raise ConfigError(f"{folder / SHARD_MANIFEST}: not a diffaudit shard manifest")
    return manifest


def finished_shard(run_dir: str | os.PathLike[str], spec: ShardSpec, kind: str, chash: str) -> Path | None:
    """The folder of shard ``spec`` when it is finished with this configuration; ``None`` when still to do.

    A finished shard of another kind or configuration is refused (its folder must be removed, or another
    ``--out`` chosen), so that a rerun never mixes two configurations in one run.
    """
    folder = shards_root(run_dir) / spec.name
    if not (folder / SHARD_MANIFEST).is_file():
        return None
    manifest = read_shard_manifest(folder)
    if manifest.get("kind") != kind or manifest.get("config_hash") != chash:
        raise ConfigError(
            f"{folder}: shard {spec.label} was written by a {manifest.get('kind')!r} run with another configuration "
            f"(config hash {manifest.get('config_hash')}, this run {chash}); remove it or choose another --out"
        )
    return folder


def ensure_run_manifest(run_dir: Path, kind: str) -> None:
    """Give ``RUN`` a manifest (kind, status "sharded") so that ``merge`` can open it as a run of ``kind``."""
    top = run_dir / "manifest.json"
    if top.exists():
        manifest = read_json(top, "run manifest", ConfigError)
        if not isinstance(manifest, dict) or manifest.get("kind") != kind:
            found = manifest.get("kind") if isinstance(manifest, dict) else None
            raise ConfigError(f"{run_dir}: is a {found!r} run; its shards cannot be {kind!r} shards")
        return
    ensure_dir(run_dir)
    # Two shards may race here: both write the same content atomically, so either one wins harmlessly.
    atomic_write_json(top, {"kind": kind, "status": "sharded", "started": _now()})


def commit_shard(
    run_dir: str | os.PathLike[str],
    spec: ShardSpec,
    manifest: dict[str, Any],
    write: Callable[[Path], dict[str, Any] | None],
) -> Path:
    """Write shard ``spec`` of ``run_dir``: ``write(folder)`` fills a temporary folder, then it is renamed.

    ``manifest`` must hold ``kind``, ``config_hash``, ``model_id`` and ``work`` (``unit``, ``start``, ``stop``,
    ``total``); ``write`` may return fields to add. The manifest is written last and the folder renamed into
    place, so ``RUN/shards/NAME`` exists only complete. When another process finished the same shard first,
    its folder is kept and this one discarded (both computed the same thing).
    """
    from diffaudit.runs import environment_info

    run_dir = Path(run_dir)
    ensure_run_manifest(run_dir, manifest["kind"])
    root = ensure_dir(shards_root(run_dir))
    final = root / spec.name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}-", dir=root))
    try:
        extra = write(tmp) or {}
        env = environment_info()
        full = {
            "format": SHARD_FORMAT,
            "shard": spec.label,
            "index": spec.index,
            "count": spec.count,
            **manifest,
            **extra,
            "versions": {k: env.get(k) for k in ("diffaudit", "python", "torch", "numpy", "diffusers")},
            "machine": {"platform": env.get("platform"), "cpu": env.get("cpu"), "cuda": env.get("cuda")},
            "status": "finished",
            "ended": _now(),
        }
        atomic_write_json(tmp / SHARD_MANIFEST, full)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / SHARD_MANIFEST).is_file():
                raise
            # A twin process finished this shard first; its folder stands (finished_shard checks its config).
            finished_shard(run_dir, spec, manifest["kind"], manifest["config_hash"])
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def work_record(unit: str, start: int, stop: int, total: int, **keys: Any) -> dict[str, Any]:
    """The ``work`` entry of a shard manifest: which items of which list it covers (plus readable keys)."""
    return {"unit": unit, "start": int(start), "stop": int(stop), "total": int(total), **to_jsonable(keys)}


def request_to_dict(request: Any) -> dict[str, Any]:
    """A frozen request dataclass (LoopRequest, MiaRequest, ...) as JSON-ready data, stored in every shard."""
    import dataclasses

    return to_jsonable(dataclasses.asdict(request))


def request_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """The inverse of :func:`request_to_dict`: JSON lists back to the tuples the dataclass declares.

    Raises a ConfigError naming ``what`` when the stored fields do not fit ``cls`` (a damaged shard).
    """
    import dataclasses

    from diffaudit.errors import ConfigError

    try:
        fields = dict(data)
        for f in dataclasses.fields(cls):
            if isinstance(fields.get(f.name), list) and "tuple" in str(f.type):
                fields[f.name] = tuple(fields[f.name])
        return cls(**fields)
    except TypeError as exc:
        raise ConfigError(f"{what}: not a stored {cls.__name__} ({exc})") from exc


def request_hash(request: Any) -> str:
    """The hash every shard of one run shares: the whole request."""
    return config_hash(request_to_dict(request))
