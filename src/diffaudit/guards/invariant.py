"""Copy matching that survives resizing, cropping, flipping and small shifts (the ``robust`` copy-filter rule).

Pixel L2 to the nearest training image misses a copy that was cropped and resized back, flipped or shifted by a
pixel: every pixel moves. This module matches *crop-aligned*: each training image is expanded into a fixed set
of variants (mirror image; crops of a few sizes at a grid of offsets, resized back to full size as a re-shared
crop would be; shrunk and scaled back up, as a thumbnail would be; shifts by up to ``shift`` pixels), and every
image, query or variant, is mapped to a representation that absorbs what alignment cannot: a Gaussian blur
(resize and JPEG remove high frequencies, noise is mostly high-frequency), an area down-sampling to at most
``size`` pixels a side, and removal of the mean brightness. A query's robust distance is the normalised L2
(``sqrt(mean square)``, pixels in [0, 1]) to the nearest variant of any training image; the decision also names
the variant (``flip+crop0.2@2,0``).

The rule combines this with the index's exact pixel path, so that nothing the pixel filter caught is lost:
``score = min(d_pixel / s_pixel, d_robust / s_robust)`` with ``s`` the median held-out distance of each path,
and one split-conformal threshold on held-out real images (``score < T`` blocks), so the combined rule's
false-block rate is calibrated as a whole rather than doubled by two separate thresholds.

Memory: ``N * variants * D`` float32 (variants = 2 x (crops x offsets^2 x (1 + rescales) + shifts), D <=
C * size^2): the default 100 variants of 1,000 8x8 digits take 26 MB; 100,000 RGB images at size 16 would take
30 GB, so use fewer variants (or a subset) there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from diffaudit.distances import nearest_neighbors
from diffaudit.errors import ConfigError

ROBUST = "robust"


@dataclass(frozen=True)
class InvariantConfig:
    """Which variants of each training image are indexed, and the representation they are compared in.

    Attributes:
        flips: also index the mirror image (left-right).
        crop_fractions: share of each side length cut away (0 = the whole image); a crop is resized back.
        offsets: crop positions per axis, spread evenly over the possible offsets.
        shift: largest shift in pixels (edge-padded), each axis; 0 = none.
        rescales: also index every crop shrunk by these factors and scaled back up (what a re-shared thumbnail
            looks like; a blur alone cannot undo a 0.5 shrink of an 8x8 image).
        blur: Gaussian sigma in pixels applied to every image before comparison.
        size: largest side of the representation (area down-sampling).
    """

    flips: bool = True
    crop_fractions: tuple[float, ...] = (0.0, 0.1, 0.2)
    offsets: int = 3
    shift: int = 1
    rescales: tuple[float, ...] = (0.5, 0.75)
    blur: float = 0.7
    size: int = 16

    def __post_init__(self) -> None:
        if not self.crop_fractions or not all(0.0 <= f < 0.5 for f in self.crop_fractions):
            raise ConfigError(f"crop fractions must be in [0, 0.5); got {list(self.crop_fractions)}")
        if not all(0.0 < f < 1.0 for f in self.rescales):
            raise ConfigError(f"rescale factors must be in (0, 1); got {list(self.rescales)}")
        if self.offsets < 1 or self.shift < 0 or self.blur < 0 or self.size < 2:
            raise ConfigError(f"invalid invariant-match settings {asdict(self)}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "crop_fractions": list(self.crop_fractions), "rescales": list(self.rescales)}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> InvariantConfig:
        return InvariantConfig(
            **{**obj, "crop_fractions": tuple(obj["crop_fractions"]), "rescales": tuple(obj["rescales"])}
        )


def _resize(images: np.ndarray, h: int, w: int) -> np.ndarray:
    """``uint8 (N, C, h', w')`` -> ``uint8 (N, C, h, w)``: bilinear with anti-aliasing (close to Pillow's, which
    :mod:`~diffaudit.guards.perturb` uses), batched in torch because the index resizes every image ~100 times."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


Op = tuple[str, int, int, int, float]  # kind (crop | shift), cut, top/dy, left/dx, rescale factor (1 = none)


def _variant_ops(shape: tuple[int, int, int], cfg: InvariantConfig) -> list[tuple[str, Op]]:
    """Named variant operations: every crop (at every offset) also shrunk-and-restored by each rescale factor."""
    _, h, w = shape
    ops: list[tuple[str, Op]] = []
    for frac in cfg.crop_fractions:
        cut = 0 if frac == 0 else min(min(h, w) - 1, max(1, round(min(h, w) * frac)))
        positions = sorted({round(k * cut / max(cfg.offsets - 1, 1)) for k in range(cfg.offsets)}) if cut else [0]
        for top in positions:
            for left in positions:
                base = f"crop{frac:g}@{top},{left}" if cut else "identity"
                for factor in (1.0, *cfg.rescales):
                    name = base if factor == 1.0 else f"{base}+rescale{factor:g}"
                    ops.append((name, ("crop", cut, top, left, float(factor))))
    for dy in range(-cfg.shift, cfg.shift + 1):
        for dx in range(-cfg.shift, cfg.shift + 1):
            if dy or dx:
                ops.append((f"shift{dy:+d},{dx:+d}", ("shift", 0, dy, dx, 1.0)))
    flipped = [(f"flip+{n}", op) for n, op in ops] if cfg.flips else []
    return ops + flipped


def variant_names(shape: tuple[int, int, int], cfg: InvariantConfig) -> list[str]:
    """Names of the variants of an image of ``shape`` (C, H, W), in the order :func:`variants` makes them."""
    return [name for name, _ in _variant_ops(shape, cfg)]


