"""Loading other people's files safely: the one place that refuses pickles, reads safetensors and hashes files.

An audit tool opens checkpoints it did not write. Pickled formats (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
``.pkl``, ``.pickle``) can run arbitrary code when opened, so diffaudit never unpickles: every loader (our model
directories, the Inception and classifier feature extractors, diffusers pipeline directories) goes through
:func:`refuse_pickle_file` / :func:`refuse_pickle_only_folder` and reads weights with :func:`load_safetensors`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from diffaudit.errors import CheckpointError

#: File suffixes that are pickles (refused everywhere).
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_CHUNK = 8 << 20


def is_pickle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has a pickle suffix (case-insensitive)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle_file(path: str | os.PathLike[str], what: str = "checkpoint", hint: str = "") -> None:
    """Raise :class:`CheckpointError` when ``path`` is a pickle file (never opened).

    ``what`` names the file in the message; ``hint`` replaces the generic conversion advice.
    """
    p = Path(path)
    if is_pickle(p):
        raise CheckpointError(
            f"{p}: refusing to load a pickled {what} ({p.suffix}); unpickling can run arbitrary code, so "
            f"diffaudit never unpickles. {hint or 'Convert it to safetensors once, in an environment you trust.'}"
        )


def refuse_pickle_only_folder(folder: str | os.PathLike[str], what: str = "weights") -> None:
    """Raise when ``folder`` holds pickled weights but no ``.safetensors`` file (the user must convert them)."""
    p = Path(folder)
    if not p.is_dir() or any(f.name.endswith(".safetensors") for f in p.iterdir()):
        return
    pickles = sorted(f.name for f in p.iterdir() if is_pickle(f))
    if pickles:
        raise CheckpointError(
            f"{p}: {what} are only in pickle format ({', '.join(pickles)}); diffaudit loads safetensors only. "
            "Convert them once in an environment you trust (e.g. save_pretrained(DIR, safe_serialization=True))."
        )


def load_safetensors(path: str | os.PathLike[str], what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a safetensors file to CPU tensors; a pickle, a missing file or a bad header is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    refuse_pickle_file(p, what)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such {what} file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: not a readable safetensors {what} file ({exc})") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, streamed in 8 MiB chunks (a 3.4 GB U-Net hashes in seconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _update(digest: Any, key: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensors_digest(state: dict[str, torch.Tensor], prefix: bytes = b"") -> str:
    """Hex SHA-256 of a state dict's names, dtypes, shapes and bytes (order-independent: names are sorted)."""
    digest = hashlib.sha256(prefix)
    for key in sorted(state):
        _update(digest, key, state[key])
    return digest.hexdigest()


def safetensors_digest(files: list[Path], prefix: bytes = b"") -> str:
    """:func:`tensors_digest` of the tensors stored in ``files`` (a sharded checkpoint), read one at a time.

    Equal to ``tensors_digest`` of the same tensors in memory, so a model's id is the same before it is saved
    and after it is loaded, whatever the file layout (headers, metadata, sharding) looks like.
    """
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in files:
        refuse_pickle_file(f)
        with safe_open(str(f), framework="pt") as fh:
            where.update({key: f for key in fh.keys()})  # noqa: SIM118 - safe_open handles are not mappings
    digest = hashlib.sha256(prefix)
    for key in sorted(where):
        with safe_open(str(where[key]), framework="pt") as fh:
            _update(digest, key, fh.get_tensor(key))
    return digest.hexdigest()
