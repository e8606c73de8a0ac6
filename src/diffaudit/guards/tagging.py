"""Tagging generated images so that they can be recognised later (RESEARCH.md section 5).

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
  ("StableDiffusionV1") and SDXL (48 bits ``0xB3EC907BB19E``) use it. Colour images of at least 256x256
  only; it lives in the U chrominance channel, so grey conversion erases it, and resizing or cropping
  breaks its block grid.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
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


# ---- invisible-watermark DWT-DCT ------------------------------------------------------------------------

DWT_METHODS = ("dwtDct", "dwtDctSvd")
#: Smallest side the dwtDct taggers accept (invisible-watermark refuses fewer than 256*256 pixels).
DWT_MIN_SIDE = 256


@dataclass(frozen=True)
class KnownTag:
    """A tag written by a public model: its message bits and the invisible-watermark method."""

    name: str
    bits: tuple[int, ...]
    method: str
    description: str


def _bytes_to_bits(message: bytes) -> tuple[int, ...]:
    return tuple(int(b) for b in np.unpackbits(np.frombuffer(message, dtype=np.uint8)))


#: Tags written by public models (RESEARCH.md section 5).
KNOWN_TAGS: dict[str, KnownTag] = {
    "sd-v1": KnownTag(
        "sd-v1", _bytes_to_bits(b"StableDiffusionV1"), "dwtDct", 'Stable Diffusion v1: "StableDiffusionV1"'
    ),
    # As SDXL writes it: the bits of the integer, most significant first (48 bits, the first one is 1).
    "sdxl": KnownTag("sdxl", tuple(int(b) for b in bin(0xB3EC907BB19E)[2:]), "dwtDct", "SDXL: 48 bits 0xB3EC907BB19E"),
}


def _check_dwt_images(images: np.ndarray) -> np.ndarray:
    check_images(images)
    _, c, h, w = images.shape
    if c != 3:
        raise ConfigError(
            f"dwtdct tags live in the colour (chrominance) channels; got {c}-channel images of {h}x{w} "
            "(use spread-spectrum for grey images)"
        )
    if h < DWT_MIN_SIDE or w < DWT_MIN_SIDE:
        raise ConfigError(
            f"dwtdct needs images of at least {DWT_MIN_SIDE}x{DWT_MIN_SIDE}; got {h}x{w} "
            "(use spread-spectrum for small images)"
        )
    return images


def _rgb_chw_to_bgr_hwc(image: np.ndarray) -> np.ndarray:
    # invisible-watermark follows OpenCV: H x W x C with channels in BGR order.
    return np.ascontiguousarray(image.transpose(1, 2, 0)[:, :, ::-1])


def _bgr_hwc_to_rgb_chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))


class DwtDctTagger(Tagger):
    """The ``invisible-watermark`` DWT-DCT watermark with a fixed message; score = fraction of matching bits.

    ``preset`` is a name in :data:`KNOWN_TAGS` (its bits and method), or ``"custom"`` with ``message`` bytes
    and ``method`` (``dwtDct`` or ``dwtDctSvd``). Images are RGB ``uint8`` ``(N, 3, H, W)`` with H, W >= 256.
    """

    name: ClassVar[str] = "dwtdct"

    def __init__(self, preset: str = "sd-v1", message: bytes = b"", method: str = "dwtDct") -> None:
        if preset == "custom":
            if not isinstance(message, bytes) or not message:
                raise ConfigError("dwtdct preset 'custom' needs a non-empty bytes message")
            bits = _bytes_to_bits(message)
        elif preset in KNOWN_TAGS:
            if message:
                raise ConfigError(f"dwtdct preset {preset!r} has a fixed message; use preset='custom'")
            bits = KNOWN_TAGS[preset].bits
            method = KNOWN_TAGS[preset].method
        else:
            raise ConfigError(f"unknown dwtdct preset {preset!r}; known: {[*KNOWN_TAGS, 'custom']}")
        if method not in DWT_METHODS:
            raise ConfigError(f"unknown dwtdct method {method!r}; known: {list(DWT_METHODS)}")
        self.preset = preset
        self.message = message
        self.method = method
        self.bits = np.asarray(bits, dtype=bool)

    @property
    def params(self) -> dict[str, Any]:
        return {"preset": self.preset, "message": self.message.hex(), "method": self.method}

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Watermarked RGB ``uint8`` copies ``(N, 3, H, W)``."""
        WatermarkEncoder, _ = _imwatermark()
        _check_dwt_images(images)
        encoder = WatermarkEncoder()
        encoder.set_watermark("bits", self.bits.astype(int).tolist())
        out = np.empty_like(images)
        for i, img in enumerate(images):
            out[i] = _bgr_hwc_to_rgb_chw(encoder.encode(_rgb_chw_to_bgr_hwc(img), self.method))
        return out

    def decode_bits(self, images: np.ndarray) -> np.ndarray:
        """``bool`` ``(N, L)``: the L message bits read back from RGB ``uint8`` images ``(N, 3, H, W)``."""
        _check_dwt_images(images)
        return decode_dwt_bits(images, len(self.bits), self.method)

    def score(self, images: np.ndarray) -> np.ndarray:
        """``float64`` ``(N,)`` bit accuracy: fraction of decoded bits equal to the message."""
        return (self.decode_bits(images) == self.bits).mean(axis=1).astype(np.float64)


