"""``evaluate``: every distribution and memorization measure of a generated set against a real one.

The generated set comes first, the reference (real) set second, as everywhere in diffaudit. Features come
from a registered extractor built on the reference (:mod:`diffaudit.metrics.features`); the metrics themselves
live in :mod:`diffaudit.metrics.distribution` and :mod:`diffaudit.metrics.memorization`. This module only
wires them together and records what produced each number (extractor description and accuracy, sizes,
seeds, timings), so that a results file is interpretable on its own. :func:`run_evaluate` is ``diffaudit
evaluate``: it loads the sets from their specs, calls :func:`evaluate` and writes the JSON.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.io import to_jsonable
from diffaudit.metrics.features import CLASSIFIER, KEY_ACCURACY, KEY_RECON_MSE, get_extractor

#: Version of the layout of the dict below; bump on incompatible changes.
SCHEMA_VERSION = 1

# Top-level keys of the result.
KEY_SCHEMA = "schema_version"
KEY_FEATURES = "features"  # the extractor's describe()
KEY_FEATURE_ACCURACY = "feature_heldout_accuracy"  # repeated at top level: every metric depends on it
KEY_FEATURE_RECON = "feature_heldout_recon_mse"
KEY_METRICS = "metrics"  # compute_metrics(...) output
KEY_MEMORIZATION = "memorization"  # memorization_report(...) summary, or None when skipped
KEY_SIZES = "sizes"
KEY_SHAPE = "image_shape"
KEY_SEED = "seed"
KEY_NUM_BOOTSTRAP = "num_bootstrap"
KEY_DELTA = "delta"
KEY_TRAIN_IS_REFERENCE = "train_is_reference"
KEY_TIMINGS = "timings_s"
RESULT_KEYS = (
    KEY_SCHEMA,
    KEY_FEATURES,
    KEY_FEATURE_ACCURACY,
    KEY_FEATURE_RECON,
    KEY_METRICS,
    KEY_MEMORIZATION,
    KEY_SIZES,
    KEY_SHAPE,
    KEY_SEED,
    KEY_NUM_BOOTSTRAP,
    KEY_DELTA,
    KEY_TRAIN_IS_REFERENCE,
    KEY_TIMINGS,
)

#: compute_metrics keywords that evaluate passes through (everything else it sets itself).
METRIC_OPTIONS = ("k_pr", "k_dc", "kid_subsets", "kid_subset_size", "block")

#: Carlini et al.'s extraction threshold on the normalized L2 (docs/background.md section 1).
DEFAULT_DELTA = 0.15


def _check_sets(samples: ImageSet, reference: ImageSet, train: ImageSet) -> None:
    for name, s in (("samples", samples), ("reference", reference), ("train", train)):
        if not isinstance(s, ImageSet):
            raise DataError(f"{name} must be an ImageSet, got {type(s).__name__}")
        if len(s) == 0:
            raise DataError(f"the {name} set is empty")
    for name, s in (("reference", reference), ("train", train)):
        if s.shape != samples.shape:
            raise DataError(
                f"the {name} images have shape {s.shape} (C, H, W) but the samples have {samples.shape}; "
                "load the real data at the samples' resolution and channels"
            )


def evaluate(
    samples: ImageSet,
    reference: ImageSet,
    features: str = CLASSIFIER,
    train: ImageSet | None = None,
    num_bootstrap: int = 0,
    seed: int = 0,
    *,
    feature_options: dict[str, Any] | None = None,
    metric_options: dict[str, Any] | None = None,
    delta: float = DEFAULT_DELTA,
    memorization: bool = True,
    per_sample: bool = False,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Distribution metrics of ``samples`` against ``reference`` and memorization against ``train``.

    Args:
        samples: the generated set, ``uint8 (N, C, H, W)`` images (labels used for per-class metrics).
        reference: the real set of the same ``(C, H, W)``; the feature extractor is built (and, for
            ``classifier``, trained) on it.
        features: a registered extractor name (see :func:`diffaudit.metrics.features.available_extractors`).
        train: the model's training set for the memorization measures; defaults to ``reference``.
        num_bootstrap: bootstrap resamples for confidence intervals (0: none).
        seed: seeds the bootstrap and the memorization measures. The extractor has its own seed
            (``feature_options["seed"]``, default 0) so that runs with different ``seed`` share one feature
            network and stay comparable.
        feature_options: options for the extractor, e.g. ``{"epochs": 10}``.
        metric_options: keyword options of ``compute_metrics`` among :data:`METRIC_OPTIONS`
            (e.g. ``{"kid_subsets": 10}``).
        delta: normalized-L2 threshold for "extracted" (Carlini et al.: 0.15).
        memorization: compute the memorization report (needs pixel distances to every training image).
        per_sample: keep the memorization report's per-sample arrays (as lists), not only its summary.
        batch_size: feature-extraction batch size (does not change the results).

    Returns:
        A JSON-ready dict with the keys in :data:`RESULT_KEYS`.

    Raises:
        DataError: empty sets or shapes that differ.
        ConfigError: an unknown extractor or option, or a bad ``num_bootstrap`` / ``delta``.
    """
    if train is None:
        train = reference
    _check_sets(samples, reference, train)
    if not isinstance(num_bootstrap, int) or num_bootstrap < 0:
        raise ConfigError(f"num_bootstrap={num_bootstrap!r} must be a non-negative integer")
    if not 0.0 < float(delta) <= 1.0:
        raise ConfigError(f"delta={delta!r} must be in (0, 1] (normalized L2 of images in [0, 1])")
    unknown = sorted(set(metric_options or {}) - set(METRIC_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown metric option(s) {unknown}; known: {list(METRIC_OPTIONS)}")
    from diffaudit.metrics.distribution import compute_metrics

    timings: dict[str, float] = {}
    start = time.perf_counter()
    extractor = get_extractor(features, reference, **(feature_options or {}))
    timings["build_extractor"] = time.perf_counter() - start

    start = time.perf_counter()
    gen_feats = extractor(samples.images, batch_size=batch_size)
    ref_feats = extractor(reference.images, batch_size=batch_size)
    timings["extract_features"] = time.perf_counter() - start

    # Per-class metrics only make sense when both sets carry labels from the same class list.
    labelled = samples.is_labelled and reference.is_labelled and samples.class_names == reference.class_names
    start = time.perf_counter()
    metrics = compute_metrics(
        gen_feats,
        ref_feats,
        gen_labels=samples.labels if labelled else None,
        ref_labels=reference.labels if labelled else None,
        class_names=reference.class_names if labelled else None,
        num_bootstrap=num_bootstrap,
        seed=seed,
        **(metric_options or {}),
    )
    timings["distribution_metrics"] = time.perf_counter() - start

    mem: Any = None
    if memorization:
        from diffaudit.metrics.memorization import SUMMARY, memorization_report

        start = time.perf_counter()
        report = memorization_report(samples.images, train.images, delta=delta)
        # Per-sample arrays are N long: only on request, as JSON lists.
        mem = to_jsonable(report) if per_sample else report[SUMMARY]
        timings["memorization"] = time.perf_counter() - start

    description = extractor.describe()
    return {
        KEY_SCHEMA: SCHEMA_VERSION,
        KEY_FEATURES: description,
        KEY_FEATURE_ACCURACY: description.get(KEY_ACCURACY),
        KEY_FEATURE_RECON: description.get(KEY_RECON_MSE),
        KEY_METRICS: metrics,
        KEY_MEMORIZATION: mem,
        KEY_SIZES: {"samples": len(samples), "reference": len(reference), "train": len(train)},
        KEY_SHAPE: list(samples.shape),
        KEY_SEED: seed,
        KEY_NUM_BOOTSTRAP: num_bootstrap,
        KEY_DELTA: float(delta),
        KEY_TRAIN_IS_REFERENCE: train is reference,
        KEY_TIMINGS: {k: round(v, 4) for k, v in timings.items()},
    }


@dataclass(frozen=True)
class EvaluateConfig:
    """What :func:`run_evaluate` compares: ``samples`` (a ``diffaudit sample`` run directory or an ``.npz``)
    against ``reference`` (a data spec: digits, folder:PATH, captioned:PATH, npz:PATH...), with memorization
    measured against ``train`` (a data spec; default: the reference). The other fields are :func:`evaluate`'s."""

    samples: str
    reference: str
    features: str = CLASSIFIER
    train: str | None = None
    num_bootstrap: int = 0
    seed: int = 0
    delta: float = DEFAULT_DELTA
    feature_options: dict[str, Any] = field(default_factory=dict)
    metric_options: dict[str, Any] = field(default_factory=dict)
    memorization: bool = True


def load_real_like(spec: str, like: ImageSet) -> ImageSet:
    """Load the data spec ``spec`` at ``like``'s channels, and its resolution when ``like`` is square (a
    non-square set is loaded as is; :func:`evaluate` then refuses a shape that differs)."""
    from diffaudit.data.sources import load_source

    c, h, w = like.shape
    return load_source(spec, resolution=h if h == w else None, channels=c)


def run_evaluate(config: EvaluateConfig, out: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load the sets of ``config``, :func:`evaluate` them, and write the result JSON to ``out`` when given.

    Returns:
        :func:`evaluate`'s dict plus ``inputs``: ``{"samples", "reference", "train"}`` as given (``train``
        defaults to the reference spec).
    """
    from diffaudit.io import atomic_write_json
    from diffaudit.sampling import load_samples

    gen = load_samples(config.samples)
    ref = load_real_like(config.reference, gen)
    train_set = load_real_like(config.train, gen) if config.train else None
    result = evaluate(
        gen,
        ref,
        features=config.features,
        train=train_set,
        num_bootstrap=config.num_bootstrap,
        seed=config.seed,
        feature_options=config.feature_options,
        metric_options=config.metric_options,
        delta=config.delta,
        memorization=config.memorization,
    )
    result["inputs"] = {
        "samples": str(config.samples),
        "reference": config.reference,
        "train": config.train or config.reference,
    }
    if out is not None:
        atomic_write_json(Path(out), result)
    return result
