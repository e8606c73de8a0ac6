"""The copy filter: a block/pass decision per generated image, with its evidence.

A :class:`CopyFilter` wraps a :class:`~diffaudit.guards.index.TrainingIndex` and one of its rules
(``calibrated``, ``absolute`` or ``either``, see :mod:`diffaudit.guards.index`). Every decision carries the
nearest training image's id and both rules' distances and thresholds, so a reviewer can see why an image was
blocked and what the other rule would have said.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.index import KEY_THRESHOLD, RULES, TrainingIndex


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CopyFilter:
    """Blocks images too close to a training image.

    Args:
        index: a calibrated training index.
        rule: ``calibrated`` (default: the threshold set on held-out real images), ``absolute`` (Carlini's
            normalized L2 <= delta) or ``either``.
        backend: search backend, ``exact`` or ``faiss``.
    """

    def __init__(self, index: TrainingIndex, rule: str = "calibrated", backend: str = "exact") -> None:
        if rule not in RULES:
            raise ConfigError(f"unknown copy-filter rule {rule!r}; choose one of {', '.join(RULES)}")
        if "calibrated" not in index.calibration or "absolute" not in index.calibration:
            raise DataError("the index has no calibration; build it with diffaudit.guards.index.build_index")
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
        blocked = {"calibrated": cal, "absolute": ab, "either": cal | ab}[self.rule]
        ids = self.index.ids
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
            "ms_per_image": 1000.0 * elapsed / max(n, 1),
        },
        "decisions": [d.to_json() for d in decisions],
    }
