"""Reading a user's folder of PNG/JPEG images safely: the one folder reader every command uses.

Sub-folders become classes when present (``root/cat/1.png`` has class "cat"); files directly in ``root`` are
then refused, because mixing labelled and unlabelled images is almost always a mistake. Every problem names
the file: unreadable or truncated files, images larger than ``max_pixels`` (decompression bombs), symlinks
that resolve outside ``root``, symlink loops, files whose first bytes are not PNG or JPEG (only those two
decoders are ever reached: a ``.png`` that is really EPS must not reach Ghostscript), and (without an explicit
``resolution``/``channels``) mixed sizes or modes. With ``skip_bad=True`` a bad file is skipped and recorded.

Other readers of folders use :func:`list_image_files` / :func:`scan_folder` and :func:`open_image` rather than
their own ``iterdir``/``Image.open``, so that every guard applies everywhere.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffaudit.data.transforms import convert_channels, resize_image
from diffaudit.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_MAX_PIXELS = 4096 * 4096
# First bytes of the only formats PIL may decode here, and PIL's names for them (MPO: multi-picture JPEG).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_PIL_FORMATS = ("PNG", "JPEG", "MPO")


@dataclass
class FolderReport:
    """What a folder read did: files read, and files skipped with the reason."""

    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _inside(path: Path, root: Path) -> Path:
    """``path`` resolved; a DataError when it leaves ``root`` or is a symlink loop."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # ELOOP / "Symlink loop" (RuntimeError before Python 3.13), dangling
        kind = "a symlink loop" if "loop" in str(exc).lower() or "symbolic links" in str(exc) else "unreadable"
        raise DataError(f"{path}: {kind} ({exc})") from exc
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"{path}: is a symlink that leaves the folder {root} (points to {resolved})")
    return resolved


def _files_below(directory: Path, root: Path, seen: set[Path]) -> list[Path]:
    """Image-suffix files below ``directory``, sorted; symlinked folders followed only inside ``root``, once."""
    real = _inside(directory, root)
    if real in seen:
        raise DataError(f"{directory}: symlink loop (the folder {real} is reached twice)")
    seen.add(real)
    found: list[Path] = []
    for child in sorted(directory.iterdir()):
        if child.is_dir():
            found += _files_below(child, root, seen)
        elif child.suffix.lower() in IMAGE_SUFFIXES and (child.is_file() or child.is_symlink()):
            found.append(child)
    return found


def scan_folder(root: str | os.PathLike[str], images_only: bool = True) -> list[Path]:
    """The files directly in ``root`` (not in sub-folders), sorted; symlinks are listed and checked on open.

    With ``images_only`` only PNG/JPEG suffixes are listed; otherwise every file (callers report the rest).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    return sorted(
        p
        for p in root.iterdir()
        if (p.is_file() or (p.is_symlink() and not p.is_dir()))
        and (not images_only or p.suffix.lower() in IMAGE_SUFFIXES)
    )


def list_image_files(root: str | os.PathLike[str]) -> list[tuple[Path, str | None]]:
    """(file, class name or None) for every image file below ``root``, sorted for determinism.

    Raises DataError for a symlinked folder that leaves ``root``, a symlink loop, or a folder mixing class
    sub-folders with top-level images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    seen: set[Path] = {_inside(root, root)}
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_files = scan_folder(root)
    per_class = {d.name: _files_below(d, root, seen) for d in subdirs}
    if any(per_class.values()):
        if top_files:
            raise DataError(
                f"{root}: has both class sub-folders and images at the top level ({top_files[0].name}); "
                "put every image in a class folder, or use a folder without sub-folders"
            )
        return [(f, name) for name, files in per_class.items() for f in files]
    return [(f, None) for f in top_files]


# Kept under its old name for callers inside the package.
_list_files = list_image_files


def open_image(
    path: str | os.PathLike[str], root: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open and fully decode one PNG/JPEG file below ``root``; every refusal is a DataError naming the file.

    Refused: symlinks leaving ``root`` and symlink loops, files whose first bytes are not PNG/JPEG (before PIL
    sees them), images over ``max_pixels`` and PIL's decompression bombs, unreadable or truncated files.
    """
    path, root = Path(path), Path(root)
    resolved = _inside(path, root)
    try:
        with open(resolved, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from exc
    if not head.startswith(_MAGIC):
        raise DataError(f"{path}: not a PNG or JPEG file (starts with {head[:8]!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(resolved, formats=_PIL_FORMATS) as img:
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


def _read_one(path: Path, root: Path, max_pixels: int) -> Image.Image:
    """:func:`open_image` under its old name (kept for callers inside the package)."""
    return open_image(path, root, max_pixels)


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
    entries = list_image_files(root)
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
