"""``tag`` / ``detect`` as library functions: embed an invisible tag, look for one, or detect generated images
without a tag.

:func:`run_tag` writes a tagged copy of an ImageSet. :func:`run_detect` scores images in one of three ways:
for a tag (spread-spectrum or dwtDct, threshold calibrated on untagged images), with a tagless synthetic-image
detector (:mod:`diffaudit.detectors.synthetic`, threshold calibrated on real images), or by scanning a folder of
image files for the public Stable Diffusion v1 / SDXL tags. :func:`make_tagger` and :func:`open_detector` build
the tagger and the calibrated detector from plain options; ``scrub`` uses them too.

Heavy modules (numpy, torch through the detectors) are imported inside the functions so that importing this
module stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError

DEFAULT_TAGGER = "spread-spectrum"
DEFAULT_PRESET = "sd-v1"


def make_tagger(name: str, key: int | None, amplitude: float | None, preset: str = DEFAULT_PRESET) -> Any:
    """A :class:`~diffaudit.guards.tagging.Tagger` by name: spread-spectrum needs ``key``; dwtdct takes ``preset``.

    Raises:
        ConfigError: spread-spectrum without ``key``, or an unknown tagger (the message lists the known ones).
    """
    from diffaudit.guards.tagging import SpreadSpectrumTagger, get_tagger
    from diffaudit.guards.tags_dwt import DwtDctTagger

    if name == SpreadSpectrumTagger.name:
        if key is None:
            raise ConfigError("the spread-spectrum tagger needs --key (the secret that reproduces its pattern)")
        params: dict[str, Any] = {"key": key}
        if amplitude is not None:
            params["amplitude"] = amplitude
        return get_tagger(name, **params)
    if name == DwtDctTagger.name:
        return get_tagger(name, preset=preset)
    return get_tagger(name)  # raises ConfigError listing the known taggers


@dataclass(frozen=True)
class DetectorOptions:
    """How to get a calibrated tagless detector: load a saved one (``detector``) or fit one (``method``).

    ``method`` ``loss`` needs the suspect generator ``model`` (``prompts`` / ``dtype`` for a pipeline) and the
    held-out real images ``calibrate_on``; ``spectral`` / ``cnn`` are trained on ``train_real`` and
    ``train_generated`` (``.npz`` ImageSets) too. The threshold gives false-positive rate ``target_fpr`` on
    ``calibrate_on``.
    """

    method: str | None = None
    detector: Path | None = None
    model: str | None = None
    prompts: Path | None = None
    dtype: str = "auto"
    train_real: Path | None = None
    train_generated: Path | None = None
    calibrate_on: Path | None = None
    target_fpr: float = 0.01
    seed: int = 0
    cnn_steps: int = 300

    @property
    def wanted(self) -> bool:
        """True when a tagless detector is asked for (``method`` or a saved ``detector``)."""
        return self.method is not None or self.detector is not None


def open_detector(opts: DetectorOptions) -> Any:
    """A :class:`~diffaudit.detectors.synthetic.CalibratedDetector`: loaded from ``opts.detector``, or fitted.

    Option errors are raised before any model or data set is loaded.

    Raises:
        ConfigError: an unknown method, or a method missing the model / images it needs.
    """
    from diffaudit.data.imageset import ImageSet
    from diffaudit.detectors.synthetic import METHODS, fit_detector, load_detector

    method = opts.method
    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if opts.detector is None:
        if method == "loss" and opts.model is None:
            raise ConfigError("--method loss needs the suspect generator: pass --model RUN_OR_DIR")
        if opts.calibrate_on is None:
            raise ConfigError(f"--method {method} needs --calibrate-on REAL.npz (held-out real images)")
        if method != "loss" and (opts.train_real is None or opts.train_generated is None):
            raise ConfigError(f"--method {method} is trained: give --train-real REAL.npz and --train-generated GEN.npz")
    gen = None
    if opts.model is not None:
        from diffaudit.generators.select import open_generator

        gen, _ = open_generator(opts.model, opts.prompts, None, None, opts.dtype)
    if opts.detector is not None:
        return load_detector(opts.detector, gen)
    params: dict[str, Any] = {"steps": opts.cnn_steps} if method == "cnn" else {}
    real = None if opts.train_real is None else ImageSet.load(opts.train_real)
    generated = None if opts.train_generated is None else ImageSet.load(opts.train_generated)
    calibration = ImageSet.load(opts.calibrate_on)
    return fit_detector(method, calibration, real, generated, opts.target_fpr, opts.seed, gen, **params)


@dataclass(frozen=True)
class TagConfig:
    """Which tag :func:`run_tag` embeds: ``tagger`` (spread-spectrum with ``key``/``amplitude``, or dwtdct with
    ``preset``)."""

    tagger: str = DEFAULT_TAGGER
    key: int | None = None
    amplitude: float | None = None
    preset: str = DEFAULT_PRESET


def run_tag(config: TagConfig, images: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Embed the tag in every image of the ``.npz`` ImageSet ``images`` and save the result to ``out``.

    The tagged set keeps labels and class names; its provenance gains the column ``tag`` (e.g.
    ``spread-spectrum:key=7,amplitude=3``), and its ids are recomputed since ids are content hashes.

    Returns:
        ``{"num_images": N, "tag": provenance value, "out": str(out)}``.
    """
    from diffaudit.data.imageset import ImageSet
    from diffaudit.guards.scrub import tag_name

    t = make_tagger(config.tagger, config.key, config.amplitude, config.preset)
    data = ImageSet.load(Path(images))
    tagged = ImageSet(t.embed(data.images), data.labels, data.class_names, {**data.provenance, "tag": tag_name(t)})
    tagged.save(Path(out))
    return {"num_images": len(tagged), "tag": tag_name(t), "out": str(out)}


