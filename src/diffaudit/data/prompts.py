"""Prompt files and captioned image folders for text-to-image audits.

* A **prompts file** is plain text, one prompt per line (blank lines skipped), or JSONL (``.jsonl``) with one
  object per line: ``{"prompt": "...", "seed": 123}`` (``seed`` optional: the first seed for that prompt).
* A **captioned folder** follows the Hugging Face ``imagefolder`` convention: a ``metadata.jsonl`` with
  ``file_name`` and ``text`` per image, or else a ``.txt`` caption beside each image (``a.png`` + ``a.txt``).
  Images are read through :mod:`diffaudit.data.folder` (same safety checks) and resized explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffaudit.data.folder import DEFAULT_MAX_PIXELS, _to_array, list_image_files, open_image
from diffaudit.data.imageset import ImageSet
from diffaudit.data.transforms import convert_channels, resize_image
from diffaudit.errors import DataError

#: Caption key of metadata.jsonl rows (the imagefolder convention).
CAPTION_KEY = "text"
FILE_KEY = "file_name"


@dataclass(frozen=True)
class PromptEntry:
    """One prompt and its optional first seed."""

    prompt: str
    seed: int | None = None


def read_prompts(path: str | Path) -> list[PromptEntry]:
    """Read a prompts file (``.txt`` lines or ``.jsonl`` objects); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    entries: list[PromptEntry] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            entries.append(PromptEntry(line.strip()))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f'{path}:{number}: expected an object with a non-empty "prompt" string')
        seed = row.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise DataError(f'{path}:{number}: "seed" must be a non-negative integer, got {seed!r}')
        entries.append(PromptEntry(row["prompt"].strip(), seed))
    if not entries:
        raise DataError(f"{path}: contains no prompts")
    return entries


def _metadata_captions(root: Path) -> dict[str, str]:
    meta = root / "metadata.jsonl"
    captions: dict[str, str] = {}
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(FILE_KEY), str):
            raise DataError(f'{meta}:{number}: expected an object with a "{FILE_KEY}" string')
        text = row.get(CAPTION_KEY)
        if not isinstance(text, str):
            raise DataError(f'{meta}:{number}: "{CAPTION_KEY}" must be a string for {row[FILE_KEY]!r}')
        captions[row[FILE_KEY]] = text
    return captions


def read_captioned_folder(
    root: str | Path,
    resolution: int | None,
    resize_policy: str = "center-crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageSet:
    """Read a folder of captioned images as RGB ``uint8 (N, 3, resolution, resolution)``; captions are conditions.

    Captions come from ``metadata.jsonl`` when present, else from ``NAME.txt`` beside ``NAME.png``. A missing
    caption is an error naming the image (an empty caption must be written explicitly). The ImageSet's labels
    index its ``class_names``, the unique captions in first-seen order (class-labelled data is the same thing with
    class names as captions); ``source`` is ``captioned:ROOT``. ``resolution`` None: the first image's shorter side.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    # The one folder reader: symlinks leaving the folder and loops refused, sorted for determinism.
    files = [path for path, _ in list_image_files(root)]
    if not files:
        raise DataError(f"{root}: contains no PNG or JPEG images")
    meta = _metadata_captions(root) if (root / "metadata.jsonl").is_file() else None
    images: list[np.ndarray] = []
    captions: list[str] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if meta is not None:
            if rel not in meta:
                raise DataError(f"{f}: has no row in {root / 'metadata.jsonl'} (file_name {rel!r})")
            caption = meta[rel]
        else:
            txt = f.with_suffix(".txt")
            if not txt.is_file():
                raise DataError(f"{f}: no caption (expected {txt.name} beside it, or a metadata.jsonl in {root})")
            caption = txt.read_text(encoding="utf-8").strip()
        arr = convert_channels(_to_array(open_image(f, root, max_pixels), f)[None], 3)[0]
        resolution = resolution or int(min(arr.shape[1:]))
        images.append(resize_image(arr, resolution, resize_policy))
        captions.append(caption)
    names = tuple(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(names)}
    labels = np.array([index[c] for c in captions], dtype=np.int64)
    return ImageSet(np.stack(images), labels, names, {"source": f"captioned:{root}"})


def captions_of(data: ImageSet) -> list[str]:
    """The caption (condition name) of every image of ``data``; ``""`` for unlabelled images."""
    return [data.class_names[c] if 0 <= c < len(data.class_names) else "" for c in data.labels.tolist()]
