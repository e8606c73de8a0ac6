"""Turning a source spec ("digits", "faces", "glyphs", "folder:PATH", "captioned:PATH", "npz:PATH") into an ImageSet.

Options applied after loading, in this order: class subset, channels, resolution (explicit policy), subset size
(a seeded random sample, stratified by nothing: a plain permutation prefix), then planted duplicates (canaries,
see :mod:`diffaudit.data.canaries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffaudit.data.builtin import BUILTIN_SOURCES
from diffaudit.data.folder import DEFAULT_MAX_PIXELS, read_folder
from diffaudit.data.imageset import ImageSet
from diffaudit.data.transforms import convert_channels, resize_images
from diffaudit.errors import DataError


@dataclass(frozen=True)
class SourceOptions:
    """How to load a source. ``None`` means "as the source provides it"."""

    resolution: int | None = None
    channels: int | None = None
    resize_policy: str = "resize"
    subset: int | None = None
    classes: tuple[str, ...] | None = None
    seed: int = 0
    skip_bad: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    extra: dict[str, object] = field(default_factory=dict)
    dedup: float | None = None  # remove near-duplicates within this normalized L2 (diffaudit.data.dedup), last


def known_sources() -> list[str]:
    """Names of the built-in sources plus the user-source prefixes."""
    return sorted(BUILTIN_SOURCES) + ["folder:PATH", "captioned:PATH", "npz:PATH"]


def _load_raw(spec: str, opts: SourceOptions) -> tuple[ImageSet, dict[str, object]]:
    info: dict[str, object] = {"spec": spec}
    if spec in BUILTIN_SOURCES:
        images, labels, names = BUILTIN_SOURCES[spec]()
        return ImageSet(images, labels, names, {"source": spec}), info
    kind, _, path = spec.partition(":")
    if kind == "folder" and path:
        images, labels, names, report = read_folder(
            path, opts.resolution, opts.channels, opts.resize_policy, opts.skip_bad, opts.max_pixels
        )
        info.update(read=report.read, skipped=len(report.skipped), skipped_files=report.skipped)
        return ImageSet(images, labels, names, {"source": spec}), info
    if kind == "captioned" and path:
        # Hugging Face imagefolder layout (metadata.jsonl with file_name/text, or NAME.txt beside NAME.png):
        # labels index the unique captions, which become the conditions a text-to-image model is audited on.
        from diffaudit.data.prompts import read_captioned_folder

        return read_captioned_folder(path, opts.resolution, opts.resize_policy, opts.max_pixels), info
    if kind == "npz" and path:
        loaded = ImageSet.load(path)
        return loaded.with_provenance(
            source=np.where(loaded.provenance["source"] == "", spec, loaded.provenance["source"])
        ), info
    if Path(spec).suffix == ".npz" and Path(spec).exists():
        return _load_raw(f"npz:{spec}", opts)
    raise DataError(f"unknown image source {spec!r}; known: {', '.join(known_sources())}")


def load_source(spec: str, options: SourceOptions | None = None, **overrides: object) -> ImageSet:
    """Load ``spec`` as an :class:`ImageSet` with ``options`` (or keyword overrides of the defaults).

    Raises :class:`DataError` naming the source or file when it is empty, unreadable or invalid.
    """
    opts = options or SourceOptions(**overrides)  # type: ignore[arg-type]
    imageset, _ = load_source_with_info(spec, opts)
    return imageset


def load_source_with_info(spec: str, opts: SourceOptions) -> tuple[ImageSet, dict[str, object]]:
    """Like :func:`load_source`, also returning what happened (files read and skipped)."""
    data, info = _load_raw(spec, opts)
    if len(data) == 0:
        raise DataError(f"source {spec!r} is empty")
    if opts.classes:
        missing = [c for c in opts.classes if c not in data.class_names]
        if missing:
            raise DataError(f"source {spec!r} has no classes {missing}; it has {list(data.class_names)}")
        keep = [data.class_names.index(c) for c in opts.classes]
        data = data.subset(np.isin(data.labels, keep))
        remap = np.full(max(data.class_names and len(data.class_names), 1), -1)
        remap[keep] = np.arange(len(keep))
        data = ImageSet(data.images, remap[data.labels], tuple(opts.classes), data.provenance)
    if opts.channels is not None:
        data = ImageSet(convert_channels(data.images, opts.channels), data.labels, data.class_names, data.provenance)
    if opts.resolution is not None:
        data = ImageSet(
            resize_images(data.images, opts.resolution, opts.resize_policy),
            data.labels,
            data.class_names,
            data.provenance,
        )
    if opts.subset is not None:
        if opts.subset <= 0:
            raise DataError(f"subset must be positive, got {opts.subset}")
        if opts.subset < len(data):
            order = np.random.default_rng(opts.seed).permutation(len(data))[: opts.subset]
            data = data.subset(np.sort(order))
    if opts.dedup is not None:
        from diffaudit.data.dedup import deduplicate

        data, record = deduplicate(data, opts.dedup)
        info["dedup"] = {k: v for k, v in record.items() if k != "removed"}
    info["num_images"] = len(data)
    return data, info
