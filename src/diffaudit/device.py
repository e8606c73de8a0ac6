"""Which torch device diffaudit's own models train, sample and score on.

One setting for the whole process: ``DIFFAUDIT_DEVICE`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``), set
by ``diffaudit --device ...``. ``auto`` (the default) takes the first CUDA GPU when torch sees one, else the
CPU. Randomness never depends on the device: noise is drawn from CPU generators and moved, so a seed names
the same noise everywhere (results still differ in the last bits between devices, as float kernels do).
"""

from __future__ import annotations

import os

import torch

from diffaudit.errors import ConfigError

ENV_VAR = "DIFFAUDIT_DEVICE"
AUTO = "auto"


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The device named by ``spec``, else by ``$DIFFAUDIT_DEVICE``, else ``auto``; a clear error when absent."""
    if isinstance(spec, torch.device):
        return spec
    name = (spec or os.environ.get(ENV_VAR) or AUTO).strip().lower()
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device (try cpu, cuda, cuda:0, mps or auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch sees no CUDA GPU (this torch build: {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available on this machine")
    return device


def describe_device(device: torch.device) -> str:
    """``cpu`` or e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)``, for run records."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
