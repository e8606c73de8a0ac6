"""Measuring a generation: distribution metrics against the real set, drift from generation 0, healing ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.loop.config import GROUP_ALL, GROUP_HELDOUT, GROUP_RETRAINED, ROW_METRICS

#: Row key suffix of the drift measure (``"<group>/drift_l2"``).
DRIFT_KEY = "drift_l2"


class Evaluator:
    """Distribution metrics of samples against the real set, overall and for retrained / held-out classes.

    One feature extractor (built from the whole real set, cached on disk) serves every generation, so the
    numbers of different generations are comparable. Held-out conditions without real images (a pipeline's
    extra prompts) have no reference distribution: their group is measured by drift only.
    """

    def __init__(
        self,
        real: ImageSet,
        features: str,
        holdout: Sequence[int],
        num_bootstrap: int,
        seed: int,
        clip_model: str = "",
    ) -> None:
        self.real, self.features, self.holdout = real, features, tuple(int(c) for c in holdout)
        self.num_bootstrap, self.seed = num_bootstrap, seed
        self.clip_model = str(clip_model or "")
        self._extractor: Any = None
        self._ref_feats: np.ndarray | None = None
        self._clip: Any = None

    def share(self, other: Evaluator) -> None:
        """Use ``other``'s extractor and CLIP model (one per experiment, built on first use)."""
        self._extractor, self._ref_feats = other._extractor, other._ref_feats
        if other.clip_model == self.clip_model:
            self._clip = other._clip

    def alignment(self, samples: ImageSet) -> dict[str, float]:
        """``<group>/alignment``: CLIP score with ``clip_model``, else the classifier's accuracy on the intended
        class (class models with ``classifier`` features); {} when neither applies (:mod:`.alignment`)."""
        from diffaudit.loop.alignment import ALIGNMENT_KEY, ClipScorer, class_alignment

        if not samples.is_labelled or len(samples) == 0:
            return {}
        if self.clip_model:
            if self._clip is None:
                self._clip = ClipScorer(self.clip_model)
            names = samples.class_names
            values = self._clip(samples.images, [names[int(c)] for c in samples.labels])
        elif self.features == "classifier":
            self._setup()
            ok = class_alignment(self._extractor, samples.images, samples.labels)
            if ok is None:
                return {}
            values = ok.astype(np.float64)
        else:
            return {}
        return {
            f"{group}/{ALIGNMENT_KEY}": float(values[mask].mean())
            for group, mask in self.groups(samples.labels).items()
            if mask.any()
        }

    def _setup(self) -> None:
        if self._extractor is None:
            from diffaudit.metrics.features import get_extractor

            self._extractor = get_extractor(self.features, self.real)
            self._ref_feats = self._extractor(self.real.images)

    def describe(self) -> dict[str, Any]:
        if self.features == "none":
            return {"name": "none"}
        self._setup()
        return self._extractor.describe()

    def groups(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean masks ``(N,)`` of the groups ``all`` and (with held-out classes) ``retrained`` / ``heldout``."""
        out = {GROUP_ALL: np.ones(len(labels), bool)}
        if self.holdout:
            h = np.isin(labels, np.asarray(self.holdout))
            out[GROUP_RETRAINED], out[GROUP_HELDOUT] = ~h, h
        return out

    def __call__(self, samples: ImageSet) -> dict[str, Any]:
        if self.features == "none":
            return self.alignment(samples)
        from diffaudit.metrics.distribution import compute_metrics

        self._setup()
        gen = self._extractor(samples.images)
        ref = self._ref_feats
        gen_groups, ref_groups = self.groups(samples.labels), self.groups(self.real.labels)
        row: dict[str, Any] = {}
        for group, gm in gen_groups.items():
            rm = ref_groups[group]
            if gm.sum() < 6 or rm.sum() < 6:  # compute_metrics needs k+1 rows
                continue
            boot = self.num_bootstrap if group == GROUP_ALL else 0
            res = compute_metrics(gen[gm], ref[rm], num_bootstrap=boot, seed=self.seed)
            for key in ROW_METRICS:
                row[f"{group}/{key}"] = res[key]
            for key, (lo, hi) in res.get("ci", {}).items():
                if key in ROW_METRICS:
                    row[f"{group}/{key}_ci"] = [lo, hi]
        return row | self.alignment(samples)

    def drift(self, images: ImageSet, reference: ImageSet) -> dict[str, float]:
        """Mean per-image RMS pixel distance (uint8 levels / 255) between fixed-seed images and generation 0's.

        ``images`` and ``reference`` hold the same (label, seed) requests in the same order, so a non-zero value
        is what retraining changed (Bohacek & Farid saw it spread to prompts that were never retrained).
        """
        a = images.images.reshape(len(images), -1).astype(np.float64) / 255.0
        b = reference.images.reshape(len(reference), -1).astype(np.float64) / 255.0
        per_image = np.sqrt(((a - b) ** 2).mean(1))
        return {
            f"{group}/{DRIFT_KEY}": float(per_image[mask].mean())
            for group, mask in self.groups(images.labels).items()
            if mask.any()
        }


def healing_ratio(base: float, poisoned: float, healed: float, noise: float = 0.0) -> dict[str, Any]:
    """``(poisoned - healed) / (poisoned - base)``: 1 = full recovery, 0 = none, < 0 = worse after healing.

    Works for metrics where lower is better (FID) and higher is better (recall, coverage) alike. Undefined
    (``ratio`` None, with a ``reason``) when the poisoning moved the metric by no more than ``noise`` (or not
    at all): dividing by noise would report a meaningless number.
    """
    values = [base, poisoned, healed]
    if any(v is None or not math.isfinite(v) for v in values):
        return {"ratio": None, "reason": "a metric value is missing or not finite", "shift": None, "noise": noise}
    shift = poisoned - base
    floor = max(float(noise), 1e-9 * (1.0 + abs(base)))
    if abs(shift) <= floor:
        return {
            "ratio": None,
            "reason": f"poisoning moved the metric by {shift:.4g}, within the noise {floor:.4g}: nothing to heal",
            "shift": shift,
            "noise": float(noise),
        }
    return {"ratio": (poisoned - healed) / shift, "reason": None, "shift": shift, "noise": float(noise)}
