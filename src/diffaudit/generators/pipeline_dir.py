"""The layout of a diffusers text-to-image pipeline directory: validation, weight variants and content ids.

The directory has the Stable Diffusion 1.x/2.x layout written by ``save_pretrained``: ``model_index.json`` and
the sub-folders ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``. Pickled weights (``.bin``,
``.ckpt``, ``.pt``) are refused before anything is loaded (:mod:`diffaudit.safeload`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffaudit.errors import CheckpointError, ConfigError
from diffaudit.safeload import refuse_pickle_only_folder, safetensors_digest, tensors_digest

#: The prefix that marks a pipeline directory on the command line (``sd:PATH``; plain paths work too).
PREFIX = "sd:"


def is_pipeline_dir(path: str | os.PathLike[str]) -> bool:
    """True for ``sd:PATH`` or a directory holding ``model_index.json`` (a diffusers pipeline)."""
    text = str(path)
    return text.startswith(PREFIX) or (Path(text) / "model_index.json").is_file()


def strip_prefix(path: str | os.PathLike[str]) -> Path:
    """The directory of a ``sd:PATH`` or plain pipeline path."""
    return Path(str(path).removeprefix(PREFIX))


#: Components a text-to-image pipeline directory must have.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (what SD checkpoints ship for inference), fp32 on CPU (fp16 CPU kernels are slow
    or missing); or an explicit ``fp32``/``fp16``/``bf16``."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("dtype fp16 is not supported on CPU; use fp32 or bf16 (or auto)")
    return DTYPES[name]


def _weight_variant(folder: Path, name: str) -> str | None:
    """The safetensors variant to load from a weight folder (None = plain files); refuses pickles."""
    refuse_pickle_only_folder(folder, f"{name} weights")
    safes = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    if not safes:
        raise CheckpointError(f"{folder}: no {name} weights (*.safetensors) found")
    plain = [s for s in safes if s.count(".") == 1 or s.endswith(".safetensors.index.json")]
    if plain:
        return None
    # e.g. diffusion_pytorch_model.fp16.safetensors: the variant is the middle part
    return safes[0].split(".")[-2]


def check_pipeline_dir(path: str | Path) -> dict[str, str | None]:
    """Validate a pipeline directory; returns ``{component: weight variant or None}``.

    Raises :class:`CheckpointError` naming the missing component or file, or the pickles that were refused.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a diffusers pipeline directory)")
    if not (path / "model_index.json").is_file():
        raise CheckpointError(
            f"{path}: no model_index.json; expected a diffusers pipeline directory saved with save_pretrained "
            "(single-file .safetensors/.ckpt checkpoints are not supported: convert them with diffusers first)"
        )
    variants: dict[str, str | None] = {}
    for comp in COMPONENTS:
        sub = path / comp
        if not sub.is_dir():
            raise CheckpointError(f"{path}: missing component {comp!r} (no {comp}/ folder); need {list(COMPONENTS)}")
        if comp == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                raise CheckpointError(f"{sub}: missing scheduler_config.json")
            continue
        if comp == "tokenizer":
            if not ((sub / "tokenizer.json").is_file() or (sub / "vocab.json").is_file()):
                raise CheckpointError(f"{sub}: missing tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
            continue
        if not (sub / "config.json").is_file():
            raise CheckpointError(f"{sub}: missing config.json of component {comp!r}")
        variants[comp] = _weight_variant(sub, comp)
    return variants


def pipeline_model_id(path: str | Path, variant: str | None = None) -> str:
    """Content id of a pipeline: SHA-256 of its U-Net tensors (names, dtypes, shapes, bytes), ``sd-`` + 16 hex.

    The U-Net is what fine-tuning changes, so two directories with the same U-Net are the same model for an
    audit. The id equals :func:`unet_state_id` of the same weights in memory, so a fine-tuned model keeps its
    id when it is saved and loaded again. Tensors are read one at a time (a 3.4 GB U-Net hashes in seconds).
    """
    unet = Path(path) / "unet"
    files = [f for f in sorted(unet.glob("*.safetensors")) if (variant is None) == (f.name.count(".") == 1)]
    try:
        return "sd-" + safetensors_digest(files, prefix=b"unet:")[:16]
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{unet}: unreadable safetensors weights ({type(exc).__name__}: {exc})") from exc


def unet_state_id(unet: torch.nn.Module) -> str:
    """Content id of in-memory U-Net weights, equal to :func:`pipeline_model_id` once they are saved."""
    return "sd-" + tensors_digest(unet.state_dict(), prefix=b"unet:")[:16]