def _imwatermark() -> tuple[Any, Any]:
    """The invisible-watermark encoder and decoder classes, or a ConfigError saying how to install them."""
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError as exc:
        raise ConfigError(
            "the dwtdct tagger needs the invisible-watermark package: pip install 'diffaudit[watermark]'"
        ) from exc
    return WatermarkEncoder, WatermarkDecoder


def decode_dwt_bits(images: np.ndarray, length: int, method: str = "dwtDct") -> np.ndarray:
    """``bool`` ``(N, length)`` bits decoded by invisible-watermark from RGB ``uint8`` ``(N, 3, H, W)``."""
    _, WatermarkDecoder = _imwatermark()
    decoder = WatermarkDecoder("bits", length)
    decoded = [decoder.decode(_rgb_chw_to_bgr_hwc(img), method) for img in images]
    return np.asarray(decoded, dtype=bool).reshape(len(images), length)


@dataclass(frozen=True)
class KnownTagMatch:
    """Which known tag (if any) one image carries.

    Attributes:
        source: file name, or ``"#i"`` for the i-th image of an array.
        tag: name in :data:`KNOWN_TAGS` of the best-matching tag, or ``""`` when none passes its threshold.
        bit_accuracy: fraction of matching bits for every known tag (empty when the image could not be read).
        note: why an image was skipped (grey, too small, unreadable); ``""`` otherwise.
    """

    source: str
    tag: str
    bit_accuracy: dict[str, float]
    note: str = ""


#: Default chance that random bits would pass as a known tag in detect_known_tags.
KNOWN_TAG_FALSE_ALARM = 1e-6


def min_bit_accuracy(num_bits: int, false_alarm: float = KNOWN_TAG_FALSE_ALARM) -> float:
    """Smallest bit accuracy that ``num_bits`` fair coin flips reach with probability <= ``false_alarm``.

    With the 1e-6 default: 96/136 = 0.706 for SD v1 and 41/48 = 0.854 for SDXL. Untagged natural images are
    not fair coins (flat ones decode to near-constant bits), but their measured maximum stays well below
    (docs/tagging.md); a collection of unusual images deserves its own calibration (evaluate_tagger).
    """
    from scipy.stats import binom

    if not 0.0 < false_alarm < 1.0:
        raise ConfigError(f"false_alarm must be in (0, 1); got {false_alarm!r}")
    # P(X >= k) = binom.sf(k - 1); the first k whose tail is small enough.
    tails = binom.sf(np.arange(num_bits + 1) - 1, num_bits, 0.5)
    return float(np.flatnonzero(tails <= false_alarm)[0] / num_bits) if (tails <= false_alarm).any() else 1.0


