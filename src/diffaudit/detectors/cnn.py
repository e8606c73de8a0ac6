"""A small CNN trained to tell real from generated images (Wang et al. 2020, "CNN-generated images are
surprisingly easy to spot... for now", in miniature).

Three 3x3 convolutions, the last two strided, global average pooling and one linear unit: the network sees
local texture rather than layout, which is where generator traces live, and it takes any image size. Training
is seeded end to end (weight init, batch order, flips) and runs on the CPU in seconds for the sizes diffaudit
audits; with ``augment=True`` each batch is also JPEG-compressed or down-and-up-sized at random, which trades a
little clean accuracy for robustness to re-shared images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import DataError

DEFAULT_STEPS = 300
DEFAULT_WIDTH = 16
DEFAULT_BATCH = 64
DEFAULT_LR = 3e-3


def _network(channels: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 1),
    )


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per image, at random: unchanged, JPEG (quality 60-95), or resized down by 0.5-0.9 and back."""
    from diffaudit.guards.perturb import jpeg, resize

    out = images.copy()
    choice = rng.integers(0, 3, size=len(images))
    for i in np.flatnonzero(choice == 1).tolist():
        out[i : i + 1] = jpeg(images[i : i + 1], int(rng.integers(60, 96)))
    for i in np.flatnonzero(choice == 2).tolist():
        out[i : i + 1] = resize(images[i : i + 1], float(rng.uniform(0.5, 0.9)))
    return out


class CNNDetector:
    """A seeded small CNN; ``score`` is its logit (higher = more likely generated)."""

    method: ClassVar[str] = "cnn"
    needs_training: ClassVar[bool] = True

    def __init__(
        self,
        steps: int = DEFAULT_STEPS,
        width: int = DEFAULT_WIDTH,
        batch_size: int = DEFAULT_BATCH,
        lr: float = DEFAULT_LR,
        augment: bool = False,
    ) -> None:
        self.steps, self.width, self.batch_size, self.lr = int(steps), int(width), int(batch_size), float(lr)
        self.augment = bool(augment)
        self.channels: int | None = None
        self.net: nn.Module | None = None

    def fit(self, real: ImageSet, generated: ImageSet, seed: int = 0) -> CNNDetector:
        """Train on real (0) vs generated (1) with class-balanced batches, ``steps`` Adam steps."""
        if len(real) == 0 or len(generated) == 0:
            raise DataError("a detector needs real and generated training images")
        if real.shape[0] != generated.shape[0]:
            raise DataError(f"real images have {real.shape[0]} channels, generated {generated.shape[0]}")
        if real.shape[1:] != generated.shape[1:]:
            raise DataError(f"real images are {real.shape}, generated {generated.shape}: resize them first")
        torch.manual_seed(seed)
        self.channels = real.shape[0]
        net = _network(self.channels, self.width)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        rng = np.random.default_rng(seed)
        half = max(1, self.batch_size // 2)
        for _ in range(self.steps):
            # Balanced batches: half real, half generated, drawn with replacement (sets may differ in size).
            xr = real.images[rng.integers(0, len(real), half)]
            xg = generated.images[rng.integers(0, len(generated), half)]
            x = np.concatenate([xr, xg])
            if self.augment:
                x = _augment(x, rng)
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][..., ::-1]
            y = torch.cat([torch.zeros(half), torch.ones(half)])
            logits = net(self._tensor(x))[:, 0]
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net = net.eval()
        return self

    @staticmethod
    def _tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)

    def score(self, images: ImageSet) -> np.ndarray:
        """``float64`` ``(N,)`` logits of ``images``, scored in blocks of 256."""
        if self.net is None:
            raise DataError("the CNN detector is not trained")
        if images.shape[0] != self.channels:
            raise DataError(f"the CNN detector was trained on {self.channels}-channel images; got {images.shape}")
        out = []
        with torch.no_grad():
            for start in range(0, len(images), 256):
                out.append(self.net(self._tensor(images.images[start : start + 256]))[:, 0].double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def state(self) -> dict[str, Any]:
        """Hyper-parameters (JSON); the weights come from :meth:`tensors`."""
        return {
            "steps": self.steps,
            "width": self.width,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "augment": self.augment,
            "channels": self.channels,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise DataError("the CNN detector is not trained")
        return {k: v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CNNDetector:
        det = cls(state["steps"], state["width"], state["batch_size"], state["lr"], state["augment"])
        det.channels = int(state["channels"])
        net = _network(det.channels, det.width)
        try:
            net.load_state_dict(tensors)
        except RuntimeError as exc:
            raise DataError(f"CNN detector weights do not fit its configuration: {exc}") from exc
        det.net = net.eval()
        return det

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, **self.state()}