@dataclass(frozen=True)
class DetectConfig:
    """What :func:`run_detect` scores and how.

    Exactly one mode: ``detection.wanted`` (a tagless detector scoring ``images``), ``known_tags`` (scan
    ``folder`` for Stable Diffusion v1 / SDXL tags), or a tag (``tagger`` scoring ``images``; the threshold is
    ``threshold``, calibrated on ``detection.calibrate_on`` at ``detection.target_fpr``, or for dwtdct the bit
    accuracy random bits reach with probability <= the known-tag false-alarm rate).
    """

    images: Path | None = None
    folder: Path | None = None
    known_tags: bool = False
    tag: TagConfig = TagConfig()
    threshold: float | None = None
    detection: DetectorOptions = DetectorOptions()
    save_detector: Path | None = None


def run_detect(config: DetectConfig, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Score images for a tag or for being generated; write the result JSON to ``out`` when given.

    Returns:
        Detector mode: :func:`~diffaudit.detectors.synthetic.detect_report` plus ``images``. Known tags:
        ``folder``, ``false_alarm``, ``min_bit_accuracy``, ``num_images``, ``num_tagged``, ``images`` (one row
        per file: ``file``, ``tag``, ``bit_accuracy``, ``note``). Tag mode: ``images``, ``tagger``, ``params``,
        ``threshold``, ``threshold_source``, ``target_fpr``, ``num_images``, ``num_tagged``, ``fraction_tagged``
        and ``per_image`` (``id``, ``score``, ``tagged``).

    Raises:
        ConfigError: options of two modes mixed, or a tag threshold with no source.
    """
    from diffaudit.io import atomic_write_json

    if config.detection.wanted:
        result = _detect_synthetic(config)
    elif config.known_tags:
        result = _detect_known_tags(config)
    else:
        result = _detect_tag(config)
    if out is not None:
        atomic_write_json(Path(out), result)
    return result


def detect_brief(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_detect`'s result without per-image rows (a known-tag scan keeps file, tag and note per file)."""
    brief = {k: v for k, v in result.items() if k not in ("per_image", "images")}
    if "per_image" in result:
        return brief | {"images": result["images"]}
    return brief | {"images": [{"file": r["file"], "tag": r["tag"], "note": r["note"]} for r in result["images"]]}


def _detect_synthetic(config: DetectConfig) -> dict[str, Any]:
    from diffaudit.data.imageset import ImageSet
    from diffaudit.detectors.synthetic import detect_report, save_detector

    if config.images is None or config.folder is not None or config.known_tags:
        raise ConfigError("--method / --detector score --images FILE.npz")
    if config.threshold is not None:
        raise ConfigError("a tagless detector's threshold comes from --calibrate-on real images")
    det = open_detector(config.detection)
    if config.save_detector is not None:
        save_detector(det, config.save_detector, config.detection.model)
    report = detect_report(det, ImageSet.load(config.images))
    report["images"] = str(config.images)
    return report


def _detect_known_tags(config: DetectConfig) -> dict[str, Any]:
    from diffaudit.guards.tags_dwt import KNOWN_TAG_FALSE_ALARM, detect_known_tags, min_bit_accuracy

    if config.folder is None or config.images is not None:
        raise ConfigError("--known-tags scans a --folder of image files (not --images)")
    matches = detect_known_tags(config.folder, KNOWN_TAG_FALSE_ALARM)
    rows = [{"file": m.source, "tag": m.tag, "bit_accuracy": m.bit_accuracy, "note": m.note} for m in matches]
    return {
        "folder": str(config.folder),
        "false_alarm": KNOWN_TAG_FALSE_ALARM,
        "min_bit_accuracy": {"sd-v1": min_bit_accuracy(136), "sdxl": min_bit_accuracy(48)},
        "num_images": len(rows),
        "num_tagged": sum(bool(r["tag"]) for r in rows),
        "images": rows,
    }


def _detect_tag(config: DetectConfig) -> dict[str, Any]:
    from diffaudit.data.imageset import ImageSet
    from diffaudit.guards.tags_dwt import KNOWN_TAG_FALSE_ALARM, DwtDctTagger, min_bit_accuracy

    if config.images is None or config.folder is not None:
        raise ConfigError("detect needs --images FILE.npz (or --folder DIR with --known-tags)")
    tc, calibrate_on, target_fpr = config.tag, config.detection.calibrate_on, config.detection.target_fpr
    t = make_tagger(tc.tagger, tc.key, tc.amplitude, tc.preset)
    data = ImageSet.load(config.images)
    if config.threshold is not None and calibrate_on is not None:
        raise ConfigError("give either --threshold or --calibrate-on, not both")
    if calibrate_on is not None:
        thr, how = t.calibrate(ImageSet.load(calibrate_on).images, target_fpr), f"calibrated on {calibrate_on}"
    elif config.threshold is not None:
        thr, how = float(config.threshold), "given"
    elif isinstance(t, DwtDctTagger):
        # dwtDct decodes bits: random bits reach this accuracy with probability <= the false-alarm rate.
        thr = min_bit_accuracy(len(t.bits), KNOWN_TAG_FALSE_ALARM)
        how = f"bit accuracy random bits reach with probability <= {KNOWN_TAG_FALSE_ALARM}"
    else:
        raise ConfigError(
            "a detection threshold must come from untagged images: pass --calibrate-on CLEAN.npz "
            "(or --threshold T from an earlier calibration)"
        )
    scores = t.score(data.images)
    hits = scores > thr
    return {
        "images": str(config.images),
        "tagger": t.name,
        "params": t.params,
        "threshold": thr,
        "threshold_source": how,
        "target_fpr": target_fpr if calibrate_on is not None else None,
        "num_images": len(data),
        "num_tagged": int(hits.sum()),
        "fraction_tagged": float(hits.mean()) if len(data) else 0.0,
        "per_image": [
            {"id": str(i), "score": float(s), "tagged": bool(h)} for i, s, h in zip(data.ids, scores, hits, strict=True)
        ],
    }
