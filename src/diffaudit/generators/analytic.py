"""Analytic generators: one Gaussian (or Gaussian mixture) per condition, with a closed-form denoiser.

They serve the self-consuming loop's theory checks (the variance of a Gaussian refitted to its own samples
shrinks, Shumailov et al.; Alemohammad et al.'s MAD) and make every audit testable in seconds. Sampling is
exact (a draw from the fitted mixture, not a diffusion trajectory). The denoiser is the *optimal* one for the
fitted distribution under a DDPM noise schedule, so the loss-based audits (membership inference, the guidance
gap) run on these generators with the same code as on the networks. In model units ``y = 2x - 1`` (pixels ``x``
in [0, 1]), for component ``k`` with mean ``m`` and covariance ``C = U diag(lam) U^T``::

    x_t = sqrt(ab) y + sqrt(1 - ab) eps   ~  N(sqrt(ab) m, S_t),   S_t = ab C + (1 - ab) I
    E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - ab) S_t,k^-1 (x_t - sqrt(ab) m_k)

with responsibilities ``r_k`` under those Gaussians. The null condition is the mixture over all conditions,
weighted by their image counts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import CheckpointError, ConfigError
from diffaudit.generators.base import Generator, check_requests, synthetic_set
from diffaudit.generators.denoising import DenoisingGenerator
from diffaudit.io import atomic_path, atomic_write_json

GAUSSIAN = "gaussian"
GMM = "gmm"
KINDS = (GAUSSIAN, GMM)
#: Ridge added to covariances before factorising them (pixels in [0, 1]).
COV_RIDGE = 1e-6
#: The noise schedule of the closed-form denoiser: diffusers' DDPM default (linear betas 1e-4 .. 0.02).
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


@dataclass
class Mixture:
    """One condition's mixture: ``weights (K,)``, ``means (K, D)``, ``covs (K, D, D)`` in pixel units [0, 1]."""

    label: int
    count: int
    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    _eig: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    def eig(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Eigen-decomposition of each component's model-unit covariance ``4 C`` (cached)."""
        if not self._eig:
            d = self.means.shape[1]
            for c in self.covs:
                lam, u = np.linalg.eigh(4.0 * (c + COV_RIDGE * np.eye(d)))
                self._eig.append((np.maximum(lam, 0.0), u))
        return self._eig


class AnalyticGenerator(DenoisingGenerator):
    """Per-condition Gaussian mixtures; ``kind`` is ``gaussian`` or ``gmm`` (only for ids and descriptions)."""

    pixel_space = True
    #: Exact sampling ignores guidance; 1 states that in run records.
    default_guidance_scale = 1.0

    def __init__(self, kind: str, mixtures: list[Mixture], shape: tuple[int, int, int], class_names: Sequence[str]):
        self.kind = kind
        self.mixtures = mixtures
        self.image_shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.latent_shape = self.image_shape
        self.conditions = tuple(str(c) for c in class_names)
        self.conditional = any(m.label >= 0 for m in mixtures)
        self.scheduler_config = dict(SCHEDULE)
        self.model_id = f"{kind}-{self.compute_id()}"
        self.path: Path | None = None
        self._alphas: np.ndarray | None = None

    def compute_id(self) -> str:
        h = hashlib.sha256()
        # All weights, then all means, then all covariances: the order ids were always hashed in.
        for part in ("weights", "means", "covs"):
            for m in self.mixtures:
                h.update(np.ascontiguousarray(getattr(m, part), dtype=np.float64).tobytes())
        h.update(repr([m.label for m in self.mixtures]).encode())
        return h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def _mixture(self, label: int) -> Mixture | None:
        """The fitted mixture of ``label``; None for the null condition (handled by the pooled mixture)."""
        for m in self.mixtures:
            if m.label == label:
                return m
        if label < 0 or not self.conditional:
            return None
        raise ConfigError(f"label {label} was not in this model's training data (labels {self.labels})")

    @property
    def labels(self) -> list[int]:
        return [m.label for m in self.mixtures]

    # ---- exact sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        labels: np.ndarray,
        seeds: Sequence[int],
        *,
        init: np.ndarray | None = None,
        strength: float = 1.0,
        sampler: str = "exact",
        num_steps: int = 0,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        batch_size: int = 0,
        generation: int = -1,
        show_progress: bool = False,
    ) -> ImageSet:
        """Exact draws: image ``i`` from ``labels[i]``'s mixture with ``np.random.default_rng([seeds[i], 7])``.

        ``temperature`` scales the deviation from the component mean (the analytic analogue of truncation).
        With ``init`` (image-to-image at ``strength``) the image is the exact posterior draw of ``x_0`` given the
        init image noised to ``t = strength * T``. Sampler, steps, guidance and batch size do not apply.
        """
        seeds = [int(s) for s in seeds]
        labels = check_requests(labels, seeds, len(self.conditions))
        if not temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        d = int(np.prod(self.image_shape))
        out = np.empty((len(seeds), d))
        for i, (label, seed) in enumerate(zip(labels.tolist(), seeds, strict=True)):
            mix = self._mixture(label) or self._pooled()
            rng = np.random.default_rng([seed, 7])  # image i depends on its seed only
            k = int(rng.choice(len(mix.weights), p=mix.weights)) if len(mix.weights) > 1 else 0
            if init is None:
                chol = np.linalg.cholesky(mix.covs[k] + COV_RIDGE * np.eye(d))
                out[i] = mix.means[k] + temperature * (chol @ rng.standard_normal(d))
            else:
                out[i] = self._posterior_draw(mix, init[i], strength, temperature, rng)
        images = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(len(seeds), *self.image_shape)
        return synthetic_set(images, labels, self.conditions, self.model_id, seeds, generation)

    def _alphas_cumprod(self) -> np.ndarray:
        if self._alphas is None:
            from diffaudit.generators.schedulers import training_scheduler

            self._alphas = training_scheduler(self.scheduler_config).alphas_cumprod.double().numpy()
        return self._alphas

    def _posterior_draw(self, mix: Mixture, image: np.ndarray, strength: float, temperature: float, rng) -> np.ndarray:
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        t = min(int(round(strength * self.num_train_timesteps)), self.num_train_timesteps) - 1
        ab = float(self._alphas_cumprod()[max(t, 0)])
        y0 = image.reshape(-1).astype(np.float64) / 127.5 - 1.0
        x_t = np.sqrt(ab) * y0 + np.sqrt(1 - ab) * rng.standard_normal(y0.size)
        log_r, parts = [], []
        for k, (lam, u) in enumerate(mix.eig()):
            m = 2.0 * mix.means[k] - 1.0
            s = ab * lam + (1 - ab)
            proj = u.T @ (x_t - np.sqrt(ab) * m)
            log_r.append(np.log(max(mix.weights[k], 1e-300)) - 0.5 * ((proj**2 / s).sum() + np.log(s).sum()))
            mean = m + u @ (np.sqrt(ab) * lam / s * proj)
            std = np.sqrt(np.maximum(lam * (1 - ab) / s, 0.0))
            parts.append((mean, std, u))
        r = np.exp(np.array(log_r) - max(log_r))
        k = int(rng.choice(len(r), p=r / r.sum()))
        mean, std, u = parts[k]
        y = mean + temperature * (u @ (std * rng.standard_normal(mean.size)))
        return (y + 1.0) / 2.0

    # ---- the closed-form denoiser (used by the shared loss and guidance gap) -----------------------------
    def _pooled(self) -> Mixture:
        """The null condition: every condition's components, weighted by image counts."""
        total = sum(m.count for m in self.mixtures)
        cached = getattr(self, "_pooled_mix", None)
        if cached is None:
            cached = Mixture(
                -1,
                total,
                np.concatenate([m.weights * m.count / total for m in self.mixtures]),
                np.concatenate([m.means for m in self.mixtures]),
                np.concatenate([m.covs for m in self.mixtures]),
            )
            self._pooled_mix = cached
        return cached

    def _condition(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.clone()

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        alphas = self._alphas_cumprod()
        x = z_t.double().reshape(len(z_t), -1).numpy()
        out = np.empty_like(x)
        for i in range(len(x)):
            mix = self._mixture(int(cond[i])) or self._pooled()
            ab = float(alphas[int(t[i])])
            log_r, eps = [], []
            for k, (lam, u) in enumerate(mix.eig()):
                s = ab * lam + (1 - ab)
                proj = u.T @ (x[i] - np.sqrt(ab) * (2.0 * mix.means[k] - 1.0))
                log_r.append(np.log(max(mix.weights[k], 1e-300)) - 0.5 * ((proj**2 / s).sum() + np.log(s).sum()))
                eps.append(np.sqrt(1 - ab) * (u @ (proj / s)))
            r = np.exp(np.array(log_r) - max(log_r))
            out[i] = (r[:, None] * np.stack(eps)).sum(0) / r.sum()
        return torch.from_numpy(out).reshape(z_t.shape)

    def with_conditions(self, conditions: Sequence[str]) -> AnalyticGenerator:
        if tuple(conditions) != self.conditions:
            raise ConfigError(f"this analytic model was fitted on conditions {list(self.conditions)}")
        return self

    def stats(self) -> dict[str, float]:
        """``fitted_variance``: mean over conditions and pixels of the fitted per-pixel variance (pixels in [0, 1])."""
        per_class = []
        for m in self.mixtures:
            mix_mean = (m.weights[:, None] * m.means).sum(0)
            # Variance of a mixture = mean of component variances + variance of component means.
            var = (m.weights[:, None] * (np.diagonal(m.covs, axis1=1, axis2=2) + (m.means - mix_mean) ** 2)).sum(0)
            per_class.append(var.mean())
        return {
            "fitted_variance": float(np.mean(per_class)),
            "fitted_mean": float(np.mean([m.means.mean() for m in self.mixtures])),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.kind,
            "model_id": self.model_id,
            "labels": self.labels,
            "shape": list(self.image_shape),
            "cov_ridge": COV_RIDGE,
            "denoiser_schedule": SCHEDULE,
        }


class AnalyticTrainer:
    """Fits :class:`AnalyticGenerator` by maximum likelihood (``gaussian``) or EM (``gmm``, scikit-learn).

    ``steps`` does not apply (the fit is closed form / EM to convergence). A GMM fine-tune warm-starts EM from
    ``init``'s weights and means of the same label.
    """

    def __init__(self, kind: str = GAUSSIAN, components: int = 3, reg_covar: float = 1e-4) -> None:
        if kind not in KINDS:
            raise ConfigError(f"analytic kind {kind!r} must be one of {KINDS}")
        if not isinstance(components, int) or components < 1:
            raise ConfigError(f"gmm components={components!r} must be a positive integer")
        self.family = kind
        self.components = components
        self.reg_covar = float(reg_covar)

    def _fit_group(self, x: np.ndarray, prior: Mixture | None, seed: int) -> tuple[np.ndarray, ...]:
        if self.family == GAUSSIAN:
            mean = x.mean(0)
            centred = x - mean
            cov = centred.T @ centred / len(x)  # MLE (ddof = 0): the estimator the collapse theory is about
            return np.ones(1), mean[None], cov[None]
        from sklearn.mixture import GaussianMixture

        k = min(self.components, len(x))
        kwargs: dict[str, Any] = {}
        if prior is not None and len(prior.means) == k:
            kwargs = {"weights_init": prior.weights / prior.weights.sum(), "means_init": prior.means}
        gm = GaussianMixture(k, covariance_type="full", reg_covar=self.reg_covar, random_state=seed, **kwargs)
        gm.fit(x)
        return gm.weights_ / gm.weights_.sum(), gm.means_, gm.covariances_

    def fit(
        self, train_set: ImageSet, init: Generator | None, steps: int = 0, seed: int = 0, workdir: Path | None = None
    ) -> AnalyticGenerator:
        if len(train_set) == 0:
            raise ConfigError("cannot fit an analytic model to an empty training set")
        x = train_set.images.reshape(len(train_set), -1).astype(np.float64) / 255.0
        groups = (
            [(int(c), x[train_set.labels == c]) for c in np.unique(train_set.labels)]
            if train_set.is_labelled
            else [(-1, x)]
        )
        mixtures = []
        for label, rows in groups:
            prior = None
            if isinstance(init, AnalyticGenerator) and label in init.labels:
                prior = init._mixture(label)
            w, m, c = self._fit_group(rows, prior, seed)
            mixtures.append(Mixture(label, len(rows), w, m, c))
        return AnalyticGenerator(self.family, mixtures, train_set.shape, train_set.class_names)

    def save(self, generator: Generator, directory: Path) -> None:
        from safetensors.numpy import save_file

        if not isinstance(generator, AnalyticGenerator):
            raise ConfigError("AnalyticTrainer saves analytic generators only")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, m in enumerate(generator.mixtures):
            tensors |= {f"{i}.weights": m.weights, f"{i}.means": m.means, f"{i}.covs": m.covs}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(tmp))
        atomic_write_json(
            directory / "config.json",
            {
                "backend": generator.kind,
                "classes": generator.labels,
                "counts": [m.count for m in generator.mixtures],
                "shape": list(generator.image_shape),
                "class_names": list(generator.conditions),
                "model_id": generator.model_id,
            },
        )
        generator.path = directory

    def load(self, directory: Path) -> AnalyticGenerator:
        gen = load_analytic(directory)
        if gen.kind != self.family:
            raise CheckpointError(f"{directory}: holds a {gen.kind!r} model, not {self.family!r}")
        return gen

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "cov_ridge": COV_RIDGE}
        if self.family == GMM:
            out |= {"components": self.components, "reg_covar": self.reg_covar}
        return out


def load_analytic(directory: str | Path) -> AnalyticGenerator:
    """Load a directory written by :meth:`AnalyticTrainer.save` (safetensors + JSON)."""
    from diffaudit.safeload import load_safetensors

    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: cannot read the analytic model config ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("backend") not in KINDS:
        raise CheckpointError(f"{directory}: not an analytic model directory (backend must be one of {KINDS})")
    t = {k: v.double().numpy() for k, v in load_safetensors(directory / "model.safetensors", "analytic model").items()}
    labels = [int(c) for c in meta["classes"]]
    counts = meta.get("counts") or [1] * len(labels)
    try:
        mixtures = [
            Mixture(c, int(counts[i]), t[f"{i}.weights"], t[f"{i}.means"], t[f"{i}.covs"]) for i, c in enumerate(labels)
        ]
    except KeyError as exc:
        raise CheckpointError(f"{directory}: model.safetensors lacks tensor {exc}") from exc
    gen = AnalyticGenerator(meta["backend"], mixtures, tuple(meta["shape"]), meta.get("class_names") or ())
    gen.path = directory
    return gen
