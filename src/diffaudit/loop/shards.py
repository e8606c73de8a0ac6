"""Sharded loop experiments: one unit of work is an ``(arm, repeat)`` pair; shards merge into the one-process run.

The work list is :func:`~diffaudit.loop.experiment.work_items`: ``(repeat, arm)`` pairs, repeat-major with the
arms in the experiment's order (the order a one-process run runs them in), and shard ``i/n`` takes the contiguous
pairs ``[i*P//n, (i+1)*P//n)`` of the ``P = repeats x arms``.

Generation 0 is shared by every arm of a repeat. A shard **recomputes** it (once per repeat it touches, with the
first arm's settings and models, exactly as the one-process run makes it) rather than making the unit a whole
repeat: arms x repeats units give arms-times more parallelism (Bohacek & Farid: few repeats, several arms), and
generation 0 costs one generation of the ``1 + G + H`` an arm runs (a pipeline's generation 0 is only sampled).
Everything is seeded by ``(seed + repeat, generation)``, so on one machine every shard's generation 0 of a repeat
is the same bits; the merge **checks** that (``row.json`` of generation 0, which holds the model id and every
metric) and refuses shards whose generation 0 differs (e.g. one shard on a GPU, one on a CPU), since their arms
would not share a base. Layout of a shard folder::

    RUN/shards/shard-I-of-N/repeat-<r>/gen-000/      generation 0 of each repeat the shard touches
    RUN/shards/shard-I-of-N/repeat-<r>/<arm>/gen-<g>/  its pairs' generations (as in a one-process run)
    RUN/shards/shard-I-of-N/rows.jsonl                its rows, in run order
    RUN/shards/shard-I-of-N/request.json              the LoopRequest (the merge rebuilds the experiment with it)
    RUN/shards/shard-I-of-N/config.json               the run's config.json as this shard saw it

:func:`merge_loop_shards` (``diffaudit merge RUN``) checks each shard's config and rows, links (or copies) the
generation folders into ``RUN/repeat-<r>/``, writes ``metrics.jsonl`` in run order and runs the same
:func:`~diffaudit.loop.experiment.finish` as the one-process run (summary.json, curves.png, grids).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.loop.config import KEY_ARM, KEY_GENERATION, KEY_REPEAT, ROW_FILE
from diffaudit.scale.shards import request_hash as shard_config_hash
from diffaudit.scale.shards import request_to_dict

KIND = "loop"
SHARD_UNIT = "arm-repeat pairs"
ROWS_FILE = "rows.jsonl"
REQUEST_FILE = "request.json"


def _restored(data: dict[str, Any]) -> Any:
    from diffaudit.loop.request import LoopRequest
    from diffaudit.scale.shards import request_from_dict

    return request_from_dict(LoopRequest, data, REQUEST_FILE)


def check_shardable(request: Any) -> None:
    """Refuse, before anything is written, a loop request that cannot be split into shards."""
    request.validate()
    if request.tag_and_scrub:
        # The tagger records inherited-tag rates across the whole run (safeguard.json); shards would split it.
        raise ConfigError("--tag-and-scrub cannot be sharded yet; run it as one process")


def _without_device(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_device(v) for k, v in value.items() if k != "device"}
    return value


def _model_id(config_doc: dict[str, Any]) -> str:
    """What every shard must have trained with: the backend's trainers and sampling options (device aside)."""
    from diffaudit.scale.shards import config_hash

    backend = config_doc["backend"]
    return f"{backend.get('backend')}-{config_hash(_without_device(backend))}"


def _open(request: Any) -> tuple[Any, Any]:
    from diffaudit.loop.experiment import prepare
    from diffaudit.loop.request import build

    exp, real, data_info = build(request)
    return exp, prepare(exp, real, data_info)


