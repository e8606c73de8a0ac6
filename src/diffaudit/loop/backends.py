"""Generative backends the loop engine retrains: the diffusion model, and analytic Gaussian / GMM baselines.

Every backend has the same interface, so one engine runs them all:

* ``fit(train, init, workdir, generation, seed) -> model``: train on an ImageSet (``init``: the previous
  generation's model, for fine-tuning; analytic fits ignore or warm-start from it);
* ``sample(model, labels, seeds, generation) -> ImageSet``: image ``i`` depends only on ``seeds[i]`` and
  ``labels[i]``; provenance records synthetic, generation, model id and seed;
* ``save(model, directory)`` / ``load(directory)``: safetensors + JSON, never pickles;
* ``stats(model) -> dict``: numbers describing the fitted model (e.g. the fitted variance the theory predicts);
* ``describe() -> dict``: the backend's settings, for config.json.

The analytic backends see an image as its flattened pixels in [0, 1] (float64). They fit by maximum likelihood
(``ddof = 0``), which is what the variance-collapse theory of Shumailov et al. assumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import CheckpointError, ConfigError
from diffaudit.io import atomic_path, atomic_write_json

DIFFUSION = "diffusion"
GAUSSIAN = "gaussian"
GMM = "gmm"
BACKENDS = (DIFFUSION, GAUSSIAN, GMM)
#: Ridge added to covariances before the Cholesky factorisation (degenerate pixels, e.g. digits' black border).
COV_RIDGE = 1e-6


class Backend(Protocol):
    name: str

    def fit(self, train: ImageSet, init: Any, workdir: Path | None, generation: int, seed: int) -> Any: ...

    def sample(self, model: Any, labels: np.ndarray, seeds: Sequence[int], generation: int) -> ImageSet: ...

    def save(self, model: Any, directory: Path) -> None: ...

    def load(self, directory: Path) -> Any: ...

    def stats(self, model: Any) -> dict[str, float]: ...

    def describe(self) -> dict[str, Any]: ...


# ---- analytic backends ------------------------------------------------------------------------------------
@dataclass
class AnalyticModel:
    """Per-class mixtures: ``weights[c] (K,)``, ``means[c] (K, D)``, ``covs[c] (K, D, D)`` in pixel units [0, 1]."""

    classes: list[int]
    weights: list[np.ndarray]
    means: list[np.ndarray]
    covs: list[np.ndarray]
    shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    model_id: str = ""

    def compute_id(self) -> str:
        h = hashlib.sha256()
        for arr in [*self.weights, *self.means, *self.covs]:
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
        h.update(repr(self.classes).encode())
        return h.hexdigest()[:16]


def _flatten(images: ImageSet) -> np.ndarray:
    return images.images.reshape(len(images), -1).astype(np.float64) / 255.0


def _groups(train: ImageSet) -> list[tuple[int, np.ndarray]]:
    """(label, rows) per class; one group labelled -1 when the set is unlabelled."""
    x = _flatten(train)
    if not train.is_labelled:
        return [(-1, x)]
    return [(int(c), x[train.labels == c]) for c in np.unique(train.labels)]


class _AnalyticBackend:
    name = ""

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature >= 0:
            raise ConfigError(f"temperature={temperature!r} must be >= 0")
        self.temperature = float(temperature)

    def _fit_group(self, x: np.ndarray, init: tuple[np.ndarray, np.ndarray] | None, seed: int):  # pragma: no cover
        raise NotImplementedError

    def fit(self, train: ImageSet, init: Any, workdir: Path | None, generation: int, seed: int) -> AnalyticModel:
        if len(train) == 0:
            raise ConfigError(f"generation {generation}: empty training set")
        classes, weights, means, covs = [], [], [], []
        for label, x in _groups(train):
            prior = None
            if isinstance(init, AnalyticModel) and label in init.classes:
                i = init.classes.index(label)
                prior = (init.weights[i], init.means[i])
            w, m, c = self._fit_group(x, prior, seed)
            classes.append(label)
            weights.append(w)
            means.append(m)
            covs.append(c)
        model = AnalyticModel(classes, weights, means, covs, train.shape, train.class_names)
        model.model_id = f"{self.name}-{model.compute_id()}"
        return model

    def sample(self, model: AnalyticModel, labels: np.ndarray, seeds: Sequence[int], generation: int) -> ImageSet:
        labels = np.asarray(labels, dtype=np.int64)
        seeds = [int(s) for s in seeds]
        if len(labels) != len(seeds):
            raise ConfigError(f"got {len(labels)} labels for {len(seeds)} seeds")
        d = int(np.prod(model.shape))
        chol = [np.stack([np.linalg.cholesky(c + COV_RIDGE * np.eye(d)) for c in group]) for group in model.covs]
        out = np.empty((len(seeds), d))
        for i, (label, seed) in enumerate(zip(labels, seeds, strict=True)):
            key = int(label) if int(label) in model.classes else (-1 if -1 in model.classes else None)
            if key is None:
                raise ConfigError(f"label {label} was not in this model's training data (classes {model.classes})")
            g = model.classes.index(key)
            rng = np.random.default_rng([seed, 7])  # image i depends on its seed only
            k = int(rng.choice(len(model.weights[g]), p=model.weights[g])) if len(model.weights[g]) > 1 else 0
            # Temperature scales the deviation from the component mean: the analytic analogue of truncation.
            out[i] = model.means[g][k] + self.temperature * (chol[g][k] @ rng.standard_normal(d))
        images = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(len(seeds), *model.shape)
        return ImageSet(
            images,
            labels,
            model.class_names,
            {
                "source": f"model:{model.model_id}",
                "synthetic": True,
                "generation": generation,
                "model_id": model.model_id,
                "seed": np.array(seeds, dtype=np.int64),
            },
        )

    def save(self, model: AnalyticModel, directory: Path) -> None:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(len(model.classes)):
            tensors[f"{i}.weights"] = model.weights[i]
            tensors[f"{i}.means"] = model.means[i]
            tensors[f"{i}.covs"] = model.covs[i]
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(tmp))
        atomic_write_json(
            directory / "config.json",
            {
                "backend": self.name,
                "classes": model.classes,
                "shape": list(model.shape),
                "class_names": list(model.class_names),
                "model_id": model.model_id,
            },
        )

    def load(self, directory: Path) -> AnalyticModel:
        from safetensors.numpy import load_file

        try:
            meta = json.loads((directory / "config.json").read_text())
            t = load_file(str(directory / "model.safetensors"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory}: cannot load the {self.name} model ({exc})") from exc
        if meta.get("backend") != self.name:
            raise CheckpointError(f"{directory}: holds a {meta.get('backend')!r} model, not {self.name!r}")
        n = len(meta["classes"])
        return AnalyticModel(
            [int(c) for c in meta["classes"]],
            [t[f"{i}.weights"] for i in range(n)],
            [t[f"{i}.means"] for i in range(n)],
            [t[f"{i}.covs"] for i in range(n)],
            tuple(meta["shape"]),
            tuple(meta["class_names"]),
            meta["model_id"],
        )

    def stats(self, model: AnalyticModel) -> dict[str, float]:
        """``fitted_variance``: mean over classes and pixels of the fitted per-pixel variance (pixels in [0, 1])."""
        per_class = []
        for w, m, c in zip(model.weights, model.means, model.covs, strict=True):
            mix_mean = (w[:, None] * m).sum(0)
            # Variance of a mixture = mean of component variances + variance of component means.
            var = (w[:, None] * (np.diagonal(c, axis1=1, axis2=2) + (m - mix_mean) ** 2)).sum(0)
            per_class.append(var.mean())
        return {
            "fitted_variance": float(np.mean(per_class)),
            "fitted_mean": float(np.mean([m.mean() for m in model.means])),
        }

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "temperature": self.temperature, "cov_ridge": COV_RIDGE}


class GaussianBackend(_AnalyticBackend):
    """One full-covariance Gaussian per class, fitted by maximum likelihood (closed form; ``init`` unused)."""

    name = GAUSSIAN

    def _fit_group(self, x, init, seed):
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / len(x)  # MLE (ddof = 0): the estimator the collapse theory is about
        return np.ones(1), mean[None], cov[None]


class GMMBackend(_AnalyticBackend):
    """A Gaussian mixture per class (scikit-learn EM); fine-tuning warm-starts EM from the previous means."""

    name = GMM

    def __init__(self, temperature: float = 1.0, components: int = 3, reg_covar: float = 1e-4) -> None:
        super().__init__(temperature)
        if not isinstance(components, int) or components < 1:
            raise ConfigError(f"gmm components={components!r} must be a positive integer")
        self.components = components
        self.reg_covar = float(reg_covar)

    def _fit_group(self, x, init, seed):
        from sklearn.mixture import GaussianMixture

        k = min(self.components, len(x))
        kwargs: dict[str, Any] = {}
        if init is not None and len(init[1]) == k:
            kwargs = {"weights_init": init[0] / init[0].sum(), "means_init": init[1]}
        gm = GaussianMixture(k, covariance_type="full", reg_covar=self.reg_covar, random_state=seed, **kwargs)
        gm.fit(x)
        return gm.weights_ / gm.weights_.sum(), gm.means_, gm.covariances_

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"components": self.components, "reg_covar": self.reg_covar}


# ---- diffusion backend ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionHandle:
    """A trained diffusion model directory (loaded lazily)."""

    path: Path
    model_id: str


class DiffusionBackend:
    """diffaudit's class-conditional diffusion model, trained with :func:`diffaudit.train.train`.

    Generation 0 trains from scratch for ``base_steps``; later generations train ``steps_per_generation`` steps,
    fine-tuning the previous generation's model (``retrain="finetune"``, as Bohacek & Farid fine-tune the
    U-Net) or from scratch (``retrain="scratch"``, then also for ``base_steps``).
    """

    name = DIFFUSION

    def __init__(
        self,
        preset,  # diffaudit.config.Preset
        base_steps: int,
        steps_per_generation: int,
        retrain: str = "finetune",
        guidance_scale: float = 2.0,
        temperature: float = 1.0,
        sample_steps: int = 25,
        show_progress: bool = False,
    ) -> None:
        if retrain not in ("finetune", "scratch"):
            raise ConfigError(f"retrain={retrain!r} must be 'finetune' or 'scratch'")
        for name, v in (("base_steps", base_steps), ("steps_per_generation", steps_per_generation)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        self.preset = preset
        self.base_steps = base_steps
        self.steps_per_generation = steps_per_generation
        self.retrain = retrain
        self.sample_cfg = dataclasses.replace(
            preset.sample, guidance_scale=float(guidance_scale), temperature=float(temperature), num_steps=sample_steps
        )
        self.show_progress = show_progress

    def fit(self, train: ImageSet, init: Any, workdir: Path | None, generation: int, seed: int) -> DiffusionHandle:
        from diffaudit.runs import RunDir
        from diffaudit.train import train as train_model

        if workdir is None:
            raise ConfigError("the diffusion backend needs a working directory")
        finetune = self.retrain == "finetune" and generation > 0 and init is not None
        steps = self.steps_per_generation if finetune else self.base_steps
        preset = dataclasses.replace(
            self.preset, train=dataclasses.replace(self.preset.train, steps=steps, seed=int(seed) % (2**31))
        )
        run_path = workdir / "train"
        with RunDir(run_path, kind="train") as run:
            model_id = train_model(
                preset, train, run, init=init.path if finetune else None, show_progress=self.show_progress
            )
        final = workdir / "model"
        if final.exists():
            shutil.rmtree(final)
        os.replace(run_path / "model", final)
        shutil.rmtree(run_path / "checkpoints", ignore_errors=True)  # only the final model matters per generation
        return DiffusionHandle(final, model_id)

    def sample(self, model: DiffusionHandle, labels: np.ndarray, seeds: Sequence[int], generation: int) -> ImageSet:
        from diffaudit.models.checkpoint import load_model
        from diffaudit.sampling import generate

        net, meta = load_model(model.path)
        names = meta.get("class_names") or []
        return generate(net, model.model_id, labels, seeds, self.sample_cfg, names, generation, self.show_progress)

    def save(self, model: DiffusionHandle, directory: Path) -> None:
        if model.path.resolve() != directory.resolve():
            if directory.exists():
                shutil.rmtree(directory)
            shutil.copytree(model.path, directory)

    def load(self, directory: Path) -> DiffusionHandle:
        from diffaudit.models.checkpoint import read_model_config

        meta = read_model_config(directory)
        return DiffusionHandle(directory, str(meta.get("model_id", "")))

    def stats(self, model: DiffusionHandle) -> dict[str, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "diffusion_preset": self.preset.to_dict(),
            "base_steps": self.base_steps,
            "steps_per_generation": self.steps_per_generation,
            "retrain": self.retrain,
            "sample": dataclasses.asdict(self.sample_cfg),
        }
