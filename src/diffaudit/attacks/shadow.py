"""Target and shadow models for membership inference: the candidate pool, memberships, and one shard per model.

Carlini et al. (2023, Sec. 5) train every model on a random half of a candidate pool, so each model is a
shadow for the others. Here model 0 is the target (unless the user brings one) and models 1..K are shadows.
Models are fitted by a :class:`~diffaudit.generators.base.Trainer` of the audited family: diffaudit's class U-Net
from scratch, an analytic Gaussian/GMM in closed form, or a LoRA fine-tune of a user's text-to-image pipeline.

One model is one unit of work, a *shard*: :func:`run_shard` is a pure function of ``(config, setup, index)`` that
fits the model on its half and writes its per-sample losses ``float32 (N, T, V)`` to
``models/<name>/mia-losses.npz`` (keyed by everything that determines them, so a finished shard is never redone).
:func:`merge_shards` stacks them by index into the samples x models layout of ml_privacy_meter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.attacks import gsa, mia, pia, secmi
from diffaudit.attacks.mia_queries import QUERY_ATTACKS, check_attacks
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator, Trainer
from diffaudit.io import atomic_path

LOSSES_FILE = "mia-losses.npz"
MODEL_SUBDIR = "model"
TARGET_NAME = "target"


@dataclass(frozen=True)
class MiaConfig:
    """Settings of one membership-inference run (all recorded in the run's config.json).

    ``steps``: optimizer steps per trained model (None: the trainer's default, see
    :func:`diffaudit.attacks.mia_setup.build_setup`). ``keep_models``: save every shadow's weights next to its
    losses (the target is always kept, for the Wen detector); a shard's output is its losses either way.
    ``query_attacks``: the attacks run on the target besides loss/LiRA (PIA, PIAN, SecMI, GSA), with their
    papers' defaults ``pia_t``, ``secmi_t``, ``secmi_k`` and the number of GSA timesteps.
    """

    num_shadows: int = 8
    timesteps: tuple[int, ...] = mia.DEFAULT_TIMESTEPS
    noise_draws: int = 20
    flip: bool = False
    pool_size: int | None = None
    selection_fraction: float = 0.3
    fix_variance: bool = True
    seed: int = 0
    batch_size: int = 512
    steps: int | None = None
    keep_models: bool = True
    query_attacks: tuple[str, ...] = QUERY_ATTACKS
    pia_t: int = pia.PIA_T
    secmi_t: int = secmi.SECMI_T
    secmi_k: int = secmi.SECMI_K
    gsa_timesteps: int = gsa.GSA_NUM_TIMESTEPS

    def validate(self) -> None:
        if self.num_shadows < 0 or self.num_shadows == 1:
            raise ConfigError(f"num_shadows must be 0 (loss threshold only) or >= 2, got {self.num_shadows}")
        if not self.timesteps:
            raise ConfigError("give at least one timestep")
        if self.noise_draws < 1:
            raise ConfigError(f"noise_draws must be >= 1, got {self.noise_draws}")
        if not 0.0 < self.selection_fraction < 1.0:
            raise ConfigError(f"selection_fraction must be in (0, 1), got {self.selection_fraction}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_attacks(tuple(self.query_attacks))
        if self.pia_t < 1:
            raise ConfigError(f"pia_t must be >= 1, got {self.pia_t}")
        if self.secmi_k < 1 or self.secmi_t < self.secmi_k or self.secmi_t % self.secmi_k:
            raise ConfigError(f"secmi_t={self.secmi_t} must be a positive multiple of secmi_k={self.secmi_k}")
        if self.gsa_timesteps < 1:
            raise ConfigError(f"gsa_timesteps must be >= 1, got {self.gsa_timesteps}")

    def query_params(self) -> dict[str, int]:
        """Parameters of the attacks beyond loss/LiRA (:func:`diffaudit.attacks.mia_queries.run_query_attacks`)."""
        return {
            "pia_t": self.pia_t,
            "secmi_t": self.secmi_t,
            "secmi_k": self.secmi_k,
            "gsa_timesteps": self.gsa_timesteps,
        }


@dataclass
class MiaSetup:
    """What is attacked: the candidate pool, the trainer of shadows, and the target.

    ``pool``: deduplicated candidates, labels indexing ``pool.class_names`` (classes, or captions).
    ``trainer`` fits every trained model for ``steps`` steps, starting from ``init`` (None: from scratch).
    ``target``: the user's model, with ``target_members`` ``bool (N,)``; None: model 0 is trained here on a
    random half. Training seeds are ``train_seed + 1000 * config.seed + index`` (target index 0, shadow k: k+1).
    ``wen_conditions``: the conditions Wen's detector scores on the target (None: all of its conditions).
    """

    pool: ImageSet
    trainer: Trainer
    steps: int
    init: Generator | None = None
    target: Generator | None = None
    target_members: np.ndarray | None = None
    train_seed: int = 0
    pool_info: dict[str, Any] = field(default_factory=dict)
    wen_conditions: tuple[str, ...] | None = None
    describe: dict[str, Any] = field(default_factory=dict)


# ---- pool and membership --------------------------------------------------------------------------------------
def prepare_pool(data: ImageSet, pool_size: int | None, seed: int) -> tuple[ImageSet, dict[str, int]]:
    """Deduplicate ``data`` by content id (a duplicate could be IN and OUT at once) and draw ``pool_size``."""
    _, first = np.unique(data.ids, return_index=True)
    first = np.sort(first)
    info = {"source_images": len(data), "duplicates_removed": len(data) - len(first)}
    if pool_size is not None:
        if not 4 <= pool_size <= len(first):
            raise ConfigError(f"pool_size {pool_size} must be in [4, {len(first)}] (unique images in the data)")
        first = np.sort(np.random.default_rng([seed, 7]).choice(first, size=pool_size, replace=False))
    info["pool_size"] = len(first)
    return data.subset(first), info


def random_halves(num_samples: int, num_models: int, seed: int) -> np.ndarray:
    """Membership matrix ``bool (num_models, num_samples)``: model ``m`` trains on a seeded random half."""
    out = np.zeros((num_models, num_samples), dtype=bool)
    for m in range(num_models):
        out[m, np.random.default_rng([seed, 11, m]).permutation(num_samples)[: num_samples // 2]] = True
    return out


def selection_mask(num_samples: int, fraction: float, seed: int) -> np.ndarray:
    """``bool (N,)``: the candidates used only to choose the timestep (never in reported numbers)."""
    mask = np.zeros(num_samples, dtype=bool)
    mask[np.random.default_rng([seed, 13]).permutation(num_samples)[: round(num_samples * fraction)]] = True
    return mask


def membership(config: MiaConfig, setup: MiaSetup) -> tuple[np.ndarray, np.ndarray]:
    """Target membership ``bool (N,)`` and the trained models' matrix ``bool (M, N)`` (index = shard index).

    Without a user target, row 0 is the target's half and rows 1..K the shadows'; with one, rows 0..K-1 are the
    shadows' (shard index 0 is then unused: shadows keep indices 1..K and their seeds).
    """
    n = len(setup.pool)
    if setup.target is None:
        matrix = random_halves(n, config.num_shadows + 1, config.seed)
        return matrix[0], matrix
    if setup.target_members is None or setup.target_members.shape != (n,):
        raise ConfigError("a user-supplied target needs a membership flag per pool image")
    shadows = random_halves(n, config.num_shadows, config.seed)
    return setup.target_members.astype(bool), np.concatenate([np.zeros((1, n), bool), shadows])


def shard_name(index: int) -> str:
    """``target`` for index 0, ``shadow-XX`` for index ``XX + 1``."""
    return TARGET_NAME if index == 0 else f"shadow-{index - 1:02d}"


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def _query_key(config: MiaConfig, pool: ImageSet) -> list[object]:
    return [pool.ids.tolist(), [int(t) for t in config.timesteps], config.noise_draws, config.flip, config.seed]


def shard_key(config: MiaConfig, setup: MiaSetup, index: int) -> str:
    """Everything that determines shard ``index``'s losses (trainer, start model, members, steps, seed, query)."""
    _, matrix = membership(config, setup)
    members = sorted(setup.pool.ids[matrix[index]].tolist())
    init_id = None if setup.init is None else setup.init.model_id
    seed = shard_seed(config, setup, index)
    return _digest(setup.trainer.describe(), init_id, members, setup.steps, seed, _query_key(config, setup.pool))


def shard_seed(config: MiaConfig, setup: MiaSetup, index: int) -> int:
    return setup.train_seed + 1000 * config.seed + index


def read_losses(path: Path, key: str) -> tuple[np.ndarray, str] | None:
    """Cached ``(losses (N, T, V), model id)`` at ``path`` when it was written for ``key``; else None."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            return None
        return z["losses"], str(z["model_id"])


def write_losses(path: Path, key: str, losses: np.ndarray, model_id: str, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, key=np.array(key), losses=losses, model_id=np.array(model_id), ids=ids)


def run_shard(
    config: MiaConfig, setup: MiaSetup, index: int, models_dir: Path, show_progress: bool = False
) -> tuple[Path, bool]:
    """Fit model ``index`` on its half of the pool and write its losses; returns the losses file and whether
    the model was fitted in this call (False: the shard was already done)."""
    work = Path(models_dir) / shard_name(index)
    path, key = work / LOSSES_FILE, shard_key(config, setup, index)
    if read_losses(path, key) is not None:
        return path, False
    _, matrix = membership(config, setup)
    train_set = setup.pool.subset(np.flatnonzero(matrix[index]))
    work.mkdir(parents=True, exist_ok=True)
    model = setup.trainer.fit(train_set, setup.init, setup.steps, shard_seed(config, setup, index), work)
    if index == 0 or config.keep_models:
        setup.trainer.save(model, work / MODEL_SUBDIR)
    losses = mia.sample_losses(
        model, setup.pool, config.timesteps, config.noise_draws, config.flip, config.seed, config.batch_size,
        show_progress,
    )  # fmt: skip
    write_losses(path, key, losses, model.model_id, setup.pool.ids)
    return path, True


def target_losses(config: MiaConfig, setup: MiaSetup, cache: Path, show_progress: bool = False) -> np.ndarray:
    """Losses ``(N, T, V)`` of the user's target on the pool, cached in ``cache`` (keyed by model id and query)."""
    if setup.target is None:
        raise ConfigError("no user target in this setup")
    key = _digest(setup.target.model_id, _query_key(config, setup.pool))
    cached = read_losses(cache, key)
    if cached is not None:
        return cached[0]
    losses = mia.sample_losses(
        setup.target, setup.pool, config.timesteps, config.noise_draws, config.flip, config.seed, config.batch_size,
        show_progress,
    )  # fmt: skip
    write_losses(cache, key, losses, setup.target.model_id, setup.pool.ids)
    return losses


def merge_shards(paths: list[Path], ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Stack shard losses by index: ``float32 (N, M, T, V)`` (samples x models) and the model ids.

    Every shard must have scored exactly ``ids`` (the pool, in order); a stale or foreign file is a DataError.
    """
    out, model_ids = [], []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            if not np.array_equal(z["ids"], ids):
                raise DataError(f"{p}: losses of other candidates than this run's pool")
            out.append(z["losses"])
            model_ids.append(str(z["model_id"]))
    if not out:
        return np.zeros((len(ids), 0, 0, 0), np.float32), []
    return np.stack(out, axis=1), model_ids
