"""Tagging generated images so that they can be recognised later (docs/background.md section 5).

A :class:`Tagger` embeds an invisible tag in ``uint8`` images ``(N, C, H, W)`` and scores images for it
(higher means more likely tagged). A score means nothing without its false-positive rate, so detection
always goes through a threshold calibrated on untagged images (:meth:`Tagger.calibrate`), and
:func:`evaluate_tagger` reports TPR at that threshold and the realised FPR on fresh untagged images, clean
and after perturbations, with the PSNR cost of the tag.

Taggers:

- ``spread-spectrum``: a keyed +-1 pattern added to every channel; detected by correlating the image's
  high-pass residual with the pattern's. Works at any size (8x8 upwards, though 8x8 needs a visible
  amplitude); resizing and cropping misalign the pattern and erase it. See docs/tagging.md for numbers.
- ``dwtdct``: the ``invisible-watermark`` package's DWT-DCT scheme, as Stable Diffusion v1
  ("StableDiffusionV1") and SDXL (48 bits ``0xB3EC907BB19E``) use it, with the scan of folders for those
  public tags: :mod:`diffaudit.guards.tags_dwt`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from scipy.ndimage import uniform_filter

from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.perturb import DEFAULT_PERTURBATIONS, Perturbation, check_images

# Result keys of evaluate_tagger, as constants so that a typo is an error rather than a new key.
KEY_TAGGER = "tagger"
KEY_PARAMS = "params"
KEY_TARGET_FPR = "target_fpr"
KEY_THRESHOLD = "threshold"
KEY_NUM_CALIBRATION = "num_calibration"
KEY_NUM_EVALUATION = "num_evaluation"
KEY_IMAGE_SHAPE = "image_shape"
KEY_PSNR_MEAN = "psnr_mean"
KEY_PSNR_MIN = "psnr_min"
KEY_FID_CHANGE = "fid_change"  # filled in by the metrics stage; the tagger cannot compute FID itself
KEY_CLEAN = "clean"
KEY_PERTURBED = "perturbed"
KEY_TPR = "tpr"
KEY_FPR = "fpr"
KEY_TPR_RECALIBRATED = "tpr_recalibrated"
KEY_THRESHOLD_RECALIBRATED = "threshold_recalibrated"


def psnr(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between ``uint8`` ``(N, C, H, W)`` arrays (``inf`` where they are identical)."""
    diff = reference.astype(np.float64) - images.astype(np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-300)), np.inf)


class Tagger(ABC):
    """Embeds a tag in images and scores images for it.

    Subclasses set :attr:`name` and implement :meth:`embed` and :meth:`score`; calibration and detection are
    shared so that every tagger is judged by the same rule: tagged when ``score > threshold``.
    """

    name: ClassVar[str]

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Tagged copies of ``uint8`` images ``(N, C, H, W)``; same dtype and shape."""

    @abstractmethod
    def score(self, images: np.ndarray) -> np.ndarray:
        """``float64`` ``(N,)`` evidence of the tag in ``uint8`` ``(N, C, H, W)``; higher = more likely."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The parameters that reproduce this tagger (recorded with every result)."""

    def calibrate(self, untagged_images: np.ndarray, target_fpr: float = 0.01) -> float:
        """Threshold such that at most ``target_fpr`` of ``untagged_images`` score above it.

        Needs at least ``ceil(1 / target_fpr)`` untagged images: with fewer, the empirical quantile cannot
        resolve the target rate and the realised FPR on fresh images would exceed it.
        """
        if not 0.0 < target_fpr < 1.0:
            raise ConfigError(f"target_fpr must be in (0, 1); got {target_fpr!r}")
        scores = np.sort(self.score(untagged_images))[::-1]
        needed = math.ceil(1.0 / target_fpr - 1e-9)
        if scores.size < needed:
            raise DataError(
                f"calibrating at target_fpr={target_fpr} needs at least {needed} untagged images; got {scores.size}"
            )
        # The (m+1)-th largest score: m = floor(fpr * n) untagged scores lie strictly above it (if no ties).
        allowed = math.floor(target_fpr * scores.size + 1e-9)
        return float(scores[allowed])

    def detect(self, images: np.ndarray, threshold: float) -> np.ndarray:
        """``bool`` ``(N,)``: ``score > threshold`` for ``uint8`` images ``(N, C, H, W)``."""
        return self.score(images) > threshold


