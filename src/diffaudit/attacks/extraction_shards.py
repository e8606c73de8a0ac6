"""Sharded extraction: one shard is a contiguous range of conditions, generated and filtered in one worker.

A clique needs all of a condition's generations, so the unit of work is a condition (never a seed range): shard
``i/n`` scans the conditions ``[i*L//n, (i+1)*L//n)`` of the run's ``L`` (``diffaudit extract --shard i/n``,
or every shard with ``--shards N --engine local|ray``). Each condition's piece
(:mod:`diffaudit.attacks.extraction_pieces`: record, kept generations, untargeted statistics, canary distances)
is written into the shard's folder::

    RUN/shards/shard-I-of-N/generations/label_<i>.npz, label_<i>.extra.npz
    RUN/shards/shard-I-of-N/records.jsonl        one record per condition, in scan order
    RUN/shards/shard-I-of-N/extract_config.json  the ExtractConfig (the merge reopens the model and data with it)
    RUN/shards/shard-I-of-N/config.json          the run's config.json as this shard saw it
    RUN/shards/shard-I-of-N/edge_threshold.json  the threshold the shard filtered with (and how it was chosen)

:func:`merge_extract_shards` (``diffaudit merge RUN``) copies the pieces into ``RUN/generations/``, writes
``metrics.jsonl`` in scan order and runs the same :func:`~diffaudit.attacks.extraction_pieces.finish` as
:func:`~diffaudit.attacks.extraction_run.run_extract`: the untargeted pass and canary report over all
generations come from the per-condition statistics, so they need no generation beyond those kept.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from diffaudit.attacks import extraction as ex
from diffaudit.attacks.extraction_pieces import GEN_DIR, extra_file, images_file, make_piece
from diffaudit.attacks.extraction_run import (
    KIND,
    CalibrationConfig,
    ExtractConfig,
    edge_threshold,
    run_config,
    scan_labels,
)
from diffaudit.config import SampleConfig
from diffaudit.errors import ConfigError

SHARD_UNIT = "conditions"
RECORDS_FILE = "records.jsonl"
CONFIG_FILE = "extract_config.json"
THRESHOLD_FILE = "edge_threshold.json"
#: Settings that do not change a shard's output (where and how verbosely it runs).
_LOCAL = ("resume", "device", "show_progress")


def config_to_dict(config: ExtractConfig) -> dict[str, Any]:
    """``config`` as JSON-ready data (nested dataclasses as dicts, tuples as lists)."""
    from diffaudit.io import to_jsonable

    return to_jsonable(dataclasses.asdict(config))


def config_from_dict(data: dict[str, Any]) -> ExtractConfig:
    """The inverse of :func:`config_to_dict` (a ConfigError names a damaged field)."""
    try:
        fields = dict(data)
        fields["sample"] = SampleConfig(**fields["sample"])
        cal = fields.get("calibration")
        fields["calibration"] = None if cal is None else CalibrationConfig(**cal)
        fields["canaries"] = tuple(fields.get("canaries") or ())
        fields["overrides"] = tuple(fields.get("overrides") or ())
        return ExtractConfig(**fields)
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"{CONFIG_FILE}: not an extraction configuration ({exc})") from exc


def shard_config_hash(config: ExtractConfig) -> str:
    """The hash every shard of one extraction run shares (its settings; the model is checked by id)."""
    from diffaudit.scale.shards import config_hash

    return config_hash({k: v for k, v in config_to_dict(config).items() if k not in _LOCAL})


def _without_device(config: dict[str, Any]) -> dict[str, Any]:
    generator = {k: v for k, v in config.get("generator", {}).items() if k != "device"}
    return config | {"generator": generator}


def _check(config: ExtractConfig) -> None:
    if config.model is None:
        raise ConfigError(
            "sharded extraction needs --model: train the model with canaries first (diffaudit train --set "
            "data.canaries=[...]), then extract from its run"
        )


def extract_shard(config: ExtractConfig, run_dir: str | Path, spec: Any, show_progress: bool = True) -> Path:
    """Scan shard ``spec`` (:class:`~diffaudit.scale.shards.ShardSpec`) of ``config``'s conditions into ``run_dir``.

    Generates, filters and matches each condition of the shard's range and writes its piece; returns the shard
    folder. A finished shard with this configuration is returned at once; with another one it is refused.
    """
    from diffaudit.attacks.extraction_data import open_audit
    from diffaudit.device import describe_device, resolve_device
    from diffaudit.generators.select import per_condition_seeds
    from diffaudit.io import atomic_write_json, atomic_write_text, to_jsonable
    from diffaudit.progress import progress_bar
    from diffaudit.scale.shards import commit_shard, config_hash, finished_shard, work_record

    _check(config)
    chash = shard_config_hash(config)
    done = finished_shard(run_dir, spec, KIND, chash)
    if done is not None:
        return done
    audit = open_audit(config)
    labels = scan_labels(config.labels, audit.generator.conditions)
    start, stop = spec.range(len(labels))
    if stop == start:
        raise ConfigError(f"shard {spec.label} is empty: {len(labels)} conditions in {spec.count} shards; use fewer")
    threshold, chosen = edge_threshold(config, audit.train, None)
    params = config.params(threshold)
    _, seeds = per_condition_seeds(labels, config.per_label, config.seed, audit.first_seeds)
    settings = run_config(config, audit, labels)
    n = config.per_label

    def write(folder: Path) -> dict[str, Any]:
        import json

        gen_dir = folder / GEN_DIR
        gen_dir.mkdir()
        rows = []
        with progress_bar(f"extract {spec.label}", total=stop - start, enabled=show_progress) as bar:
            for pos in range(start, stop):
                rows.append(make_piece(audit, config, params, labels[pos], seeds[pos * n : (pos + 1) * n], gen_dir))
                bar.update(completed=pos + 1 - start)
        atomic_write_text(folder / RECORDS_FILE, "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))
        atomic_write_json(folder / CONFIG_FILE, config_to_dict(config))
        atomic_write_json(folder / "config.json", settings)
        atomic_write_json(folder / THRESHOLD_FILE, chosen)
        flagged = sum(bool(r[ex.FLAGGED]) for r in rows)
        return {"num_flagged": flagged, "device": describe_device(resolve_device(config.device))}

    keys = {"first_label": labels[start], "last_label": labels[stop - 1]}
    manifest = {
        "kind": KIND,
        "config_hash": chash,
        "run_config_hash": config_hash(_without_device(settings)),
        "edge_threshold": threshold,
        "model_id": audit.generator.model_id,
        "work": work_record(SHARD_UNIT, start, stop, len(labels), **keys),
    }
    return commit_shard(run_dir, spec, manifest, write)


def merge_extract_shards(run: Any, shards: list[Any]) -> dict[str, Any]:
    """Merge extraction shards (checked by :func:`diffaudit.scale.merge.check_shards`) into the open run ``run``.

    Reopens the model and training data with the shards' configuration (``--device`` of this process), checks
    each shard's run config and edge threshold against the ones computed here and its records against the
    conditions of its range, then writes what :func:`~diffaudit.attacks.extraction_run.run_extract` writes.
    """
    import json

    from diffaudit.attacks.extraction_data import open_audit
    from diffaudit.attacks.extraction_pieces import finish
    from diffaudit.io import atomic_write_json, atomic_write_text, read_json, read_jsonl, to_jsonable
    from diffaudit.scale.shards import config_hash

    saved = read_json(shards[0].path / CONFIG_FILE, "extraction shard config", ConfigError)
    config = dataclasses.replace(config_from_dict(saved), device=None, resume=False, show_progress=False)
    _check(config)
    audit = open_audit(config)
    labels = scan_labels(config.labels, audit.generator.conditions)
    if len(labels) != int(shards[0].manifest["work"]["total"]):
        raise ConfigError(f"{run.path}: the shards scanned {shards[0].manifest['work']['total']} conditions, the "
                          f"model and labels give {len(labels)} now")  # fmt: skip
    settings = run_config(config, audit, labels)
    expected = config_hash(_without_device(settings))
    for s in shards:
        if s.manifest.get("run_config_hash") != expected:
            raise ConfigError(f"{s.path}: its generator, conditions or data differ from what {run.path} opens now")
    run.write_config(settings)
    threshold, chosen = edge_threshold(config, audit.train, run.file("roc.png"))
    gen_dir = run.file(GEN_DIR)
    gen_dir.mkdir(exist_ok=True)
    records: list[dict[str, Any]] = []
    for s in shards:
        if s.manifest.get("edge_threshold") != threshold:
            raise ConfigError(
                f"{s.path}: filtered with edge threshold {s.manifest.get('edge_threshold')}, this merge computes "
                f"{threshold}; it cannot be merged"
            )
        rows = read_jsonl(s.path / RECORDS_FILE)
        if [int(r[ex.LABEL]) for r in rows] != labels[s.start : s.stop]:
            raise ConfigError(f"{s.path}: its records are not the conditions {labels[s.start : s.stop]}")
        for lab in labels[s.start : s.stop]:
            for name in (images_file, extra_file):
                src, dst = name(s.path / GEN_DIR, lab), name(gen_dir, lab)
                tmp = dst.with_name(f".tmp-{dst.name}")
                shutil.copyfile(src, tmp)
                tmp.replace(dst)
        records.extend(rows)
    # metrics.jsonl exactly as the one-process run appends it, rewritten whole so a second merge is the same.
    text = "".join(json.dumps(to_jsonable({"kind": "label", **r})) + "\n" for r in records)
    atomic_write_text(run.file("metrics.jsonl"), text)
    run.update_manifest(edge_threshold=threshold, canaries=audit.canaries)
    results = {
        "params": config.params(threshold).to_dict(),
        "edge_threshold": chosen,
        "model_id": audit.generator.model_id,
    }
    results.update(finish(run.path, config, audit, labels, config.params(threshold), records))
    atomic_write_json(run.file("results.json"), results)
    return {"results": results, "num_conditions": len(labels)}
