"""The invisible-watermark DWT-DCT tagger and the scan of folders for public models' known tags.

Stable Diffusion v1 writes "StableDiffusionV1" and SDXL the 48 bits ``0xB3EC907BB19E`` with the
``invisible-watermark`` package's DWT-DCT scheme (docs/background.md section 5). Colour images of at least
256x256 only; the tag lives in the U chrominance channel, so grey conversion erases it, and resizing or cropping
breaks its block grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.perturb import check_images
from diffaudit.guards.tagging import Tagger

# ---- the DWT-DCT tagger ------------------------------------------------------------------------

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


#: Tags written by public models (docs/background.md section 5).
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