def loop_shard(request: Any, run_dir: str | os.PathLike[str], spec: Any, show_progress: bool = True) -> Path:
    """Run shard ``spec`` (:class:`~diffaudit.scale.shards.ShardSpec`) of ``request``'s ``(arm, repeat)`` pairs.

    Writes the shard folder under ``run_dir/shards/`` and returns it; a finished shard with this request is
    returned at once, one finished with another request is refused. Bad data or settings raise before anything
    is written.
    """
    from diffaudit.device import describe_device, resolve_device
    from diffaudit.io import atomic_write_json, atomic_write_text, to_jsonable
    from diffaudit.loop.experiment import run_units, work_items
    from diffaudit.progress import progress_bar
    from diffaudit.scale.shards import commit_shard, finished_shard, work_record

    check_shardable(request)
    chash = shard_config_hash(request)
    done = finished_shard(run_dir, spec, KIND, chash)
    if done is not None:
        return done
    exp, prep = _open(request)
    items = work_items(exp)
    start, stop = spec.range(len(items))
    if stop == start:
        raise ConfigError(f"shard {spec.label} is empty: {len(items)} (arm, repeat) pairs in {spec.count} shards")
    units = items[start:stop]
    total = sum(exp.arms[arm].num_generations for _, arm in units)

    def write(folder: Path) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        with progress_bar(f"loop {exp.name} {spec.label}", total=total, enabled=show_progress) as bar:

            def on_row(name: str, row: dict[str, Any]) -> None:
                rows.append(row)
                bar.update(completed=len(rows), info=f"{name} gen {row[KEY_GENERATION]}")

            run_units(exp, prep, folder, units, on_row)
        atomic_write_text(folder / ROWS_FILE, "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))
        atomic_write_json(folder / REQUEST_FILE, request_to_dict(request))
        atomic_write_json(folder / "config.json", prep.config_doc)
        return {"device": describe_device(resolve_device(None))}

    (r0, a0), (r1, a1) = units[0], units[-1]
    keys = {"first": {"arm": a0, "repeat": r0}, "last": {"arm": a1, "repeat": r1}, "seed": exp.first.seed}
    manifest = {
        "kind": KIND,
        "config_hash": chash,
        "model_id": _model_id(prep.config_doc),
        "work": work_record(SHARD_UNIT, start, stop, len(items), **keys),
    }
    return commit_shard(run_dir, spec, manifest, write)


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links: a pipeline's generations hold whole models, and the shards' files are never rewritten in place.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def install_folder(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the folder ``src`` (built beside it, then renamed; an old ``dst`` is replaced)."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _expected_keys(exp: Any, units: list[tuple[int, str]]) -> list[tuple[str, int, int]]:
    return [(arm, rep, g) for rep, arm in units for g in range(exp.arms[arm].num_generations)]


def merge_loop_shards(run: Any, shards: list[Any]) -> dict[str, Any]:
    """Merge loop shards (checked by :func:`diffaudit.scale.merge.check_shards`) into the open run ``run``.

    Rebuilds the experiment from the shards' request, checks each shard's ``config.json`` against it, its rows
    against its ``(arm, repeat)`` pairs and every shard's generation 0 of a repeat against the others', then
    writes what :func:`~diffaudit.loop.experiment.run_experiment` writes: ``config.json``, the generation
    folders, ``metrics.jsonl`` (rows by ``(repeat, arm, generation)`` in run order), ``summary.json``, the plots.
    """
    from diffaudit.io import atomic_write_text, read_json, read_jsonl, to_jsonable
    from diffaudit.loop.experiment import finish, work_items

    request = _restored(read_json(shards[0].path / REQUEST_FILE, "loop shard request", ConfigError))
    check_shardable(request)
    exp, prep = _open(request)
    items = work_items(exp)
    if len(items) != int(shards[0].manifest["work"]["total"]):
        raise ConfigError(f"{run.path}: the shards ran {shards[0].manifest['work']['total']} (arm, repeat) pairs, "
                          f"the request gives {len(items)} now")  # fmt: skip
    expected_doc = json.loads(json.dumps(to_jsonable(prep.config_doc), default=str))
    rows: list[dict[str, Any]] = []
    base_of: dict[int, Any] = {}  # repeat -> the first shard holding its generation 0
    for s in shards:
        if read_json(s.path / "config.json", "loop shard config", ConfigError) != expected_doc:
            raise ConfigError(f"{s.path}: its config.json differs from the experiment its request builds now")
        units = items[s.start : s.stop]
        got = read_jsonl(s.path / ROWS_FILE)
        keys = [(r[KEY_ARM], int(r[KEY_REPEAT]), int(r[KEY_GENERATION])) for r in got]
        if keys != _expected_keys(exp, units):
            raise ConfigError(f"{s.path}: its rows are not the generations of the (arm, repeat) pairs {units}")
        rows.extend(got)
        for rep in sorted({rep for rep, _ in units}):
            row0 = (s.path / f"repeat-{rep}" / "gen-000" / ROW_FILE).read_bytes()
            if rep not in base_of:
                base_of[rep] = (s, row0)
            elif base_of[rep][1] != row0:
                raise ConfigError(
                    f"generation 0 of repeat {rep} differs between shards {base_of[rep][0].label} and {s.label} "
                    f"(another device or library version?); their arms would not share a base: rerun one of them"
                )
    run.write_config(prep.config_doc)
    for rep, (s, _) in base_of.items():
        install_folder(s.path / f"repeat-{rep}" / "gen-000", run.path / f"repeat-{rep}" / "gen-000")
    for s in shards:
        for rep, arm in items[s.start : s.stop]:
            install_folder(s.path / f"repeat-{rep}" / arm, run.path / f"repeat-{rep}" / arm)
    # metrics.jsonl exactly as the one-process run appends it, rewritten whole so a second merge is the same.
    atomic_write_text(run.file("metrics.jsonl"), "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))
    summary = finish(exp, prep, run, plots=True)
    return {"summary": summary, "pairs": len(items)}
