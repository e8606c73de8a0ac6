"""Self-describing model directories: ``config.json`` plus ``model.safetensors`` (and ``ema.safetensors``).

Pickled checkpoints are refused (:mod:`diffaudit.safeload`): an audit tool opens other people's files, and
unpickling runs arbitrary code. Every field of ``config.json`` is type-checked before a model is built from it.

Replacing a model directory survives a kill at any instant. :func:`save_model` writes the new model to the
sibling ``.NAME.new`` (``config.json`` last, so a directory holding it is complete), then renames ``NAME`` to
``.NAME.old``, ``.NAME.new`` to ``NAME``, and removes ``.NAME.old``. Whatever step a kill interrupts, one of
the three holds a complete model: :func:`resolve_model_dir` loads it (reading only), and
:func:`recover_model_dir` (called before every save and by a resumed training run) restores ``NAME`` from it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffaudit.config import check_model_fields
from diffaudit.errors import CheckpointError, ConfigError
from diffaudit.io import atomic_write_json, crash_point, ensure_dir, fsync_dir, read_json
from diffaudit.models.config import ModelConfig
from diffaudit.models.diffusion import DiffusionModel
from diffaudit.safeload import PICKLE_SUFFIXES, load_safetensors, refuse_pickle_file, refuse_pickle_only_folder

__all__ = [
    "CONFIG_FILE",
    "EMA_FILE",
    "MODEL_KIND",
    "PICKLE_SUFFIXES",
    "WEIGHTS_FILE",
    "load_model",
    "read_model_config",
    "recover_model_dir",
    "resolve_model_dir",
    "save_model",
    "weights_id",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
MODEL_KIND = "diffaudit.DiffusionModel"
# Types of the optional top-level fields of config.json (the "model" section is checked field by field).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "model_id": (str,),
    "preset": (str,),
    "trained_steps": (int,),
    "train_images": (int,),
    "init_model_id": (str, type(None)),
    "class_names": (list,),
}


# ---- finding a complete model directory ----------------------------------------------------------------------
def _siblings(out: Path) -> tuple[Path, Path]:
    """The ``.NAME.new`` and ``.NAME.old`` directories a save of ``out`` uses."""
    return out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")


def _complete(directory: Path) -> bool:
    # config.json is written last, so its presence means the weights before it are complete.
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def _interrupted_save(out: Path) -> Path | None:
    """When ``out`` is missing because a save was killed mid-swap, the complete sibling to use instead."""
    if out.exists():
        return None
    new, old = _siblings(out)
    for candidate in (new, old):  # new first: a save that got this far is rolled forward
        if _complete(candidate):
            return candidate
    return None


def recover_model_dir(out: str | os.PathLike[str]) -> None:
    """Finish or undo a killed :func:`save_model` of ``out`` and remove its leftovers (needs write access)."""
    out = Path(out)
    new, old = _siblings(out)
    source = _interrupted_save(out)
    if source is not None:
        os.replace(source, out)
        fsync_dir(out.parent)
    for stale in (new, old):
        if stale.exists():
            shutil.rmtree(stale)
    # Leftovers of the earlier save scheme (mkdtemp names .NAME.XXXXXXXX beside a complete NAME).
    if out.exists():
        legacy = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}$")
        for stale in out.parent.iterdir():
            if legacy.match(stale.name) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """Accept a model directory, or a run directory that contains ``model/``; refuse pickles.

    A model whose replacement was killed mid-swap is found in its ``.NAME.new`` / ``.NAME.old`` sibling.
    """
    p = Path(path)
    if not p.exists():
        found = _interrupted_save(p)
        if found is None:
            raise CheckpointError(f"{p}: no such model directory")
        return found
    if p.is_file():
        refuse_pickle_file(p, "checkpoint")
        raise CheckpointError(f"{p}: is a file; a model is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (p / WEIGHTS_FILE).exists():
        inner = p / "model"
        if _complete(inner):
            return inner
        found = _interrupted_save(inner)
        if found is not None:
            return found
    refuse_pickle_only_folder(p, "model weights")
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{p}: not a diffaudit model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return p


# ---- saving -------------------------------------------------------------------------------------------------
def _state(model: DiffusionModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}


def weights_id(state: dict[str, torch.Tensor]) -> str:
    """A 12-hex-digit content hash of a state dict (names, shapes and values).

    Kept apart from :func:`diffaudit.safeload.tensors_digest` on purpose: model ids recorded in earlier runs
    and reports must stay valid, and that digest also hashes dtypes.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:12]


def _save_synced(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def save_model(
    model: DiffusionModel,
    out_dir: str | os.PathLike[str],
    ema_state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, object] | None = None,
) -> str:
    """Write ``model`` (and its EMA weights) as a model directory, replacing an older one; returns the model id.

    A kill at any instant leaves the old or the new model loadable (see the module docstring). The model id is
    the content hash of the weights that sampling uses (EMA when present).
    """
    out = Path(out_dir)
    ensure_dir(out.parent)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; cannot write a model here")
    recover_model_dir(out)
    new, old = _siblings(out)
    state = _state(model)
    model_id = weights_id(ema_state if ema_state is not None else state)
    new.mkdir()
    _save_synced(state, new / WEIGHTS_FILE)
    if ema_state is not None:
        _save_synced({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, new / EMA_FILE)
    atomic_write_json(
        new / CONFIG_FILE,
        {"kind": MODEL_KIND, "model_id": model_id, "model": model.config.to_dict(), **(extra or {})},
    )
    fsync_dir(new)
    crash_point("model:new-written")
    if out.exists():
        os.replace(out, old)
        crash_point("model:old-moved")
    os.replace(new, out)
    fsync_dir(out.parent)
    crash_point("model:new-moved")
    if old.exists():
        shutil.rmtree(old)
    return model_id


# ---- loading ------------------------------------------------------------------------------------------------
def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """Type-check a parsed config.json; every problem names the file and the field."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(meta).__name__}")
    if meta.get("kind") != MODEL_KIND:
        raise CheckpointError(f"{path}: not a diffaudit model config (kind={meta.get('kind')!r})")
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: field {key!r} has the wrong type ({value!r})")
    if "class_names" in meta and not all(isinstance(c, str) for c in meta["class_names"]):
        raise CheckpointError(f"{path}: field 'class_names' must be a list of strings")
    section = meta.get("model")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}: field 'model' must be an object of architecture fields, got {section!r}")
    try:
        check_model_fields(section, "model")
        ModelConfig.from_dict(section)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return meta


def read_model_config(path: str | os.PathLike[str]) -> dict[str, object]:
    """The parsed, type-checked ``config.json`` of a model directory (or run directory)."""
    p = resolve_model_dir(path) / CONFIG_FILE
    return _check_meta(read_json(p, "model config", CheckpointError), p)


def _listing(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """A short CheckpointError when ``state`` does not fit the architecture (instead of torch's long list)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshapen:
        parts = [
            f"{label} {len(keys)}: {_listing(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
            if keys
        ]
        raise CheckpointError(f"{path}: weights do not match the architecture in {CONFIG_FILE} ({'; '.join(parts)})")


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
    state = load_safetensors(weights, "model weights")
    _check_state(state, model.unet.state_dict(), weights)
    try:
        model.unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # dtype problems and the like; the common mismatches were caught above
        raise CheckpointError(f"{weights}: cannot load weights ({str(exc).splitlines()[0]})") from exc
    model.to(resolve_device(device)).eval()
    meta["weights_file"] = weights.name
    meta["model_dir"] = str(model_dir)
    return model, meta