def variants(images: np.ndarray, cfg: InvariantConfig) -> np.ndarray:
    """``uint8 (N, V, C, H, W)``: the indexed variants of ``uint8 (N, C, H, W)`` images."""
    n, c, h, w = images.shape
    ops = _variant_ops((c, h, w), cfg)
    out = np.empty((n, len(ops), c, h, w), dtype=np.uint8)
    pad = cfg.shift
    for v, (name, (kind, cut, a, b, factor)) in enumerate(ops):
        src = images[..., ::-1] if name.startswith("flip+") else images
        if kind == "crop":
            x = src[:, :, a : a + h - cut, b : b + w - cut]
            x = x if cut == 0 else _resize(x, h, w)
            if factor != 1.0:
                x = _resize(_resize(x, max(1, round(h * factor)), max(1, round(w * factor))), h, w)
        else:
            padded = np.pad(src, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
            x = padded[:, :, pad - a : pad - a + h, pad - b : pad - b + w]
        out[:, v] = x
    return out


def represent(images: np.ndarray, cfg: InvariantConfig) -> np.ndarray:
    """``float32 (N, D)`` representation of ``uint8 (N, C, H, W)``: blur, area down-sample, remove the mean.

    Scaled so that the Euclidean distance of two representations is a normalised L2 (root mean square).
    """
    x = images.astype(np.float32) / 255.0
    if cfg.blur > 0:
        x = gaussian_filter(x, sigma=(0, 0, cfg.blur, cfg.blur), mode="nearest")
    n, c, h, w = x.shape
    fh, fw = max(1, -(-h // cfg.size)), max(1, -(-w // cfg.size))  # ceil: sides end up <= size
    hh, ww = (h // fh) * fh, (w // fw) * fw
    x = x[:, :, :hh, :ww].reshape(n, c, hh // fh, fh, ww // fw, fw).mean(axis=(3, 5))
    x = x - x.mean(axis=(1, 2, 3), keepdims=True)
    flat = x.reshape(n, -1)
    return (flat / np.sqrt(flat.shape[1])).astype(np.float32)


class VariantIndex:
    """Representations of every variant of every training image, searchable by nearest neighbour."""

    def __init__(self, images: np.ndarray, cfg: InvariantConfig, block: int = 256) -> None:
        self.cfg = cfg
        self.names = variant_names(tuple(images.shape[1:]), cfg)  # type: ignore[arg-type]
        self.num_variants = len(self.names)
        parts = [
            represent(variants(images[s : s + block], cfg).reshape(-1, *images.shape[1:]), cfg)
            for s in range(0, len(images), block)
        ]
        self.vectors = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)

    def search(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Nearest variant of each query: distance ``float64 (M,)``, training row ``int64 (M,)``, variant names."""
        dist, idx = nearest_neighbors(represent(images, self.cfg), self.vectors, k=1, metric="euclidean")
        rows = idx[:, 0].astype(np.int64)
        names = [self.names[r % self.num_variants] for r in rows]
        return dist[:, 0].astype(np.float64), rows // self.num_variants, names


def combined_score(d_pixel: np.ndarray, d_robust: np.ndarray, scales: dict[str, float]) -> np.ndarray:
    """``min(d_pixel / s_pixel, d_robust / s_robust)``, ``float64``: small when either path finds a copy."""
    return np.minimum(d_pixel / scales["pixel"], d_robust / scales["invariant"])


def calibrate_robust(
    index: Any, holdout_images: np.ndarray, holdout_pixel: np.ndarray, target_fpr: float, cfg: InvariantConfig
) -> dict[str, Any]:
    """The ``robust`` calibration record of ``index`` from held-out real images and their pixel-path distances."""
    from diffaudit.guards.index import (
        KEY_ACHIEVED,
        KEY_HOLDOUT_QUANTILES,
        KEY_RULE,
        KEY_TARGET_FPR,
        KEY_THRESHOLD,
        _quantiles,
        calibrate_threshold,
    )

    d_rob, _, _ = variant_index(index, cfg).search(holdout_images)
    # Medians put both paths on one scale; the tiny floor keeps a degenerate (all-zero) path from dividing by 0.
    scales = {"pixel": max(float(np.median(holdout_pixel)), 1e-9), "invariant": max(float(np.median(d_rob)), 1e-9)}
    score = combined_score(holdout_pixel, d_rob, scales)
    threshold, achieved = calibrate_threshold(score, target_fpr)
    return {
        KEY_RULE: "min(pixel distance / s_pixel, crop/flip/shift-aligned blurred distance / s_invariant) < threshold",
        KEY_TARGET_FPR: float(target_fpr),
        KEY_THRESHOLD: threshold,
        KEY_ACHIEVED: achieved,
        KEY_HOLDOUT_QUANTILES: _quantiles(score),
        "scales": scales,
        "invariant": cfg.to_json(),
        "num_variants": len(variant_names(index.shape, cfg)),
    }


def variant_index(index: Any, cfg: InvariantConfig | None = None) -> VariantIndex:
    """The (cached) :class:`VariantIndex` of a :class:`~diffaudit.guards.index.TrainingIndex`."""
    if cfg is None:
        record = index.calibration.get(ROBUST)
        if record is None:
            raise ConfigError("this index has no robust calibration; build it with invariant matching")
        cfg = InvariantConfig.from_json(record["invariant"])
    cached = getattr(index, "_variants", None)
    if cached is None or cached.cfg != cfg:
        cached = VariantIndex(index.images, cfg)
        index._variants = cached
    return cached
