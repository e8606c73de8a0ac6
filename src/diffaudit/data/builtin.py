"""Built-in image sources that need no download: they ship inside packages we depend on.

* ``digits``: scikit-learn's 1,797 handwritten digits, 8x8 grey, 10 classes.
* ``faces``: scikit-image's ``lfw_subset``, the first 100 of its 200 images (the faces; the rest are not faces),
  25x25 grey, unlabelled (one class "face").
* ``glyphs``: capital letters rendered from the TrueType fonts that ship with matplotlib, with small seeded
  shifts and scalings, 32x32 grey, a class per character.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffaudit.errors import DataError


def load_digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """scikit-learn's digits as ``uint8 (1797, 1, 8, 8)``, labels ``0..9``; values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, bunch.target.astype(np.int64), tuple(str(i) for i in range(10))


def load_faces() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The 100 face images of scikit-image's ``lfw_subset`` as ``uint8 (100, 1, 25, 25)``, one class."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 are faces, the last 100 are not
    images = np.round(np.clip(faces, 0, 1) * 255).astype(np.uint8)[:, None]
    return images, np.zeros(len(images), dtype=np.int64), ("face",)


def _font_files() -> list[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # STIX size variants and the Computer Modern symbol fonts lack ordinary capitals; keep text fonts only.
    keep = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "cmr10", "cmss10", "cmtt10", "STIXGeneral")
    # The "Display" variants hold no Latin letters (they render blank), so they are left out.
    return sorted(p for p in root.glob("*.ttf") if p.stem.startswith(keep) and "Display" not in p.stem)


def load_glyphs(
    characters: str = "ABCDEFGHIJ", resolution: int = 32, per_font: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Render ``characters`` from matplotlib's fonts, ``per_font`` jittered copies each, white on black.

    Returns ``uint8 (N, 1, resolution, resolution)``, labels indexing ``characters``. Deterministic in ``seed``.
    """
    from PIL import Image, ImageDraw, ImageFont

    fonts = _font_files()
    if not fonts:
        raise DataError("no TrueType fonts found in matplotlib's data directory")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    canvas_size = resolution * 2
    for label, char in enumerate(characters):
        for font_path in fonts:
            for _ in range(per_font):
                size = int(canvas_size * rng.uniform(0.55, 0.75))
                font = ImageFont.truetype(str(font_path), size)
                img = Image.new("L", (canvas_size, canvas_size), 0)
                draw = ImageDraw.Draw(img)
                left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
                dx, dy = rng.integers(-canvas_size // 10, canvas_size // 10 + 1, size=2)
                x = (canvas_size - (right - left)) // 2 - left + dx
                y = (canvas_size - (bottom - top)) // 2 - top + dy
                draw.text((x, y), char, fill=255, font=font)
                img = img.resize((resolution, resolution), Image.Resampling.BOX)
                images.append(np.asarray(img, dtype=np.uint8)[None])
                labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), tuple(characters)


BUILTIN_SOURCES = {"digits": load_digits, "faces": load_faces, "glyphs": load_glyphs}
