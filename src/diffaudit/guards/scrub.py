"""Scrubbing a training set: remove tagged images, images a tagless detector calls generated, and near-copies of
known generated sets.

This is the prevention docs/background.md section 3 mentions for self-consuming loops: before a model is retrained,
drop the images that a tag detector, a calibrated synthetic-image detector
(:class:`diffaudit.detectors.synthetic.CalibratedDetector`, no tag needed) or a near-copy match says are
synthetic. :func:`scrub` does it for one set and returns what it removed and why; :func:`make_loop_filter` wraps
it as the per-generation hook of the loop engine, and its report also counts (from provenance, which the filter
itself never reads) how many synthetic images slipped through and how many real ones were removed by mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.distances import nearest_neighbors
from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.index import CARLINI_DELTA
from diffaudit.guards.tagging import Tagger

RULE_TAGGED = "tagged"
RULE_NEAR_COPY = "near-copy"
RULE_DETECTED = "detected"
RULES = (RULE_TAGGED, RULE_DETECTED, RULE_NEAR_COPY)

LoopFilter = Callable[[ImageSet, int], tuple[ImageSet, dict[str, Any]]]


def tag_name(tagger: Tagger) -> str:
    """Provenance value for images tagged by ``tagger``, e.g. ``spread-spectrum:key=1234,amplitude=3``."""
    params = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in tagger.params.items())
    return f"{tagger.name}:{params}"


def scrub(
    data: ImageSet,
    tagger: Tagger | None = None,
    threshold: float | None = None,
    generated: Sequence[ImageSet] = (),
    delta: float = CARLINI_DELTA,
    metric: str = "l2",
    grid: int = 4,
    detector: Any = None,
) -> tuple[ImageSet, list[dict[str, Any]]]:
    """Remove from ``data`` the images a tag detector flags and the near-copies of ``generated`` images.

    Args:
        data: the set to clean (``uint8`` ``(N, C, H, W)``).
        tagger, threshold: remove images with ``tagger.score > threshold`` (the threshold must be calibrated
            on untagged images, :meth:`Tagger.calibrate`); no tag rule when ``tagger`` is None.
        generated: known generated sets; an image within ``delta`` (``metric``: normalized ``l2`` or ``tiled``)
            of any of their images is removed.
        delta: near-copy threshold (default Carlini et al.'s 0.15).
        detector: a :class:`~diffaudit.detectors.synthetic.CalibratedDetector`; images it flags
            (``score > threshold``, calibrated on real images) are removed, tag or no tag.

    Returns:
        ``(kept, removed)``: the kept images (order preserved) and one row per removed image:
        ``{"id", "index", "rules": [...], "tag_score", "tag_threshold", "detector_score", "detector_threshold",
        "near_copy_distance", "near_copy_id", "delta"}`` (score/distance keys are None for rules not applied).
    """
    if tagger is not None and threshold is None:
        raise ConfigError("a tag rule needs a detection threshold calibrated on untagged images")
    if tagger is None and threshold is not None:
        raise ConfigError("a detection threshold was given without a tagger")
    if not 0.0 < delta <= 1.0:
        raise ConfigError(f"near-copy delta must be in (0, 1] (normalized L2); got {delta!r}")
    n = len(data)
    tag_hit = np.zeros(n, dtype=bool)
    scores = None
    if tagger is not None and n:
        scores = tagger.score(data.images)
        tag_hit = scores > float(threshold)  # type: ignore[arg-type]
    det_hit = np.zeros(n, dtype=bool)
    det_scores = None
    if detector is not None and n:
        det_scores = detector.scores(data)
        det_hit = det_scores > detector.threshold
    copy_hit = np.zeros(n, dtype=bool)
    near_d = near_id = None
    gens = [g for g in generated if len(g)]
    if gens and n:
        for g in gens:
            if g.shape != data.shape:
                raise DataError(f"generated images of shape {g.shape} do not match the data's {data.shape}")
        pool = ImageSet.concat(gens)
        dist, idx = nearest_neighbors(data.images, pool.images, k=1, metric=metric, grid=grid)
        near_d, near_id = dist[:, 0].astype(np.float64), pool.ids[idx[:, 0]]
        copy_hit = near_d <= delta
    removed_mask = tag_hit | det_hit | copy_hit
    removed = []
    for i in np.flatnonzero(removed_mask).tolist():
        hits = ((RULE_TAGGED, tag_hit[i]), (RULE_DETECTED, det_hit[i]), (RULE_NEAR_COPY, copy_hit[i]))
        rules = [r for r, hit in hits if hit]
        removed.append(
            {
                "id": str(data.ids[i]),
                "index": int(i),
                "rules": rules,
                "tag_score": None if scores is None else float(scores[i]),
                "tag_threshold": None if tagger is None else float(threshold),  # type: ignore[arg-type]
                "detector_score": None if det_scores is None else float(det_scores[i]),
                "detector_threshold": None if detector is None else float(detector.threshold),
                "near_copy_distance": None if near_d is None else float(near_d[i]),
                "near_copy_id": None if near_id is None else str(near_id[i]),
                "delta": float(delta) if gens else None,
            }
        )
    return data.subset(~removed_mask), removed


def scrub_summary(data: ImageSet, removed: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per rule, and (from provenance, as ground truth) synthetic images removed and missed."""
    idx = np.array([r["index"] for r in removed], dtype=np.int64)
    synthetic = data.provenance["synthetic"]
    removed_mask = np.zeros(len(data), dtype=bool)
    removed_mask[idx] = True
    return {
        "num_in": len(data),
        "num_kept": int((~removed_mask).sum()),
        "num_removed": int(removed_mask.sum()),
        "removed_by_rule": {rule: sum(rule in r["rules"] for r in removed) for rule in RULES},
        "synthetic_in": int(synthetic.sum()),
        "synthetic_removed": int((synthetic & removed_mask).sum()),
        "synthetic_slipped": int((synthetic & ~removed_mask).sum()),
        "real_removed": int((~synthetic & removed_mask).sum()),
    }


def make_loop_filter(
    tagger: Tagger | None,
    threshold: float | None,
    generated: Sequence[ImageSet] = (),
    delta: float = CARLINI_DELTA,
    metric: str = "l2",
    remember_removed: bool = False,
    detector: Any = None,
) -> LoopFilter:
    """The loop engine's per-generation hook ``filter_fn(mixed, generation) -> (kept, report)``.

    Args:
        tagger, threshold, generated, delta, metric, detector: as for :func:`scrub` (``tagger=None`` with a
            ``detector``: scrubbing without tags).
        remember_removed: add each generation's removed images to the known generated sets, so that later
            generations also drop their near-copies (off by default: it makes the filter stateful).

    The report holds ``generation``, the :func:`scrub_summary` counts and the removed rows.
    """
    known: list[ImageSet] = list(generated)

    def filter_fn(mixed: ImageSet, generation: int) -> tuple[ImageSet, dict[str, Any]]:
        kept, removed = scrub(mixed, tagger, threshold, known, delta, metric, detector=detector)
        if remember_removed and removed:
            known.append(mixed.subset(np.array([r["index"] for r in removed])))
        report = {"generation": int(generation), **scrub_summary(mixed, removed), "removed": removed}
        return kept, report

    return filter_fn


class LoopTagger:
    """The loop engine's ``tag_fn(samples, generation) -> samples``: tag every generated image.

    With a ``threshold``, it first scores the *untagged* samples and keeps, per generation, the share that a
    detector already flags (:attr:`inherited`): whether a tag learned from tagged training images survives
    into the next model's own outputs.
    """

    def __init__(self, tagger: Tagger, threshold: float | None = None) -> None:
        self.tagger = tagger
        self.threshold = threshold
        self.inherited: dict[int, float] = {}

    def __call__(self, samples: ImageSet, generation: int) -> ImageSet:
        if self.threshold is not None and len(samples):
            self.inherited[int(generation)] = float(self.tagger.detect(samples.images, self.threshold).mean())
        tagged = self.tagger.embed(samples.images)
        # Tagged images are new content: ids are recomputed from the pixels.
        return ImageSet(
            tagged, samples.labels, samples.class_names, {**samples.provenance, "tag": tag_name(self.tagger)}
        )
