"""Image grids as PNG files, for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffaudit.io import atomic_path


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile ``uint8`` images ``(N, C, H, W)`` into one ``(H', W', C)`` array with ``pad`` pixels between.

    ``scale`` repeats pixels (nearest neighbour) so that 8x8 digits stay visible.
    """
    n, c, h, w = images.shape
    if n == 0:
        return np.zeros((h or 1, w or 1, c or 1), dtype=np.uint8)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def auto_scale(height: int) -> int:
    """Pixel repeat factor so that tiles are at least ~32 px tall."""
    return max(1, 32 // max(height, 1))


def save_grid(images: np.ndarray, path: str | Path, ncols: int | None = None, max_images: int = 100) -> Path:
    """Write the first ``max_images`` of ``images`` ``(N, C, H, W) uint8`` as a PNG grid, atomically."""
    from PIL import Image

    images = images[:max_images]
    grid = make_grid(images, ncols=ncols, scale=auto_scale(images.shape[2] if images.size else 32))
    mode_img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_path(path, suffix=".png") as tmp:
        mode_img.save(tmp, format="PNG")
    return Path(path)
