"""The ImageSet: the one data vocabulary every stage of diffaudit reads and writes.

Images are ``uint8`` arrays shaped ``(N, C, H, W)`` with ``C`` in {1, 3}. Each image carries an integer label
(``-1`` when the set is unlabelled), a stable content-hash id, and provenance columns saying where it came from
(a real source or a model, which generation of a self-consuming loop, which seed, which tag).

Ids are content hashes, so two byte-identical images share an id: planted duplicates ("canaries") are one
training image repeated, and results are merged by id, never by position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffaudit.errors import DataError
from diffaudit.io import atomic_path

#: Provenance columns, their numpy dtype kind and the value used for real images.
PROVENANCE_DEFAULTS: dict[str, object] = {
    "source": "",  # where the image came from: "digits", "folder:/path", "model:<id>"
    "synthetic": False,  # True for images a model generated
    "generation": -1,  # self-consuming loop generation that produced it (-1: real)
    "model_id": "",  # id of the model that generated it ("" for real images)
    "seed": -1,  # per-image sampling seed (-1: real)
    "tag": "",  # name of the tag embedded in it ("" when untagged)
}
_PROVENANCE_DTYPES = {
    "source": str,
    "synthetic": bool,
    "generation": np.int64,
    "model_id": str,
    "seed": np.int64,
    "tag": str,
}
_FORMAT_VERSION = 1


def content_id(image: np.ndarray) -> str:
    """Stable 16-hex-digit id of one ``uint8`` image ``(C, H, W)``: a SHA-256 of its shape and bytes."""
    digest = hashlib.sha256()
    digest.update(repr(tuple(image.shape)).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:16]


def _column(name: str, values: object, n: int) -> np.ndarray:
    dtype = _PROVENANCE_DTYPES[name]
    if values is None:
        values = PROVENANCE_DEFAULTS[name]
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = np.full(n, arr.item())
    if arr.shape != (n,):
        raise DataError(f"provenance column {name!r} has shape {arr.shape}, expected ({n},)")
    return arr.astype(dtype) if dtype is not str else arr.astype(np.str_)


@dataclass(frozen=True)
class ImageSet:
    """Images with labels, ids and provenance.

    Attributes:
        images: ``uint8`` array ``(N, C, H, W)``, C in {1, 3}.
        labels: ``int64`` array ``(N,)``; ``-1`` means unlabelled.
        class_names: name of each label value ``0..K-1``.
        provenance: columns named as in :data:`PROVENANCE_DEFAULTS`, each an array ``(N,)``.
        ids: content-hash id per image (``str`` array ``(N,)``), computed when not given.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = ()
    provenance: dict[str, np.ndarray] = field(default_factory=dict)
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"images must be a uint8 array (N, C, H, W); got {getattr(images, 'dtype', type(images))} "
                f"with shape {getattr(images, 'shape', None)}"
            )
        n, c = images.shape[:2]
        if c not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels; got {c}")
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if labels.shape != (n,):
            raise DataError(f"labels have shape {labels.shape}, expected ({n},)")
        if self.class_names and labels.size and labels.max() >= len(self.class_names):
            raise DataError(f"label {labels.max()} has no class name (only {len(self.class_names)} names)")
        if labels.size and labels.min() < -1:
            raise DataError(f"labels must be >= -1; got {labels.min()}")
        unknown = set(self.provenance) - set(PROVENANCE_DEFAULTS)
        if unknown:
            raise DataError(f"unknown provenance columns {sorted(unknown)}; known: {list(PROVENANCE_DEFAULTS)}")
        prov = {k: _column(k, self.provenance.get(k), n) for k in PROVENANCE_DEFAULTS}
        ids = self.ids
        if ids is None:
            ids = np.array([content_id(img) for img in images], dtype=np.str_)
        else:
            ids = np.asarray(ids, dtype=np.str_)
            if ids.shape != (n,):
                raise DataError(f"ids have shape {ids.shape}, expected ({n},)")
        object.__setattr__(self, "images", np.ascontiguousarray(images))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", tuple(str(s) for s in self.class_names))
        object.__setattr__(self, "provenance", prov)
        object.__setattr__(self, "ids", ids)

    # ---- basic properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_labelled(self) -> bool:
        return bool(len(self)) and bool((self.labels >= 0).all()) and self.num_classes > 0

    # ---- derived sets -----------------------------------------------------------------------------------
    def subset(self, index: np.ndarray | Sequence[int] | slice) -> ImageSet:
        """A new set with the images at ``index`` (integer indices, boolean mask or slice)."""
        idx = index if isinstance(index, slice) else np.asarray(index)
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            provenance={k: v[idx] for k, v in self.provenance.items()},
            ids=self.ids[idx],
        )

    def with_provenance(self, **columns: object) -> ImageSet:
        """A copy with some provenance columns replaced (scalars are broadcast)."""
        prov = dict(self.provenance)
        prov.update(columns)  # type: ignore[arg-type]
        return ImageSet(self.images, self.labels, self.class_names, prov, self.ids)

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        """Concatenate sets of equal image shape; class names must agree (or be empty)."""
        sets = [s for s in sets if len(s)] or list(sets[:1])
        if not sets:
            raise DataError("cannot concatenate zero image sets")
        shapes = {s.shape for s in sets}
        if len(shapes) > 1:
            raise DataError(f"cannot concatenate image sets of different shapes {sorted(shapes)}")
        names = {s.class_names for s in sets if s.class_names}
        if len(names) > 1:
            raise DataError("cannot concatenate image sets with different class names")
        return ImageSet(
            images=np.concatenate([s.images for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            class_names=next(iter(names)) if names else (),
            provenance={k: np.concatenate([s.provenance[k] for s in sets]) for k in PROVENANCE_DEFAULTS},
            ids=np.concatenate([s.ids for s in sets]),
        )

    # ---- conversions ------------------------------------------------------------------------------------
    def to_float(self) -> np.ndarray:
        """Images as ``float32`` in [0, 1], shape ``(N, C, H, W)``."""
        return self.images.astype(np.float32) / 255.0

    def to_model_tensor(self):  # -> torch.Tensor
        """Images as a ``float32`` torch tensor in [-1, 1], shape ``(N, C, H, W)`` (what models see)."""
        import torch

        return torch.from_numpy(self.images).float().div_(127.5).sub_(1.0)

    @staticmethod
    def from_model_tensor(x, labels, class_names: Sequence[str] = (), **provenance: object) -> ImageSet:
        """Build a set from a model's output tensor in [-1, 1] ``(N, C, H, W)`` (clamped, rounded to uint8)."""
        import torch

        arr = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(dtype=torch.uint8)
        return ImageSet(arr.cpu().numpy(), np.asarray(labels), tuple(class_names), dict(provenance))

    def summary(self) -> dict[str, object]:
        """Counts and shapes for printing."""
        counts = {}
        if self.num_classes:
            values, freq = np.unique(self.labels, return_counts=True)
            counts = {self.class_names[v] if v >= 0 else "(none)": int(f) for v, f in zip(values, freq, strict=True)}
        return {
            "num_images": len(self),
            "shape": list(self.shape) if len(self) else None,
            "num_classes": self.num_classes,
            "per_class": counts,
            "unique_ids": int(np.unique(self.ids).size),
            "synthetic": int(self.provenance["synthetic"].sum()),
            "tagged": int((self.provenance["tag"] != "").sum()),
            "sources": sorted(set(self.provenance["source"].tolist())),
        }

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the set as an ``.npz`` file atomically (no pickled objects inside)."""
        path = Path(path)
        arrays = {
            "format_version": np.array(_FORMAT_VERSION),
            "images": self.images,
            "labels": self.labels,
            "class_names": np.array(self.class_names, dtype=np.str_),
            "ids": self.ids,
        }
        arrays.update({f"prov_{k}": v for k, v in self.provenance.items()})
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        return path

    @staticmethod
    def load(path: str | Path) -> ImageSet:
        """Read an ``.npz`` written by :meth:`save`, or any npz with ``images`` (and optionally ``labels``).

        Loaded with ``allow_pickle=False``: a file holding pickled objects is refused.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except ValueError as exc:
            raise DataError(f"{path}: refusing to load (holds pickled objects or is malformed): {exc}") from exc
        except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError on truncated files
            raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
        if "images" not in data:
            raise DataError(f"{path}: has no 'images' array (found {sorted(data)})")
        images = data["images"]
        if images.dtype != np.uint8:
            raise DataError(f"{path}: 'images' must be uint8, got {images.dtype}")
        if images.ndim == 3:  # (N, H, W) grey
            images = images[:, None]
        if images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        labels = data.get("labels", np.full(images.shape[0], -1))
        prov = {k[5:]: v for k, v in data.items() if k.startswith("prov_")}
        try:
            return ImageSet(
                images=images,
                labels=labels,
                class_names=tuple(data.get("class_names", np.array([], dtype=np.str_)).tolist()),
                provenance=prov,
                ids=data.get("ids"),
            )
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
