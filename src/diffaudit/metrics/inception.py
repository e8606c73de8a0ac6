"""Inception-v3 pool features for FID, in plain torch, from a local safetensors weights file only.

The network is the *FID variant* of Inception-v3: the 2015-12-05 TensorFlow graph that the original FID code
uses, as ported to PyTorch by pytorch-fid. It differs from torchvision's Inception3 in its pooling branches:
the ``Mixed_5*``, ``Mixed_6b..e`` and ``Mixed_7b`` blocks average-pool without counting the zero padding
(TensorFlow's ``avg_pool``), and ``Mixed_7c`` max-pools. Features are the 2048-d global average pool after
``Mixed_7c`` ("pool3"). Images are scaled to [0, 1], grey ones repeated to three channels, resized bilinearly
to 299x299 (``align_corners=False``, no antialiasing), then mapped to [-1, 1], as pytorch-fid does.

Parameter names are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...),
the names in pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``. diffaudit never downloads weights and
never unpickles: the user converts that file to safetensors once, on a machine where they trust it (see
docs/metrics.md), and passes ``weights=PATH.safetensors``. The classifier head (``fc.*``) is ignored.

Nothing here checks that the weights are the real FID ones (only their names and shapes); the sha256 of the
file is recorded in :meth:`InceptionExtractor.describe` so that results say which file made them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffaudit.errors import CheckpointError, ConfigError, DataError
from diffaudit.metrics.features import INCEPTION, FeatureExtractor
from diffaudit.safeload import load_safetensors, refuse_pickle_file, sha256_file

INPUT_SIZE = 299
FEATURE_DIM = 2048
# Images per forward pass inside one extractor batch: a 299x299 batch costs ~30 MB of activations per image.
CHUNK = 16
# Keys that may be present in the file and are not used (the 1008-way classifier head of the FID graph).
IGNORED_PREFIXES = ("fc.",)
# BatchNorm's step counter: absent from some exported state dicts, unused in eval mode.
OPTIONAL_SUFFIX = ".num_batches_tracked"
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
NOTE = (
    "Inception-v3 (FID variant) pool3 features; comparable with published FIDs only if the weights file is "
    f"pytorch-fid's {FID_WEIGHTS_NAME} converted to safetensors (check weights_sha256 against a trusted copy)"
)


# ---- architecture --------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; parameters ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **kw: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that ignores the zero padding, like TensorFlow's."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches; out 224 + pool_features."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class BlockB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): stride-2 3x3, stride-2 double 3x3, stride-2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class BlockC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 1x7 / 7x1 convolutions; out 768."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            c = layer(c)
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class BlockD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class BlockE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 outputs; out 2048.

    ``pool="avg"`` (Mixed_7b) averages without the padding; ``pool="max"`` (Mixed_7c) max-pools, as the FID
    graph does (torchvision averages in both).
    """

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(pooled)
        return torch.cat([a, b, c, d], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to the pool3 features (no classifier head, no auxiliary head).

    :meth:`features` takes float images in [0, 1], ``(N, 1 or 3, H, W)``, and returns ``(N, 2048)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: images already at 299x299 in [-1, 1] -> ``(N, 2048)``."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] ``(N, 1 or 3, H, W)`` -> pool3 features ``(N, 2048)``."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise DataError(f"Inception takes 1 or 3 channels; got {images.shape[1]}")
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.forward(x * 2.0 - 1.0)


# ---- loading ---------------------------------------------------------------------------------------------
def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def resolve_weights(weights: str | os.PathLike[str] | None) -> Path:
    """Check the ``weights`` option: a path to an existing ``.safetensors`` file.

    Raises:
        ConfigError: no path given, or the file does not exist.
        CheckpointError: a pickle format (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.pkl``) or not ``.safetensors``.
    """
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        raise ConfigError(
            "the 'inception' feature extractor needs a local weights file and never downloads one: pass "
            "--feature-option weights=PATH.safetensors (in Python: get_extractor('inception', reference, "
            f"weights=PATH)), made once from pytorch-fid's {FID_WEIGHTS_NAME} with the conversion script in "
            "docs/metrics.md. Without Inception weights, use --features classifier (a CNN trained on the "
            "reference set) or random-cnn."
        )
    if not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(f"inception option weights={weights!r} must be a path to a .safetensors file")
    path = Path(weights).expanduser()
    refuse_pickle_file(
        path,
        "inception weights file",
        "Convert it to safetensors once, on a machine where you trust it (the 5-line script in docs/metrics.md, "
        "'Inception'), then pass weights=PATH.safetensors",
    )
    suffix = path.suffix.lower()
    if suffix != ".safetensors":
        raise CheckpointError(
            f"inception weights {str(path)!r} must be a .safetensors file (see docs/metrics.md for the conversion)"
        )
    if not path.is_file():
        raise ConfigError(f"inception weights file {str(path)!r} does not exist (option weights=PATH.safetensors)")
    return path


def load_fid_inception(path: Path) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load ``path`` (safetensors) into it, checking every name and shape.

    Raises:
        CheckpointError: the file does not parse as safetensors, or keys are missing, unexpected or misshapen.
    """
    state = load_safetensors(path, "inception weights")
    net = FIDInceptionV3()
    expected = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        hint = ""
        if any(k.startswith("AuxLogits.") for k in unexpected):
            hint = (
                " (AuxLogits suggests torchvision's ImageNet Inception weights, which are not the FID ones; "
                f"use pytorch-fid's {FID_WEIGHTS_NAME})"
            )
        raise CheckpointError(
            f"inception weights {str(path)!r} do not match the FID Inception-v3 (torchvision parameter names): "
            + "; ".join(parts)
            + hint
        )
    misshapen = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in state
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if misshapen:
        raise CheckpointError(
            f"inception weights {str(path)!r} have tensors of the wrong shape: {_listing(misshapen, 3)}"
        )
    full = {k: state.get(k, v) for k, v in expected.items()}
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in full.items()})
    return net.eval()


# ---- extractor -------------------------------------------------------------------------------------------
class InceptionExtractor(FeatureExtractor):
    """FID Inception-v3 pool3 features (2048-d) from a user-supplied safetensors file."""

    name = INCEPTION

    def __init__(self, net: FIDInceptionV3, input_shape: tuple[int, int, int], path: Path, device: str) -> None:
        super().__init__(input_shape, FEATURE_DIM, None)
        self.module = net.eval().to(device)
        self.device = device
        self.weights_path = path
        self.weights_sha256 = sha256_file(path)

    def _extract(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((batch.shape[0], FEATURE_DIM), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, batch.shape[0], CHUNK):
                chunk = torch.from_numpy(np.ascontiguousarray(batch[start : start + CHUNK]))
                x = chunk.to(self.device).float().div_(255.0)
                out[start : start + CHUNK] = self.module.features(x).float().cpu().numpy()
        return out

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            {
                "weights": str(self.weights_path),
                "weights_sha256": self.weights_sha256,
                "architecture": "fid-inception-v3 (pytorch-fid / TF 2015-12-05 graph), pool3",
                "resize": f"bilinear to {INPUT_SIZE}x{INPUT_SIZE}, inputs in [-1, 1], grey repeated to RGB",
                "note": NOTE,
            }
        )
        return out


def make_inception_extractor(
    input_shape: tuple[int, int, int], weights: str | os.PathLike[str] | None, device: str = "cpu"
) -> InceptionExtractor:
    """Validate ``weights``, load it, and return the extractor (see :func:`resolve_weights` for errors)."""
    path = resolve_weights(weights)
    if input_shape[0] not in (1, 3):
        raise DataError(f"the inception extractor takes 1- or 3-channel images; got {input_shape[0]} channels")
    return InceptionExtractor(load_fid_inception(path), input_shape, path, device)
