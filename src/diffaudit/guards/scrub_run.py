"""``scrub`` as a library function: clean a data source into an ``.npz`` and write a manifest beside it.

:func:`run_scrub` loads the source, builds the rules asked for (a tag with its threshold, a calibrated tagless
detector, near-copies of known generated sets), applies :func:`diffaudit.guards.scrub.scrub` and writes
``OUT`` (the kept images) and ``OUT.scrub.json`` (what was removed and why, with the rules' parameters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.guards.tag_run import DEFAULT_PRESET, DetectorOptions, make_tagger

#: Carlini et al.'s near-copy threshold (diffaudit.guards.index.CARLINI_DELTA; not imported, to keep imports light).
CARLINI_DELTA = 0.15


@dataclass(frozen=True)
class ScrubConfig:
    """What :func:`run_scrub` removes from the source ``data`` (a data spec: digits, folder:PATH, npz:PATH...).

    Rules (at least one): ``tagger`` (with ``key`` / ``preset``) removes images whose tag score exceeds
    ``threshold``, or a threshold calibrated on ``detection.calibrate_on`` at ``detection.target_fpr``;
    ``detection`` (when ``detection.wanted``) removes images a calibrated tagless detector flags; ``generated``
    (paths of ``.npz`` ImageSets) removes images within ``near_copy_delta`` (``metric``: ``l2`` | ``tiled``) of
    any generated image.
    """

    data: str
    tagger: str | None = None
    key: int | None = None
    preset: str = DEFAULT_PRESET
    threshold: float | None = None
    generated: tuple[str, ...] = ()
    near_copy_delta: float = CARLINI_DELTA
    metric: str = "l2"
    detection: DetectorOptions = field(default_factory=DetectorOptions)


def parse_generated(text: str | None) -> tuple[str, ...]:
    """``"a.npz, b.npz"`` -> ``("a.npz", "b.npz")`` (the ``--generated`` option; empty entries dropped)."""
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else ()


def scrub_manifest_path(out: str | os.PathLike[str]) -> Path:
    """``clean.npz`` -> ``clean.scrub.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".scrub.json")


def run_scrub(config: ScrubConfig, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``out`` (the source without the removed images) and the manifest :func:`scrub_manifest_path`.

    Returns:
        The manifest: ``data``, ``out``, ``tagger`` (name and params, or None), ``tag_threshold``,
        ``tag_threshold_source`` (``calibrated`` | ``given`` | None), ``generated``, ``detector`` (its
        description, or None), ``near_copy_delta`` (None without generated sets), ``metric``, ``summary``
        (:func:`~diffaudit.guards.scrub.scrub_summary`) and ``removed`` (one record per removed image).

    Raises:
        ConfigError: no rule, a tag rule without a threshold source, or both ``threshold`` and calibration.
    """
    from diffaudit.config import DataConfig, validate_data
    from diffaudit.data.imageset import ImageSet
    from diffaudit.data.loading import load_data
    from diffaudit.guards.scrub import scrub, scrub_summary
    from diffaudit.guards.tag_run import open_detector
    from diffaudit.io import atomic_write_json

    out = Path(out)
    detection = config.detection
    if config.tagger is None and not config.generated and not detection.wanted:
        raise ConfigError(
            "nothing to scrub by: give --tagger (with a threshold), --method / --detector, or --generated"
        )
    source, _ = load_data(validate_data(DataConfig(source=config.data, seed=0), where="option"))
    det = open_detector(detection) if detection.wanted else None
    t = None
    thr = config.threshold
    if config.tagger is not None:
        t = make_tagger(config.tagger, config.key, None, config.preset)
        if detection.calibrate_on is not None:
            if config.threshold is not None:
                raise ConfigError("give either --threshold or --calibrate-on, not both")
            thr = t.calibrate(ImageSet.load(detection.calibrate_on).images, detection.target_fpr)
        elif config.threshold is None:
            raise ConfigError("--tagger needs --threshold T or --calibrate-on CLEAN.npz")
    gens = [ImageSet.load(Path(p)) for p in config.generated]
    kept, removed = scrub(source, t, thr, gens, config.near_copy_delta, config.metric, detector=det)
    kept.save(out)
    manifest = {
        "data": config.data,
        "out": str(out),
        "tagger": None if t is None else {"name": t.name, "params": t.params},
        "tag_threshold": thr,
        "tag_threshold_source": None if t is None else ("calibrated" if detection.calibrate_on else "given"),
        "generated": list(config.generated),
        "detector": None if det is None else det.describe(),
        "near_copy_delta": config.near_copy_delta if gens else None,
        "metric": config.metric,
        "summary": scrub_summary(source, removed),
        "removed": removed,
    }
    atomic_write_json(scrub_manifest_path(out), manifest)
    return manifest
