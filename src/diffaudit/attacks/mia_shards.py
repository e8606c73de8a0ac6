"""Sharded membership inference: one unit of work is a trained model (the target, or one shadow).

The work list is the models :func:`~diffaudit.attacks.mia_run.run_mia` fits, in index order: ``0`` (the target,
when this run trains it) then the shadows ``1..K``; shard ``i/n`` takes a contiguous range of them
(``diffaudit mia --shard i/n``, or every shard with ``--shards N --engine local|ray``). Each model is fitted and
scored by :func:`~diffaudit.attacks.shadow.run_shard`, the function the one-process run calls::

    RUN/shards/shard-I-of-N/models/<target|shadow-XX>/mia-losses.npz (+ model/)   one folder per model
    RUN/shards/shard-I-of-N/request.json   the MiaRequest (the merge resolves the audit again with it)
    RUN/shards/shard-I-of-N/config.json    the run's config.json as this shard resolved it

:func:`merge_mia_shards` (``diffaudit merge RUN``) checks the shards' config.json against the one it resolves,
links the model folders into ``RUN/models/`` and runs the same :func:`~diffaudit.attacks.mia_audit.audit_run`
as the one-process run: every losses file is found (keyed by what determines it), so nothing is refitted; the
query attacks (PIA, SecMI, GSA) and Wen's detector run on the target here, in the merging process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.scale.shards import request_hash as shard_config_hash
from diffaudit.scale.shards import request_to_dict

KIND = "mia"
SHARD_UNIT = "models"
REQUEST_FILE = "request.json"


def _restored(data: dict[str, Any]) -> Any:
    from diffaudit.attacks.mia_audit import MiaRequest
    from diffaudit.scale.shards import request_from_dict

    return request_from_dict(MiaRequest, data, REQUEST_FILE)


def model_indices(mcfg: Any, setup: Any) -> list[int]:
    """The models this run fits, in index order: 0 (the target, unless the user brings one), shadows 1..K."""
    return ([0] if setup.target is None else []) + list(range(1, mcfg.num_shadows + 1))


def _resolve(request: Any) -> tuple[Any, Any, dict[str, Any], Any]:
    from diffaudit.attacks.mia_audit import resolve_mia

    resolved = resolve_mia(request, show_progress=False)
    if not model_indices(resolved[0], resolved[1]):
        raise ConfigError("nothing to shard: a user's target without shadows fits no model (drop --shard)")
    return resolved


def mia_shard(request: Any, run_dir: str | os.PathLike[str], spec: Any, show_progress: bool = True) -> Path:
    """Fit and score the models of shard ``spec`` (:class:`~diffaudit.scale.shards.ShardSpec`) into ``run_dir``.

    Returns the shard folder; a finished shard with this request is returned at once, one finished with another
    request is refused.
    """
    from diffaudit.attacks.shadow import run_shard, shard_name
    from diffaudit.device import describe_device, resolve_device
    from diffaudit.io import atomic_write_json
    from diffaudit.scale.shards import commit_shard, config_hash, finished_shard, work_record

    request.validate()
    chash = shard_config_hash(request)
    done = finished_shard(run_dir, spec, KIND, chash)
    if done is not None:
        return done
    mcfg, setup, resolved, _ = _resolve(request)
    items = model_indices(mcfg, setup)
    start, stop = spec.range(len(items))
    if stop == start:
        raise ConfigError(f"shard {spec.label} is empty: {len(items)} models in {spec.count} shards; use fewer")

    def write(folder: Path) -> dict[str, Any]:
        t0, trained = time.perf_counter(), {}
        for index in items[start:stop]:
            _, trained[shard_name(index)] = run_shard(mcfg, setup, index, folder / "models", show_progress)
        atomic_write_json(folder / REQUEST_FILE, request_to_dict(request))
        atomic_write_json(folder / "config.json", resolved)
        seconds = time.perf_counter() - t0
        return {"trained": trained, "seconds": seconds, "device": describe_device(resolve_device(None))}

    keys = {"first": shard_name(items[start]), "last": shard_name(items[stop - 1])}
    manifest = {
        "kind": KIND,
        "config_hash": chash,
        "model_id": f"{setup.trainer.family}-{config_hash(setup.trainer.describe())}",
        "work": work_record(SHARD_UNIT, start, stop, len(items), **keys),
    }
    return commit_shard(run_dir, spec, manifest, write)


def merge_mia_shards(run: Any, shards: list[Any]) -> dict[str, Any]:
    """Merge MIA shards (checked by :func:`diffaudit.scale.merge.check_shards`) into the open run ``run``."""
    from diffaudit.attacks.mia_audit import audit_run
    from diffaudit.attacks.shadow import shard_name
    from diffaudit.io import read_json, to_jsonable
    from diffaudit.loop.shards import install_folder

    request = _restored(read_json(shards[0].path / REQUEST_FILE, "MIA shard request", ConfigError))
    resolved_mia = _resolve(request)
    mcfg, setup, resolved, _ = resolved_mia
    items = model_indices(mcfg, setup)
    if len(items) != int(shards[0].manifest["work"]["total"]):
        raise ConfigError(f"{run.path}: the shards fitted {shards[0].manifest['work']['total']} models, the "
                          f"request gives {len(items)} now")  # fmt: skip
    expected = json.loads(json.dumps(to_jsonable(resolved), default=str))
    trained: dict[str, bool] = {}
    for s in shards:
        if read_json(s.path / "config.json", "MIA shard config", ConfigError) != expected:
            raise ConfigError(f"{s.path}: its config.json differs from the audit its request resolves now")
        names = [shard_name(i) for i in items[s.start : s.stop]]
        if sorted(s.manifest.get("trained", {})) != sorted(names):
            raise ConfigError(f"{s.path}: it holds the models {sorted(s.manifest.get('trained', {}))}, not {names}")
        for name in names:
            install_folder(s.path / "models" / name, run.file("models") / name)
        trained |= s.manifest["trained"]
    seconds = sum(float(s.manifest.get("seconds", 0.0)) for s in shards)
    results = audit_run(request, resolved_mia, run, show_progress=False, shards_done=(trained, seconds))
    return {"results": results, "models": len(items)}
