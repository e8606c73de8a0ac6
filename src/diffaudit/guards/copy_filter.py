"""The copy filter: a block/pass decision per generated image, with its evidence.

A :class:`CopyFilter` wraps a :class:`~diffaudit.guards.index.TrainingIndex` and one of its rules
(``calibrated``, ``absolute``, ``either``, or ``robust``: copies after resize, crop, flip and small shifts, see
:mod:`diffaudit.guards.invariant`; ``auto`` picks ``robust`` when the index was built for it). Every decision
carries the nearest training image's id and every rule's distances and thresholds, so a reviewer can see why an
image was blocked and what the other rules would have said.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.index import KEY_THRESHOLD, RULES, TrainingIndex
from diffaudit.guards.invariant import ROBUST, combined_score, variant_index


@dataclass(frozen=True)
class Decision:
    """The filter's verdict on one image.

    Attributes:
        position: row of the image in the checked batch.
        image_id: content id of the checked image.
        blocked: True when ``rule`` fires.
        rule: the active rule (``calibrated``, ``absolute`` or ``either``).
        nearest_id, nearest_index, nearest_label: the nearest training image in the index's space.
        distance, threshold: that distance and the calibrated threshold (blocked by it when ``distance < threshold``).
        l2_nearest_id, l2, delta: the nearest training image in normalized pixel L2, its distance, and the absolute
            threshold (blocked by it when ``l2 <= delta``).
        calibrated_blocks, absolute_blocks: what each rule alone says.
        robust_distance, robust_variant, robust_score, robust_threshold, robust_blocks: the aligned match (nearest
            variant's distance and name, e.g. ``flip+crop0.2@1,0``), the combined score and its threshold, and
            what the robust rule says; None when the index has no robust calibration.
    """

    position: int
    image_id: str
    blocked: bool
    rule: str
    nearest_id: str
    nearest_index: int
    nearest_label: int
    distance: float
    threshold: float
    l2_nearest_id: str
    l2: float
    delta: float
    calibrated_blocks: bool
    absolute_blocks: bool
    robust_distance: float | None = None
    robust_variant: str | None = None
    robust_nearest_id: str | None = None
    robust_score: float | None = None
    robust_threshold: float | None = None
    robust_blocks: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CopyFilter:
    """Blocks images too close to a training image.

    Args:
        index: a calibrated training index.
        rule: ``calibrated`` (the threshold set on held-out real images), ``absolute`` (Carlini's normalized
            L2 <= delta), ``either``, ``robust`` (pixel path or aligned match, one calibrated threshold) or
            ``auto`` (default: ``robust`` when the index has its calibration, else ``calibrated``).
        backend: search backend, ``exact`` or ``faiss``.
    """

    def __init__(self, index: TrainingIndex, rule: str = "auto", backend: str = "exact") -> None:
        if rule not in RULES:
            raise ConfigError(f"unknown copy-filter rule {rule!r}; choose one of {', '.join(RULES)}")
        if "calibrated" not in index.calibration or "absolute" not in index.calibration:
            raise DataError("the index has no calibration; build it with diffaudit.guards.index.build_index")
        self.robust = index.calibration.get(ROBUST)
        if rule == "auto":
            rule = ROBUST if self.robust is not None else "calibrated"
        if rule == ROBUST and self.robust is None:
            raise ConfigError("rule 'robust' needs an index built with invariant matching (guard build --invariant)")
        self.index = index
        self.rule = rule
        self.backend = backend
        self.threshold = float(index.calibration["calibrated"][KEY_THRESHOLD])
        self.delta = float(index.calibration["absolute"][KEY_THRESHOLD])

    def describe(self) -> dict[str, Any]:
        """Rule, thresholds and index description, for records written beside outputs."""
        return {
            "rule": self.rule,
            "metric": self.index.metric,
            "features": self.index.features,
            "threshold": self.threshold,
            "delta": self.delta,
            "num_indexed": len(self.index),
            "calibration": self.index.calibration,
            "robust_threshold": None if self.robust is None else float(self.robust[KEY_THRESHOLD]),
        }

    def check(self, images: np.ndarray | ImageSet) -> list[Decision]:
        """One :class:`Decision` per image of ``uint8`` ``(M, C, H, W)`` images (or an ImageSet), in order."""
        imageset = images if isinstance(images, ImageSet) else ImageSet(images, np.full(len(images), -1))
        if len(imageset) == 0:
            return []
        dist, idx = self.index.search(imageset.images, self.backend)
        if self.index.metric == "l2":
            l2, l2_idx = dist, idx
        else:
            l2, l2_idx = self.index.pixel_l2(imageset.images, self.backend)
        cal = dist < self.threshold
        ab = l2 <= self.delta
        rob = np.zeros(len(imageset), dtype=bool)
        robust: dict[str, Any] = {}
        if self.robust is not None:
            d_rob, rob_idx, names = variant_index(self.index).search(imageset.images)
            score = combined_score(dist, d_rob, self.robust["scales"])
            rob = score < float(self.robust[KEY_THRESHOLD])
            robust = {"d": d_rob, "idx": rob_idx, "names": names, "score": score}
        blocked = {"calibrated": cal, "absolute": ab, "either": cal | ab, ROBUST: rob}[self.rule]
        ids = self.index.ids

        def extra(i: int) -> dict[str, Any]:
            if not robust:
                return {}
            return {
                "robust_distance": float(robust["d"][i]),
                "robust_variant": robust["names"][i],
                "robust_nearest_id": str(ids[robust["idx"][i]]),
                "robust_score": float(robust["score"][i]),
                "robust_threshold": float(self.robust[KEY_THRESHOLD]),  # type: ignore[index]
                "robust_blocks": bool(rob[i]),
            }

        return [
            Decision(
                position=i,
                image_id=str(imageset.ids[i]),
                blocked=bool(blocked[i]),
                rule=self.rule,
                nearest_id=str(ids[idx[i]]),
                nearest_index=int(idx[i]),
                nearest_label=int(self.index.labels[idx[i]]),
                distance=float(dist[i]),
                threshold=self.threshold,
                l2_nearest_id=str(ids[l2_idx[i]]),
                l2=float(l2[i]),
                delta=self.delta,
                calibrated_blocks=bool(cal[i]),
                absolute_blocks=bool(ab[i]),
                **extra(i),
            )
            for i in range(len(imageset))
        ]

    def blocked_mask(self, images: np.ndarray | ImageSet) -> np.ndarray:
        """``bool`` ``(M,)``: which images the active rule blocks."""
        return np.array([d.blocked for d in self.check(images)], dtype=bool)


def check_report(copy_filter: CopyFilter, images: ImageSet) -> dict[str, Any]:
    """Decisions for ``images`` plus a summary (counts per rule, ms per image), ready to write as JSON."""
    start = time.perf_counter()
    decisions = copy_filter.check(images)
    elapsed = time.perf_counter() - start
    n = len(decisions)
    return {
        "filter": copy_filter.describe(),
        "summary": {
            "num_images": n,
            "num_blocked": sum(d.blocked for d in decisions),
            "num_blocked_calibrated": sum(d.calibrated_blocks for d in decisions),
            "num_blocked_absolute": sum(d.absolute_blocks for d in decisions),
            "num_blocked_robust": sum(bool(d.robust_blocks) for d in decisions),
            "ms_per_image": 1000.0 * elapsed / max(n, 1),
        },
        "decisions": [d.to_json() for d in decisions],
    }
