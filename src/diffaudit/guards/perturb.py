"""Image perturbations that a tag must survive: noise, JPEG, resizing, cropping, grey conversion.

Every perturbation maps ``uint8`` images ``(N, C, H, W)`` (C in {1, 3}) to ``uint8`` images of the same
shape, so a detector sees what a re-shared image looks like without any bookkeeping about sizes. Random
choices (noise, crop offsets) come from ``np.random.default_rng([seed, i])`` for image ``i``: the result for
one image never depends on the batch it was processed in.

Parameters are in the units of the image: noise ``sigma`` in uint8 levels, JPEG ``quality`` 1-95, resize
``factor`` in (0, 1], crop ``fraction`` of each side length removed in total, in [0, 1).
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffaudit.errors import ConfigError, DataError

PerturbFn = Callable[..., np.ndarray]


def check_images(images: np.ndarray) -> np.ndarray:
    """Return ``images`` if it is ``uint8`` ``(N, C, H, W)`` with C in {1, 3}; raise DataError otherwise."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f"images must be a uint8 array (N, C, H, W); got "
            f"{getattr(images, 'dtype', type(images).__name__)} with shape {getattr(images, 'shape', None)}"
        )
    if images.shape[1] not in (1, 3):
        raise DataError(f"images must have 1 or 3 channels; got shape {images.shape}")
    return images


def _to_pil(image: np.ndarray) -> Image.Image:
    """One ``uint8`` ``(C, H, W)`` image as a Pillow image ("L" or "RGB")."""
    if image.shape[0] == 1:
        return Image.fromarray(image[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(pil, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def gaussian_noise(images: np.ndarray, sigma: float = 2.0, seed: int = 0) -> np.ndarray:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` uint8 levels, round and clip."""
    check_images(images)
    if not sigma >= 0:
        raise ConfigError(f"gaussian_noise sigma must be >= 0 uint8 levels; got {sigma!r}")
    out = np.empty_like(images)
    for i, img in enumerate(images):
        rng = np.random.default_rng([seed, i])
        noisy = img.astype(np.float64) + rng.normal(0.0, sigma, size=img.shape)
        out[i] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def jpeg(images: np.ndarray, quality: int = 75, seed: int = 0) -> np.ndarray:
    """Encode and decode each image as JPEG at ``quality`` (Pillow; grey stays grey). ``seed`` is unused."""
    check_images(images)
    if not 1 <= quality <= 95:
        raise ConfigError(f"jpeg quality must be in [1, 95]; got {quality!r}")
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        _to_pil(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = _from_pil(decoded.convert("L" if img.shape[0] == 1 else "RGB"), img.shape[0])
    return out


def resize(images: np.ndarray, factor: float = 0.5, seed: int = 0) -> np.ndarray:
    """Shrink each side by ``factor`` (at least 1 pixel) and scale back up, bilinear. ``seed`` is unused."""
    check_images(images)
    if not 0.0 < factor <= 1.0:
        raise ConfigError(f"resize factor must be in (0, 1]; got {factor!r}")
    n, c, h, w = images.shape
    small = (max(1, round(w * factor)), max(1, round(h * factor)))  # Pillow sizes are (width, height)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        pil = _to_pil(img).resize(small, Image.Resampling.BILINEAR)
        out[i] = _from_pil(pil.resize((w, h), Image.Resampling.BILINEAR), c)
    return out


def crop(images: np.ndarray, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Cut away ``fraction`` of each side length at a random offset, then resize back (bilinear).

    At least one pixel is cut from each side length when ``fraction > 0``, so that a small image (8x8) is
    really cropped rather than left untouched by rounding.
    """
    check_images(images)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"crop fraction must be in [0, 1); got {fraction!r}")
    n, c, h, w = images.shape
    cut_h = min(h - 1, max(1, round(h * fraction))) if fraction > 0 else 0
    cut_w = min(w - 1, max(1, round(w * fraction))) if fraction > 0 else 0
    out = np.empty_like(images)
    for i, img in enumerate(images):
        rng = np.random.default_rng([seed, i])
        top, left = int(rng.integers(0, cut_h + 1)), int(rng.integers(0, cut_w + 1))
        part = np.ascontiguousarray(img[:, top : top + h - cut_h, left : left + w - cut_w])
        out[i] = _from_pil(_to_pil(part).resize((w, h), Image.Resampling.BILINEAR), c)
    return out


def greyscale(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Replace colour by its luminance (ITU-R 601, as Pillow's "L") in all 3 channels; grey is unchanged."""
    check_images(images)
    if images.shape[1] == 1:
        return images.copy()
    weights = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    luma = np.clip(np.rint((images * weights).sum(axis=1, keepdims=True)), 0, 255).astype(np.uint8)
    return np.repeat(luma, 3, axis=1)


#: Registry of perturbations by name; each takes ``(images, **params, seed=...)``.
PERTURBATIONS: dict[str, PerturbFn] = {
    "gaussian_noise": gaussian_noise,
    "jpeg": jpeg,
    "resize": resize,
    "crop": crop,
    "greyscale": greyscale,
}


def get_perturbation(name: str) -> PerturbFn:
    """The perturbation registered as ``name``; ConfigError listing the known names otherwise."""
    try:
        return PERTURBATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown perturbation {name!r}; known: {sorted(PERTURBATIONS)}") from None


@dataclass(frozen=True)
class Perturbation:
    """A named perturbation with its parameters, e.g. ``Perturbation("jpeg", {"quality": 75})``."""

    name: str
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fn = get_perturbation(self.name)
        allowed = set(inspect.signature(fn).parameters) - {"images", "seed"}
        unknown = set(self.params) - allowed
        if unknown:
            raise ConfigError(
                f"perturbation {self.name!r} has no parameter(s) {sorted(unknown)}; known: {sorted(allowed)}"
            )

    @property
    def label(self) -> str:
        """Short name for reports: ``jpeg_quality=75``."""
        return "_".join([self.name, *(f"{k}={v:g}" for k, v in sorted(self.params.items()))])

    def __call__(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """Apply to ``uint8`` ``(N, C, H, W)``; returns ``uint8`` of the same shape."""
        return get_perturbation(self.name)(images, seed=seed, **self.params)


def parse_perturbation(spec: str) -> Perturbation:
    """Parse ``"name"`` or ``"name:key=value,key=value"`` (values are numbers), e.g. ``"jpeg:quality=75"``."""
    name, _, rest = spec.partition(":")
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"perturbation spec {spec!r}: expected key=value, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"perturbation spec {spec!r}: value {value!r} is not a number") from None
        params[key.strip()] = int(number) if number.is_integer() and key.strip() == "quality" else number
    return Perturbation(name.strip(), params)


#: What :func:`diffaudit.guards.tagging.evaluate_tagger` applies unless told otherwise.
DEFAULT_PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("gaussian_noise", {"sigma": 2.0}),
    Perturbation("jpeg", {"quality": 90}),
    Perturbation("jpeg", {"quality": 75}),
    Perturbation("resize", {"factor": 0.5}),
    Perturbation("crop", {"fraction": 0.1}),
    Perturbation("greyscale"),
)