def _read_folder(folder: Path) -> Iterable[tuple[str, np.ndarray | None, str]]:
    # The shared folder reader's guards (symlinks out of the folder, loops, bombs, non-PNG/JPEG bytes) apply;
    # a refused file is reported with its reason instead of stopping the scan.
    from diffaudit.data.folder import open_image, scan_folder

    for path in scan_folder(folder, images_only=False):
        try:
            pil = open_image(path, folder)
        except DataError as exc:
            yield path.name, None, f"not a readable image ({str(exc).removeprefix(f'{path}: ')})"
            continue
        with pil:
            if pil.mode not in ("RGB", "RGBA", "P"):
                yield path.name, None, f"mode {pil.mode} is not colour"
                continue
            arr = np.asarray(pil.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        yield path.name, arr, ""


def detect_known_tags(
    folder_or_images: str | Path | np.ndarray, false_alarm: float = KNOWN_TAG_FALSE_ALARM
) -> list[KnownTagMatch]:
    """Look for the Stable Diffusion v1 and SDXL watermarks in a folder of images or an RGB array.

    Args:
        folder_or_images: a directory (every readable file in it, sorted by name; images may differ in size),
            or RGB ``uint8`` ``(N, 3, H, W)`` with H, W >= 256.
        false_alarm: a tag is reported when its bit accuracy is one that random bits reach with at most this
            probability (:func:`min_bit_accuracy`); the best tag among those passing is named.

    Returns one :class:`KnownTagMatch` per image. In a folder, grey, small or unreadable files are reported
    with a ``note`` and no tag rather than stopping the scan; an array of the wrong shape raises ConfigError.
    """
    if isinstance(folder_or_images, np.ndarray):
        _check_dwt_images(folder_or_images)
        items: Iterable[tuple[str, np.ndarray | None, str]] = (
            (f"#{i}", img, "") for i, img in enumerate(folder_or_images)
        )
    else:
        folder = Path(folder_or_images)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a directory of images")
        items = _read_folder(folder)
    thresholds = {name: min_bit_accuracy(len(tag.bits), false_alarm) for name, tag in KNOWN_TAGS.items()}
    results: list[KnownTagMatch] = []
    for source, image, note in items:
        if image is not None and min(image.shape[1:]) < DWT_MIN_SIDE:
            size = f"{image.shape[1]}x{image.shape[2]}"
            image, note = None, f"{size} is smaller than {DWT_MIN_SIDE}x{DWT_MIN_SIDE}"
        if image is None:
            results.append(KnownTagMatch(source, "", {}, note))
            continue
        accuracy = {}
        for tag in KNOWN_TAGS.values():
            bits = decode_dwt_bits(image[None], len(tag.bits), tag.method)[0]
            accuracy[tag.name] = float((bits == np.asarray(tag.bits, dtype=bool)).mean())
        passing = [name for name in accuracy if accuracy[name] >= thresholds[name]]
        best = max(passing, key=accuracy.__getitem__, default="")
        results.append(KnownTagMatch(source, best, accuracy))
    return results


# ---- registry -------------------------------------------------------------------------------------------

TAGGERS: dict[str, type[Tagger]] = {
    SpreadSpectrumTagger.name: SpreadSpectrumTagger,
    DwtDctTagger.name: DwtDctTagger,
}


def get_tagger(name: str, **params: Any) -> Tagger:
    """The tagger registered as ``name``, built with ``params``; ConfigError for unknown names or params."""
    try:
        cls = TAGGERS[name]
    except KeyError:
        raise ConfigError(f"unknown tagger {name!r}; known: {sorted(TAGGERS)}") from None
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
