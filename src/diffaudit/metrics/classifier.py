"""In-house feature networks: a small CNN trained on the reference data, and its on-disk cache.

Inception weights cannot be downloaded here, so the distribution metrics use a network trained on the real
(reference) images themselves, as in the MNIST "LeNet FID" (docs/background.md section 4):

* labelled references train a **classifier** (features = penultimate layer);
* unlabelled references train an **autoencoder** with the same convolutional trunk (features = bottleneck).

The same trunk, left at its seeded random initialisation, is the ``random-cnn`` sanity-check extractor.

Training is deterministic for a given reference set and config: the set is first put into a canonical order
(by content id), the held-out split and the batches come from a seeded ``torch.Generator``, and the weights
are initialised from the same generator (no global RNG). Trained weights are cached on disk, keyed by a hash
of the data and the config, as safetensors plus a JSON sidecar; an entry that fails any check is retrained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffaudit.errors import ConfigError, DataError
from diffaudit.io import atomic_path, atomic_write_json
from diffaudit.safeload import load_safetensors, sha256_file

#: Bump when the architecture or training procedure changes: old cache entries then stop matching.
ARCH_VERSION = 1
#: Channel widths of the successive conv layers (the last one repeats for deeper inputs).
_WIDTHS = (16, 32, 64, 64)
#: The trunk's conv output is average-pooled to this spatial size, so the head does not depend on H, W.
_POOLED = 4
_MIN_SIZE = 4

MODE_CLASSIFIER = "classifier"
MODE_AUTOENCODER = "autoencoder"
MODES = ("auto", MODE_CLASSIFIER, MODE_AUTOENCODER)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Feature-net cache directory: ``cache_dir``, else ``$DIFFAUDIT_CACHE``, else ``~/.cache/diffaudit``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DIFFAUDIT_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "diffaudit"


# ---- networks --------------------------------------------------------------------------------------------
def _num_pools(size: int) -> int:
    # Halve until about 4x4 is left: 8 -> 1 pool, 16 -> 2, 32 -> 3, 64 -> 4 (capped; larger inputs are
    # average-pooled down to 4x4 at the end anyway).
    return int(min(4, max(0, round(math.log2(size / _POOLED)))))


class ConvTrunk(nn.Module):
    """Conv layers, pooling and one linear layer: ``(B, C, H, W)`` in [-1, 1] -> ``(B, feature_dim)``.

    At least two conv layers, one max-pool per factor of two above 4x4 (at most four), then an adaptive
    average pool to 4x4 so that the linear layer's size does not depend on the resolution. Outputs are
    post-ReLU, like the penultimate layer of LeNet or Inception's pool features.
    """

    def __init__(self, channels: int, height: int, width: int, feature_dim: int) -> None:
        super().__init__()
        pools = _num_pools(min(height, width))
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(max(2, pools)):
            c_out = _WIDTHS[min(i, len(_WIDTHS) - 1)]
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            if i < pools:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(_POOLED)
        self.fc = nn.Linear(c_in * _POOLED * _POOLED, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.pool(self.conv(x)).flatten(1)))


class FeatureNet(nn.Module):
    """A trunk plus a training head: class logits (``num_classes > 0``) or a pixel decoder (autoencoder).

    ``features(x)`` is the trunk output either way; ``forward(x)`` is what the training loss sees.
    """

    def __init__(self, channels: int, height: int, width: int, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.out_shape = (channels, height, width)
        self.trunk = ConvTrunk(channels, height, width, feature_dim)
        if num_classes > 0:
            self.head: nn.Module = nn.Linear(feature_dim, num_classes)
        else:
            # An MLP decoder is enough for images up to 64x64 and avoids size bookkeeping in up-convolutions.
            out_dim = channels * height * width
            self.head = nn.Sequential(nn.Linear(feature_dim, 512), nn.ReLU(), nn.Linear(512, out_dim), nn.Sigmoid())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every conv/linear layer from ``generator`` (Kaiming uniform weights, zero biases)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(m.bias)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 tensor in [-1, 1] (the scale every diffaudit model sees)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)


def check_image_size(height: int, width: int) -> None:
    if min(height, width) < _MIN_SIZE:
        raise DataError(
            f"images of {height}x{width} are too small for the feature CNN (need at least {_MIN_SIZE}x{_MIN_SIZE})"
        )


# ---- training --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (all of it enters the cache key).

    ``max_steps`` caps the optimiser steps so a large reference set costs bounded time.
    """

    mode: str = "auto"
    feature_dim: int = 128
    epochs: int = 30
    max_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"classifier mode {self.mode!r} is not one of {list(MODES)}")
        for name in ("feature_dim", "epochs", "max_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"classifier option {name}={value!r} must be a positive integer")
        if not 0.0 < float(self.holdout_fraction) < 1.0:
            raise ConfigError(f"classifier option holdout_fraction={self.holdout_fraction!r} must be in (0, 1)")
        if not float(self.lr) > 0:
            raise ConfigError(f"classifier option lr={self.lr!r} must be positive")


def resolve_mode(labels: np.ndarray, mode: str) -> str:
    """``auto``: classifier when every label is >= 0 and there are two or more classes, else autoencoder."""
    labelled = labels.size > 0 and bool((labels >= 0).all())
    num_classes = np.unique(labels).size if labelled else 0
    if mode == "auto":
        return MODE_CLASSIFIER if num_classes >= 2 else MODE_AUTOENCODER
    if mode == MODE_CLASSIFIER and num_classes < 2:
        raise DataError(
            f"classifier mode needs every reference image labelled with at least two classes; got "
            f"{int((labels >= 0).sum())} labelled images in {num_classes} classes (use mode='autoencoder')"
        )
    return mode


def canonical_order(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices sorting the set by (id, label): the trained net then depends on the set, not on its order."""
    return np.lexsort((labels, ids))


def data_key(images: np.ndarray, labels: np.ndarray, ids: np.ndarray, config: TrainConfig) -> str:
    """SHA-256 (hex) of the canonically ordered images, labels, ids, shape and training config."""
    order = canonical_order(ids, labels)
    digest = hashlib.sha256()
    header = {"arch_version": ARCH_VERSION, "shape": list(images.shape), "config": asdict(config)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update("\n".join(ids[order].tolist()).encode())
    digest.update(np.ascontiguousarray(labels[order], dtype="<i8").tobytes())
    # Ids could be stale if a caller built them by hand; hashing the pixels too costs ~30 ms per 30 MB.
    digest.update(np.ascontiguousarray(images[order]).tobytes())
    return digest.hexdigest()


def train_feature_net(
    images: np.ndarray, labels: np.ndarray, ids: np.ndarray, config: TrainConfig, device: str = "cpu"
) -> tuple[FeatureNet, dict[str, Any]]:
    """Train a classifier or autoencoder on a reference set; return the net (eval mode) and its record.

    Args:
        images: ``uint8 (N, C, H, W)`` reference images.
        labels: ``int64 (N,)``; ``-1`` for unlabelled.
        ids: content ids ``(N,)``, used only to fix a canonical order.
        config: training settings; ``config.seed`` seeds the split, the initialisation and the batches.

    Returns:
        ``(net, record)`` where ``record`` holds the mode, split sizes, and the held-out accuracy
        (classifier) or held-out mean squared reconstruction error in [0, 1] pixel units (autoencoder).
    """
    config.validate()
    n, c, h, w = images.shape
    check_image_size(h, w)
    mode = resolve_mode(labels, config.mode)
    n_hold = int(round(n * config.holdout_fraction))
    if n < 10 or n_hold < 1 or n - n_hold < 2:
        raise DataError(f"need at least 10 reference images to train the feature network; got {n}")

    order = canonical_order(ids, labels)
    gen = torch.Generator().manual_seed(int(config.seed))
    perm = order[torch.randperm(n, generator=gen).numpy()]
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]

    if mode == MODE_CLASSIFIER:
        # Map label values to 0..K-1 so sparse label sets (e.g. only classes 3 and 7) still train.
        classes, targets_np = np.unique(labels, return_inverse=True)
        num_classes = int(classes.size)
        targets = torch.from_numpy(targets_np.astype(np.int64))
    else:
        num_classes = 0
        targets = None
    net = FeatureNet(c, h, w, config.feature_dim, num_classes)
    init_weights(net, gen)
    net.to(device)

    x_all = to_input(images)
    x_train = x_all[torch.from_numpy(train_idx)]
    y_train = targets[torch.from_numpy(train_idx)] if targets is not None else None
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps)

    net.train()
    step = 0
    while step < total_steps:
        batches = torch.randperm(len(train_idx), generator=gen).split(config.batch_size)
        for batch in batches:
            if step >= total_steps:
                break
            xb = x_train[batch].to(device)
            out = net(xb)
            if y_train is not None:
                loss = nn.functional.cross_entropy(out, y_train[batch].to(device))
            else:
                loss = nn.functional.mse_loss(out, (xb.flatten(1) + 1.0) / 2.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    net.eval()

    record: dict[str, Any] = {
        "mode": mode,
        "num_train": int(len(train_idx)),
        "num_holdout": int(n_hold),
        "num_steps": int(total_steps),
        "num_classes": num_classes,
    }
    x_hold = x_all[torch.from_numpy(hold_idx)]
    with torch.no_grad():
        outs = torch.cat([net(xb.to(device)).cpu() for xb in x_hold.split(512)])
    if mode == MODE_CLASSIFIER:
        y_hold = targets[torch.from_numpy(hold_idx)]
        record["heldout_accuracy"] = float((outs.argmax(1) == y_hold).float().mean())
        record["heldout_recon_mse"] = None
    else:
        record["heldout_accuracy"] = None
        record["heldout_recon_mse"] = float(((outs - (x_hold.flatten(1) + 1.0) / 2.0) ** 2).mean())
    return net, record


# ---- cache -----------------------------------------------------------------------------------------------
def entry_dir(root: Path, key: str) -> Path:
    return root / "feature-nets" / key[:24]


def save_entry(directory: Path, net: FeatureNet, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` then ``meta.json`` (with the weights' SHA-256), each atomically."""
    from safetensors.torch import save_file

    weights = directory / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(weights, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_json(directory / "meta.json", {**meta, "weights_sha256": sha256_file(weights)})


def load_entry(directory: Path, key: str, build: Any) -> tuple[FeatureNet, dict[str, Any]] | None:
    """Load a cached net, or ``None`` when absent; a damaged or mismatched entry warns and returns ``None``.

    ``build(meta)`` makes an untrained net of the recorded shape to load the weights into.
    """
    meta_path, weights = directory / "meta.json", directory / "model.safetensors"
    if not meta_path.exists() and not weights.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            raise ValueError(f"key {meta.get('key')!r} does not match")
        if sha256_file(weights) != meta.get("weights_sha256"):
            raise ValueError("weights checksum does not match meta.json")
        net = build(meta)
        net.load_state_dict(load_safetensors(weights, "feature-network weights"), strict=True)
    except Exception as exc:  # any failure means "do not trust it": retrain and overwrite
        warnings.warn(
            f"ignoring damaged feature-network cache entry {directory}: {exc}; retraining",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    net.eval()
    return net, meta
