"""The Generator and Trainer protocols: every audit in diffaudit is written once, over these two.

A **Generator** is a trained image model seen from outside:

* ``conditions``: the names of the conditions it samples from (class names, or prompts); a condition is passed
  as an ``int64`` index into that tuple, and :data:`NULL_CONDITION` (-1) is the null (unconditional) condition
  that classifier-free guidance contrasts with.
* ``sample(labels, seeds, ...) -> ImageSet``: image ``i`` depends only on ``labels[i]``, ``seeds[i]`` (and
  ``init[i]`` for image-to-image), never on the batch it was drawn in. Provenance (model id, seed, generation)
  is filled in.
* ``denoising_losses(images, labels, timesteps, noise_seeds) -> float32 (N, T)``: the training objective per
  image at fixed timesteps with per-image seeded noise (membership inference).
* ``guidance_gap(labels, seeds, ...) -> float64 (N,)``: Wen et al.'s memorization statistic.
* ``describe() -> dict``: what was loaded, for run configs.

A **Trainer** fits a Generator to an ImageSet (from scratch, or fine-tuning ``init``) and saves/loads it as a
directory of safetensors + JSON. Implementations: :mod:`.classcond` (diffaudit's class-conditional U-Net),
:mod:`.pipeline` (a user's diffusers text-to-image directory, in VAE latent space), :mod:`.analytic` (Gaussian
and Gaussian-mixture models with closed-form denoisers, for the loop's theory checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet

#: Label of the null condition (classifier-free guidance's unconditional branch).
NULL_CONDITION = -1
#: Offset between a seed's initial-noise stream and its stochastic-sampler-step stream.
STEP_SEED_OFFSET = 1_000_003
#: Offset between a seed's initial-noise stream and its image-to-image forward-noise stream.
IMG2IMG_SEED_OFFSET = 2_000_003


@runtime_checkable
class Generator(Protocol):
    """A trained image generator every audit can run on (see the module docstring for the contract)."""

    model_id: str
    conditions: tuple[str, ...]
    image_shape: tuple[int, int, int]
    num_train_timesteps: int
    #: The guidance a user of this family expects when they do not say (SD pipelines: 7.5; our models: 2.0).
    default_guidance_scale: float

    def sample(
        self,
        labels: np.ndarray,
        seeds: Sequence[int],
        *,
        init: np.ndarray | None = None,
        strength: float = 1.0,
        sampler: str = "ddim",
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        batch_size: int = 64,
        generation: int = -1,
        show_progress: bool = False,
    ) -> ImageSet: ...

    def denoising_losses(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        timesteps: Sequence[int],
        noise_seeds: Sequence[int],
        *,
        flip: bool = False,
        batch_size: int = 64,
    ) -> np.ndarray: ...

    def guidance_gap(
        self,
        labels: np.ndarray,
        seeds: Sequence[int],
        *,
        num_steps: int = 50,
        measure_steps: int = 10,
        guidance_scale: float = 2.0,
        batch_size: int = 64,
    ) -> np.ndarray: ...

    def with_conditions(self, conditions: Sequence[str]) -> Generator: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Trainer(Protocol):
    """Fits generators of one family. ``fit`` never mutates ``init``; ``save``/``load`` use safetensors + JSON."""

    family: str

    def fit(self, train_set: ImageSet, init: Generator | None, steps: int, seed: int, workdir: Path) -> Generator: ...

    def save(self, generator: Generator, directory: Path) -> None: ...

    def load(self, directory: Path) -> Generator: ...

    def describe(self) -> dict[str, Any]: ...


# ---- helpers every implementation shares --------------------------------------------------------------------
def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """Standard normal ``float32 (len(seeds), *shape)`` on the CPU; row ``i`` depends only on ``seeds[i]``.

    The one seeded-noise function of diffaudit (EDM's per-sample generator idea): noise is drawn on the CPU and
    moved, so a seed names the same noise on every device.
    """
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    if not rows:
        return torch.zeros((0, *shape))
    return torch.stack(rows)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images ``float (N, C, H, W)`` in [-1, 1] -> ``uint8`` numpy, rounding as every boundary does."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def to_model_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 (N, C, H, W)`` -> ``float32`` in [-1, 1] (the models' input range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)


def synthetic_set(
    images: np.ndarray,
    labels: np.ndarray,
    conditions: Sequence[str],
    model_id: str,
    seeds: Sequence[int],
    generation: int = -1,
) -> ImageSet:
    """A generated ImageSet with full provenance (source ``model:<id>``, synthetic, per-image seed)."""
    return ImageSet(
        images,
        np.asarray(labels, dtype=np.int64),
        tuple(conditions),
        {
            "source": f"model:{model_id}",
            "synthetic": True,
            "generation": generation,
            "model_id": model_id,
            "seed": np.asarray(list(seeds), dtype=np.int64),
        },
    )


def check_requests(labels: np.ndarray, seeds: Sequence[int], num_conditions: int) -> np.ndarray:
    """Validate one label per seed, labels in ``[-1, num_conditions)``; returns ``int64 (N,)`` labels."""
    from diffaudit.errors import ConfigError

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(seeds):
        raise ConfigError(f"got {len(labels)} labels for {len(seeds)} seeds")
    if labels.size and (labels.min() < NULL_CONDITION or labels.max() >= num_conditions):
        raise ConfigError(
            f"labels must index the {num_conditions} conditions (or be -1 for the null condition); "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    return labels