# ---- spread spectrum ------------------------------------------------------------------------------------


def _residual(x: np.ndarray) -> np.ndarray:
    """High-pass residual of ``float64`` ``(..., H, W)``: the value minus its 3x3 local mean."""
    size = (1,) * (x.ndim - 2) + (3, 3)
    return x - uniform_filter(x, size=size, mode="reflect")


class SpreadSpectrumTagger(Tagger):
    """A keyed +-1 pattern of ``amplitude`` uint8 levels added to every channel (clipped to [0, 255]).

    The pattern for an ``H x W`` image comes from ``np.random.default_rng([key, H, W])``, so any image size
    has its own pattern and the key alone reproduces it. The same pattern goes into every channel: the tag
    then sits in luminance and survives grey conversion. The score is the normalized correlation between
    the 3x3 high-pass residual of the channel mean and that of the pattern; for an untagged image it is
    about ``N(0, 1/(H W))`` (wider on natural images, whose residuals are correlated), which is why the
    threshold is calibrated rather than assumed.
    """

    name: ClassVar[str] = "spread-spectrum"
    #: Default strength in uint8 levels, chosen by benchmarks/bench_tagging.py (docs/tagging.md): PSNR about
    #: 38.7 dB, TPR at 1% FPR 0.99 at 32x32 and 1.0 at 256x256. 8x8 images need far more (see the docs).
    DEFAULT_AMPLITUDE: ClassVar[float] = 3.0

    def __init__(self, key: int = 0, amplitude: float = DEFAULT_AMPLITUDE) -> None:
        if not isinstance(key, int | np.integer) or isinstance(key, bool) or key < 0:
            raise ConfigError(f"spread-spectrum key must be a non-negative integer; got {key!r}")
        if not (isinstance(amplitude, int | float) and 0 < amplitude <= 128):
            raise ConfigError(f"spread-spectrum amplitude must be in (0, 128] levels; got {amplitude!r}")
        self.key = int(key)
        self.amplitude = float(amplitude)

    @property
    def params(self) -> dict[str, Any]:
        return {"key": self.key, "amplitude": self.amplitude}

    def pattern(self, height: int, width: int) -> np.ndarray:
        """The ``float64`` +-1 pattern ``(H, W)`` for images of this size."""
        rng = np.random.default_rng([self.key, int(height), int(width)])
        return rng.integers(0, 2, size=(height, width)).astype(np.float64) * 2.0 - 1.0

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Tagged ``uint8`` copies ``(N, C, H, W)``: ``clip(round(x + amplitude * pattern))``."""
        check_images(images)
        pat = self.pattern(*images.shape[2:])
        tagged = images.astype(np.float64) + self.amplitude * pat
        return np.clip(np.rint(tagged), 0, 255).astype(np.uint8)

    def score(self, images: np.ndarray) -> np.ndarray:
        """``float64`` ``(N,)`` normalized correlation in [-1, 1] (0 for a flat image)."""
        check_images(images)
        n = images.shape[0]
        res = _residual(images.astype(np.float64).mean(axis=1)).reshape(n, -1)
        pat = _residual(self.pattern(*images.shape[2:])).reshape(-1)
        res -= res.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(res, axis=1) * np.linalg.norm(pat)
        dots = res @ pat
        return np.divide(dots, norms, out=np.zeros(n), where=norms > 0)


# ---- registry -------------------------------------------------------------------------------------------

#: Tagger names; ``dwtdct`` lives in :mod:`diffaudit.guards.tags_dwt` (it needs the invisible-watermark extra).
TAGGER_NAMES = ("spread-spectrum", "dwtdct")


def get_tagger(name: str, **params: Any) -> Tagger:
    """The tagger registered as ``name``, built with ``params``; ConfigError for unknown names or params."""
    from diffaudit.guards.tags_dwt import DwtDctTagger

    taggers: dict[str, type[Tagger]] = {
        SpreadSpectrumTagger.name: SpreadSpectrumTagger,
        DwtDctTagger.name: DwtDctTagger,
    }
    try:
        cls = taggers[name]
    except KeyError:
        raise ConfigError(f"unknown tagger {name!r}; known: {sorted(taggers)}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"tagger {name!r}: bad parameters {sorted(params)} ({exc})") from None


# ---- evaluation -----------------------------------------------------------------------------------------


def _rates(tagger: Tagger, tagged: np.ndarray, untagged: np.ndarray, threshold: float) -> tuple[float, float]:
    return float(tagger.detect(tagged, threshold).mean()), float(tagger.detect(untagged, threshold).mean())


def evaluate_tagger(
    tagger: Tagger,
    clean_images: np.ndarray,
    target_fpr: float = 0.01,
    perturbations: Sequence[Perturbation] = DEFAULT_PERTURBATIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """TPR at a calibrated FPR, clean and perturbed, and the PSNR cost of ``tagger`` on ``clean_images``.

    ``clean_images`` (``uint8`` ``(N, C, H, W)``, untagged) are split at random (``seed``) into a calibration
    half, which sets the threshold at ``target_fpr``, and an evaluation half, which is tagged. TPR is measured
    on the tagged evaluation half and the realised FPR on the same images untagged, so the two differ only by
    the tag. Each perturbation is applied to both (seeded) before scoring; its entry gives TPR and FPR at the
    clean threshold (a detector deployed once) and TPR at a threshold recalibrated on perturbed untagged
    images (a detector that knows the perturbation).

    Returns a dict keyed by the ``KEY_*`` constants of this module; ``fid_change`` is None, for the metrics
    stage to fill in.
    """
    check_images(clean_images)
    if not isinstance(perturbations, Sequence) or not all(isinstance(p, Perturbation) for p in perturbations):
        raise ConfigError("perturbations must be a sequence of diffaudit.guards.perturb.Perturbation")
    n = clean_images.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    calib, evaluation = clean_images[order[: n // 2]], clean_images[order[n // 2 :]]
    threshold = tagger.calibrate(calib, target_fpr)
    tagged = tagger.embed(evaluation)
    quality = psnr(evaluation, tagged)
    tpr, fpr = _rates(tagger, tagged, evaluation, threshold)
    result: dict[str, Any] = {
        KEY_TAGGER: tagger.name,
        KEY_PARAMS: tagger.params,
        KEY_IMAGE_SHAPE: list(clean_images.shape[1:]),
        KEY_TARGET_FPR: target_fpr,
        KEY_NUM_CALIBRATION: int(calib.shape[0]),
        KEY_NUM_EVALUATION: int(evaluation.shape[0]),
        KEY_THRESHOLD: threshold,
        KEY_PSNR_MEAN: float(quality.mean()),
        KEY_PSNR_MIN: float(quality.min()),
        KEY_FID_CHANGE: None,
        KEY_CLEAN: {KEY_TPR: tpr, KEY_FPR: fpr},
        KEY_PERTURBED: {},
    }
    for k, perturbation in enumerate(perturbations):
        # Tagged and untagged copies of an image get the same random perturbation (same seed and index).
        p_seed = seed * 1000 + k
        p_tagged, p_untagged = perturbation(tagged, p_seed), perturbation(evaluation, p_seed)
        p_tpr, p_fpr = _rates(tagger, p_tagged, p_untagged, threshold)
        p_threshold = tagger.calibrate(perturbation(calib, p_seed + 500), target_fpr)
        result[KEY_PERTURBED][perturbation.label] = {
            KEY_TPR: p_tpr,
            KEY_FPR: p_fpr,
            KEY_TPR_RECALIBRATED: float(tagger.detect(p_tagged, p_threshold).mean()),
            KEY_THRESHOLD_RECALIBRATED: p_threshold,
        }
    return result
