"""Reading a user's folder of PNG/JPEG images safely.

Sub-folders become classes when present (``root/cat/1.png`` has class "cat"); files directly in ``root`` are
then refused, because mixing labelled and unlabelled images is almost always a mistake. Every problem names
the file: unreadable or truncated files, images larger than ``max_pixels`` (decompression bombs), symlinks
that resolve outside ``root``, and (without an explicit ``resolution``/``channels``) mixed sizes or modes.
With ``skip_bad=True`` a bad file is skipped and recorded instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffaudit.data.transforms import convert_channels, resize_image
from diffaudit.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class FolderReport:
    """What a folder read did: files read, and files skipped with the reason."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _list_files(root: Path) -> list[tuple[Path, str | None]]:
    """(file, class name or None) for every image file below ``root``, sorted for determinism."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if subdirs and any(any(d.rglob("*")) for d in subdirs):
        if top_files:
            raise DataError(
                f"{root}: has both class sub-folders and images at the top level ({top_files[0].name}); "
                "put every image in a class folder, or use a folder without sub-folders"
            )
        return [
            (f, d.name)
            for d in subdirs
            for f in sorted(d.rglob("*"))
            if (f.is_file() or f.is_symlink()) and f.suffix.lower() in IMAGE_SUFFIXES
        ]
    files = sorted(p for p in root.iterdir() if (p.is_file() or p.is_symlink()))
    return [(f, None) for f in files if f.suffix.lower() in IMAGE_SUFFIXES]


def _read_one(path: Path, root: Path, max_pixels: int) -> Image.Image:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"{path}: is a symlink that leaves the folder {root} (points to {resolved})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(resolved) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise DataError(f"{path}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
                img.load()  # forces a full decode: truncated files fail here
                return img.copy()
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{path}: refused as a decompression bomb ({exc})") from exc
        except Exception as exc:  # UnidentifiedImageError, OSError (truncated), SyntaxError (bad PNG chunks)
            raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


def _to_array(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode in ("L", "RGB"):
        arr = np.asarray(img, dtype=np.uint8)
    elif img.mode in ("LA", "P", "RGBA", "I;16", "I", "F", "1", "CMYK", "YCbCr"):
        # Convert explicitly, preserving whether the image is grey or colour.
        target = "L" if img.mode in ("LA", "1", "I;16", "I", "F") else "RGB"
        if img.mode in ("I;16", "I", "F"):
            arr32 = np.asarray(img, dtype=np.float64)
            top = arr32.max() or 1.0
            arr = np.round(arr32 / top * 255).astype(np.uint8)
        else:
            arr = np.asarray(img.convert(target), dtype=np.uint8)
    else:
        raise DataError(f"{path}: unsupported image mode {img.mode!r}")
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr.transpose(2, 0, 1).copy()


def read_folder(
    root: str | Path,
    resolution: int | None = None,
    channels: int | None = None,
    resize_policy: str = "resize",
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], FolderReport]:
    """Read every PNG/JPEG below ``root``.

    Returns ``(images uint8 (N, C, H, W), labels int64 (N,), class_names, report)``. Labels are -1 and
    ``class_names`` empty when ``root`` has no class sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    entries = _list_files(root)
    if not entries:
        raise DataError(f"{root}: contains no PNG or JPEG images")
    class_names = tuple(sorted({c for _, c in entries if c is not None}))
    report = FolderReport()
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for path, cls in entries:
        try:
            arr = _to_array(_read_one(path, root, max_pixels), path)
            if channels is not None:
                arr = convert_channels(arr[None], channels)[0]
            if resolution is not None:
                arr = resize_image(arr, resolution, resize_policy)
            if first is None:
                first = (path, arr.shape)
            elif arr.shape != first[1]:
                raise DataError(
                    f"{path}: shape {arr.shape} (C, H, W) differs from {first[0].name} {first[1]}; "
                    "pass a resolution (and channels) to convert every image explicitly"
                )
        except DataError as exc:
            if not skip_bad:
                raise
            report.skipped.append((str(path), str(exc)))
            continue
        images.append(arr)
        labels.append(class_names.index(cls) if cls is not None else -1)
    if not images:
        raise DataError(f"{root}: every image was skipped as bad ({len(report.skipped)} files)")
    report.read = len(images)
    return np.stack(images), np.array(labels, dtype=np.int64), class_names, report
