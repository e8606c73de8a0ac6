"""Explicit resizing and channel conversion of uint8 image stacks.

Resizing is never implicit: a caller names the target resolution and the policy. ``resize`` scales with
antialiasing (Pillow's box filter when shrinking, bilinear when growing); ``center-crop`` crops the largest
centred square and then resizes; ``pad`` pads to a square with black and then resizes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffaudit.errors import DataError

RESIZE_POLICIES = ("resize", "center-crop", "pad")


def _to_pil(image: np.ndarray) -> Image.Image:
    hwc = image.transpose(1, 2, 0)
    return Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] != channels:
        raise DataError(f"internal: expected {channels} channels, got {arr.shape[-1]}")
    return arr.transpose(2, 0, 1).copy()


def resize_image(image: np.ndarray, resolution: int, policy: str = "resize") -> np.ndarray:
    """Resize one ``uint8`` image ``(C, H, W)`` to ``(C, resolution, resolution)`` by ``policy``."""
    if policy not in RESIZE_POLICIES:
        raise DataError(f"unknown resize policy {policy!r}; choose one of {RESIZE_POLICIES}")
    c, h, w = image.shape
    if (h, w) == (resolution, resolution):
        return image
    img = _to_pil(image)
    if policy == "center-crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif policy == "pad":
        side = max(h, w)
        canvas = Image.new(img.mode, (side, side))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    shrinking = resolution < max(img.size)
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return _from_pil(img.resize((resolution, resolution), resample=resample), c)


def resize_images(images: np.ndarray, resolution: int, policy: str = "resize") -> np.ndarray:
    """Resize a stack ``(N, C, H, W) uint8`` to square ``resolution`` (see :func:`resize_image`)."""
    if images.shape[2:] == (resolution, resolution):
        return images
    return np.stack([resize_image(img, resolution, policy) for img in images]) if len(images) else images


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(N, C, H, W) uint8`` between grey (1) and RGB (3); grey uses ITU-R 601-2 luma like Pillow."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    c = images.shape[1]
    if c == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
    return np.clip((images.astype(np.float32) * weights).sum(axis=1, keepdims=True).round(), 0, 255).astype(np.uint8)
