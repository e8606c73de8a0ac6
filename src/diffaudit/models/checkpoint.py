"""Self-describing model directories: ``config.json`` plus ``model.safetensors`` (and ``ema.safetensors``).

Pickled checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``) are refused with a clear error: an audit
tool opens other people's files, and unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffaudit.errors import CheckpointError
from diffaudit.io import atomic_write_json
from diffaudit.models.config import ModelConfig
from diffaudit.models.diffusion import DiffusionModel

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
MODEL_KIND = "diffaudit.DiffusionModel"


def _refuse_pickles(path: Path) -> None:
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to load a pickled checkpoint ({path.suffix}); unpickling can run arbitrary code. "
            "Convert it to safetensors (model.safetensors + config.json) first."
        )
    if path.is_dir() and not (path / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: holds only pickled weights ({', '.join(pickles)}); refusing to unpickle. "
                f"diffaudit loads {WEIGHTS_FILE} + {CONFIG_FILE}."
            )


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """Accept a model directory, or a run directory that contains ``model/``; refuse pickles."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model directory")
    _refuse_pickles(p)
    if p.is_dir() and not (p / WEIGHTS_FILE).exists() and (p / "model" / WEIGHTS_FILE).exists():
        p = p / "model"
    if not p.is_dir() or not (p / CONFIG_FILE).exists() or not (p / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{p}: not a diffaudit model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return p


def _state(model: DiffusionModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """A 12-hex-digit content hash of a state dict (names, shapes and values)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:12]


def save_model(
    model: DiffusionModel,
    out_dir: str | os.PathLike[str],
    ema_state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """Write ``model`` (and its EMA weights) as a model directory, atomically; returns the model id.

    The directory is assembled under a temporary name and renamed into place, replacing an older one.
    The model id is the content hash of the weights that sampling uses (EMA when present).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = _state(model)
    model_id = weights_id(ema_state if ema_state is not None else state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    save_file(state, str(tmp / WEIGHTS_FILE))
    if ema_state is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
    atomic_write_json(
        tmp / CONFIG_FILE,
        {"kind": MODEL_KIND, "model_id": model_id, "model": model.config.to_dict(), **(extra or {})},
    )
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return model_id


def read_model_config(path: str | os.PathLike[str]) -> dict[str, object]:
    """The parsed ``config.json`` of a model directory (or run directory)."""
    p = resolve_model_dir(path) / CONFIG_FILE
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: unreadable config ({exc})") from exc
    if meta.get("kind") != MODEL_KIND or "model" not in meta:
        raise CheckpointError(f"{p}: not a diffaudit model config (kind={meta.get('kind')!r})")
    return meta


def load_model(
    path: str | os.PathLike[str], use_ema: bool = True, device: str | torch.device | None = None
) -> tuple[DiffusionModel, dict[str, object]]:
    """Load a model directory; returns the model (in eval mode, EMA weights if present) and its metadata.

    The model is moved to ``device`` (default: :func:`diffaudit.device.resolve_device`, i.e. a GPU when
    torch sees one, unless ``$DIFFAUDIT_DEVICE`` says otherwise).
    """
    from diffaudit.device import resolve_device

    model_dir = resolve_model_dir(path)
    meta = read_model_config(model_dir)
    model = DiffusionModel(ModelConfig.from_dict(meta["model"]))  # type: ignore[arg-type]
    weights = model_dir / (EMA_FILE if use_ema and (model_dir / EMA_FILE).exists() else WEIGHTS_FILE)
    try:
        state = load_file(str(weights))
        model.unet.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot load weights ({exc})") from exc
    model.to(resolve_device(device)).eval()
    meta["weights_file"] = weights.name
    meta["model_dir"] = str(model_dir)
    return model, meta
