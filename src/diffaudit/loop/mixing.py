"""Building one generation's training set from real data and earlier generations' samples (a pure function).

Vocabulary (see docs/loop.md and docs/background.md sections 2-3). Generation 0 trains on ``train_size`` real
images. Model ``k`` produces the synthetic pool ``S_k``. Generation ``g >= 1`` trains on:

* ``replace``: ``n_real`` images of the fixed real subset + ``n_syn`` images of ``S_{g-1}`` (Bohacek & Farid's
  retraining; MAD's "synthetic augmentation" loop; Gerstgrasser's *replace* when ``n_real = 0``);
* ``accumulate``: the whole fixed real subset (``train_size`` images) + ``n_syn`` images of *every* earlier pool
  ``S_0 .. S_{g-1}``: the set grows by ``n_syn`` per generation (Gerstgrasser's *accumulate*);
* ``fresh``: ``n_real`` images drawn anew from the real pool at every generation + ``n_syn`` of ``S_{g-1}``
  (MAD's "fresh data" loop);
* ``fully-synthetic``: ``train_size`` images of ``S_{g-1}`` only (MAD's fully synthetic loop; the share is ignored;
  with held-out classes the set holds no image of them at all, real or synthetic).

with ``n_syn`` = ``synthetic_count`` when given, else ``round(synthetic_share * train_size)``, and
``n_real = train_size - n_syn``. Only synthetic images whose label is a *retrained* class (not held out) are
eligible; held-out classes are still trained on real images, unless ``heldout_real=False`` removes them from the
real data of poisoning generations too (the "forgetting" control: with no synthetic data it measures what
leaving those classes out does by itself). Every choice comes from a generator seeded by
``(seed, generation)``, so the mix is a function of its arguments only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError

REPLACE = "replace"
ACCUMULATE = "accumulate"
FRESH = "fresh"
FULLY_SYNTHETIC = "fully-synthetic"
MODES = (REPLACE, ACCUMULATE, FRESH, FULLY_SYNTHETIC)


@dataclass(frozen=True)
class MixSpec:
    """How much synthetic data enters a generation: a fraction of ``train_size`` or an exact count."""

    mode: str = REPLACE
    train_size: int = 900
    synthetic_share: float | None = 0.033
    synthetic_count: int | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"loop mode {self.mode!r} is not one of {list(MODES)}")
        if not isinstance(self.train_size, int) or self.train_size < 1:
            raise ConfigError(f"train_size={self.train_size!r} must be a positive integer")
        if (self.synthetic_share is None) == (self.synthetic_count is None):
            raise ConfigError("give exactly one of synthetic_share and synthetic_count")
        if self.synthetic_share is not None and not 0.0 <= float(self.synthetic_share) <= 1.0:
            raise ConfigError(f"synthetic_share={self.synthetic_share!r} must be in [0, 1]")
        if self.synthetic_count is not None and not 0 <= int(self.synthetic_count) <= self.train_size:
            raise ConfigError(f"synthetic_count={self.synthetic_count!r} must be in [0, train_size={self.train_size}]")

    @property
    def num_synthetic(self) -> int:
        """Synthetic images per generation (all of ``train_size`` in ``fully-synthetic`` mode)."""
        self.validate()
        if self.mode == FULLY_SYNTHETIC:
            return self.train_size
        if self.synthetic_count is not None:
            return int(self.synthetic_count)
        return int(round(float(self.synthetic_share) * self.train_size))

    @property
    def num_real(self) -> int:
        return self.train_size - self.num_synthetic


def _rng(seed: int, generation: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(generation), stream])


def real_subset(real: ImageSet, train_size: int, seed: int, generation: int = 0, fresh: bool = False) -> ImageSet:
    """``train_size`` images of ``real``: a fixed seeded subset, or (``fresh``) a new one per generation."""
    if train_size > len(real):
        raise DataError(f"train_size={train_size} exceeds the {len(real)} real images available")
    rng = _rng(seed, generation if fresh else 0, 0)
    return real.subset(np.sort(rng.choice(len(real), train_size, replace=False)))


def eligible(pool: ImageSet, holdout_classes: Sequence[int]) -> ImageSet:
    """The images of ``pool`` whose label is not held out (held-out classes never receive synthetic data)."""
    if not len(holdout_classes):
        return pool
    return pool.subset(~np.isin(pool.labels, np.asarray(list(holdout_classes), dtype=np.int64)))


def _take(pool: ImageSet, n: int, rng: np.random.Generator, what: str) -> ImageSet:
    if n > len(pool):
        raise ConfigError(f"{what}: need {n} synthetic images but only {len(pool)} are eligible; sample more")
    return pool.subset(np.sort(rng.choice(len(pool), n, replace=False)))


def mix_generation(
    real: ImageSet,
    pools: Sequence[ImageSet],
    spec: MixSpec,
    generation: int,
    seed: int,
    holdout_classes: Sequence[int] = (),
    synthetic: bool = True,
    heldout_real: bool = True,
) -> ImageSet:
    """The training set of ``generation``, as an ImageSet whose provenance says which images are synthetic.

    Args:
        real: the real pool, ``uint8 (N, C, H, W)`` with labels; real provenance (``synthetic`` False).
        pools: ``pools[k]`` = samples of model ``k`` (``S_k``, provenance ``synthetic`` True, ``generation`` k,
            ``seed``); must hold at least ``generation`` pools when ``synthetic`` is True.
        spec: mode, size and synthetic share or count.
        generation: index ``g`` of the model being trained (0 = real only).
        seed: experiment seed; the choice of images depends only on ``(seed, generation)``.
        holdout_classes: labels that never receive synthetic images.
        synthetic: False for generation 0 and the healing generations: real data only (``n_syn = 0``).
        heldout_real: False drops the held-out classes' real images in poisoning generations (``synthetic``
            True): the real part is then drawn from the retrained classes only.

    Returns:
        The mixed set, real images first then synthetic ones in generation order.
    """
    spec.validate()
    if generation == 0 or not synthetic:
        return real_subset(real, spec.train_size, seed, generation, fresh=spec.mode == FRESH)
    if len(pools) < generation:
        raise ConfigError(f"generation {generation} needs the samples of generation {generation - 1}")
    if not heldout_real:
        if not len(holdout_classes):
            raise ConfigError("heldout_real=False needs holdout_classes (which classes to leave out)")
        real = eligible(real, holdout_classes)
    n_syn = spec.num_synthetic
    rng = _rng(seed, generation, 1)
    if spec.mode == FULLY_SYNTHETIC:
        return _take(eligible(pools[generation - 1], holdout_classes), n_syn, rng, f"generation {generation}")
    if spec.mode == ACCUMULATE:
        parts = [real_subset(real, spec.train_size, seed)]
        for k in range(generation):
            # Each earlier pool contributes the images it contributed when it was new: rng seeded by (seed, k+1).
            parts.append(_take(eligible(pools[k], holdout_classes), n_syn, _rng(seed, k + 1, 1), f"pool {k}"))
        return ImageSet.concat(parts)
    base = real_subset(real, spec.train_size, seed, generation, fresh=spec.mode == FRESH)
    kept_real = base.subset(np.sort(_rng(seed, generation, 2).choice(len(base), spec.num_real, replace=False)))
    syn = _take(eligible(pools[generation - 1], holdout_classes), n_syn, rng, f"generation {generation}")
    return ImageSet.concat([kept_real, syn])


def mix_summary(mixed: ImageSet, holdout_classes: Sequence[int] = ()) -> dict[str, object]:
    """Counts for the metrics row: total, synthetic, per source generation, synthetic in held-out classes."""
    syn = mixed.provenance["synthetic"]
    gens = mixed.provenance["generation"][syn]
    held = np.isin(mixed.labels, np.asarray(list(holdout_classes), dtype=np.int64)) if len(holdout_classes) else 0
    return {
        "train_images": len(mixed),
        "train_synthetic": int(syn.sum()),
        "train_synthetic_share": float(syn.mean()) if len(mixed) else 0.0,
        "train_synthetic_by_generation": {str(int(g)): int((gens == g).sum()) for g in np.unique(gens)},
        "train_synthetic_heldout": int((syn & held).sum()) if len(holdout_classes) else 0,
    }


def img2img_split(
    real: ImageSet,
    spec: MixSpec,
    generation: int,
    seed: int,
    holdout_classes: Sequence[int] = (),
    heldout_real: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """For image-to-image mixing: ``(kept real images, real images to re-render)`` of a poisoning generation.

    The training set is the generation's real subset (fixed, or drawn anew in ``fresh`` mode) in which exactly
    ``n_syn`` images of retrained classes are replaced by re-renderings of themselves (``fully-synthetic``: all
    of them, drawn from the retrained classes only), so the synthetic share is exact. ``accumulate`` keeps every
    real image (``kept`` is the whole subset) and adds the re-renderings. Seeded by
    ``(seed, generation)``: a pure function of its arguments.
    """
    spec.validate()
    if not heldout_real:
        if not len(holdout_classes):
            raise ConfigError("heldout_real=False needs holdout_classes (which classes to leave out)")
        real = eligible(real, holdout_classes)
    if spec.mode == FULLY_SYNTHETIC:
        real = eligible(real, holdout_classes)
    base = real_subset(real, spec.train_size, seed, generation, fresh=spec.mode == FRESH)
    n_syn = spec.num_synthetic
    candidates = np.arange(len(base))
    if len(holdout_classes):
        candidates = np.flatnonzero(~np.isin(base.labels, np.asarray(list(holdout_classes), dtype=np.int64)))
    if n_syn > candidates.size:
        raise ConfigError(
            f"generation {generation}: need {n_syn} real images of retrained classes to re-render, "
            f"the training subset holds {candidates.size}"
        )
    chosen = np.sort(_rng(seed, generation, 3).choice(candidates, n_syn, replace=False))
    # accumulate keeps every real image: the re-renderings come on top (and stay in later generations).
    kept = np.arange(len(base)) if spec.mode == ACCUMULATE else np.setdiff1d(np.arange(len(base)), chosen)
    return base.subset(kept), base.subset(chosen)
