"""Membership inference against diffusion models (Carlini et al. 2023, Sec. 5.2): losses, threshold, LiRA.

The signal is the diffusion loss of a candidate image at a fixed timestep ``t``: the mean squared error of
the model's noise prediction, computed by any :class:`~diffaudit.generators.base.Generator` (our class U-Net
in pixels, a text-to-image pipeline in VAE latents, an analytic model in closed form). A training member tends
to have a lower loss. Its noise is seeded per image (from its content id, the draw number and a seed), so every
model sees the exact same query and scores are reproducible ("fixed noise"). "Strong" variants average over
several noise draws and, where the data allows, a horizontally flipped copy.

Attacks (higher score = more likely a member):

* ``loss``: threshold on ``-loss`` of the target model.
* ``lira-online``: per-sample Gaussians fitted to the log-loss of shadow models that trained on the sample (IN)
  and that did not (OUT); score = log-likelihood ratio IN vs OUT.
* ``lira-offline``: OUT Gaussian only; score = ``-log P(OUT loss <= observed)``, a one-sided test.

Data layout follows ml_privacy_meter: ``membership`` is a bool matrix ``(models, samples)``; per-model
statistics are ``(samples, models)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator
from diffaudit.progress import progress_bar

LOSS = "loss"
LIRA_ONLINE = "lira-online"
LIRA_OFFLINE = "lira-offline"
ATTACKS = (LOSS, LIRA_ONLINE, LIRA_OFFLINE)
DEFAULT_TIMESTEPS = (10, 25, 50, 100, 200, 300, 500)
# Smallest standard deviation allowed for a fitted Gaussian (log-loss units): keeps a sample whose shadow
# losses happen to coincide from producing infinite likelihood ratios.
MIN_STD = 1e-4


# ---- per-sample losses --------------------------------------------------------------------------------------
def noise_seed(image_id: str, draw: int, seed: int) -> int:
    """A 63-bit seed for the query noise of one image and draw; independent of order and batch."""
    digest = hashlib.sha256(f"mia:{seed}:{image_id}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def noise_seeds(ids: Sequence[str], draw: int, seed: int) -> list[int]:
    """The query-noise seeds of ``ids`` for one draw (:func:`noise_seed` per id)."""
    return [noise_seed(str(i), draw, seed) for i in ids]


def align_conditions(generator: Generator, data: ImageSet) -> Generator:
    """``generator`` sampling the conditions ``data.labels`` index (its ``class_names``: classes or captions).

    A pipeline takes the captions as its prompts; a class or analytic model keeps its classes, which must be
    the same names, or (for data saved without names matching) at least cover the labels as indices.
    """
    names = tuple(data.class_names)
    if not names or names == tuple(generator.conditions):
        return generator
    try:
        return generator.with_conditions(names)
    except ConfigError:
        if data.labels.size and int(data.labels.max()) < len(generator.conditions):
            return generator  # labels are class indices of the same classes under other names
        raise


def query_inputs(generator: Generator, data: ImageSet) -> tuple[Generator, np.ndarray]:
    """``generator`` aligned to ``data``'s conditions and the labels ``int64 (N,)`` that condition every query.

    A member was trained with its label (class, or caption index for a pipeline); unlabelled images use the
    null condition (-1). Shared by every attack so that all of them query the model the same way.
    """
    if data.shape != tuple(generator.image_shape):
        raise DataError(f"candidate images are {data.shape} but the model makes {tuple(generator.image_shape)}")
    generator = align_conditions(generator, data)
    labels = data.labels if data.class_names else np.full(len(data), -1, dtype=np.int64)
    return generator, np.asarray(labels, dtype=np.int64)


def sample_losses(
    generator: Generator,
    data: ImageSet,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    noise_draws: int = 1,
    flip: bool = False,
    seed: int = 0,
    batch_size: int = 512,
    show_progress: bool = False,
) -> np.ndarray:
    """Per-sample denoising losses ``float32 (N, T, V)`` of ``data`` under any generator.

    ``T = len(timesteps)``; ``V = noise_draws * (2 if flip else 1)`` query variants, ordered draw-major (draw
    ``d`` of the flipped copy reuses draw ``d``'s noise, flipped, so the two variants differ only in the image).
    The noise of image ``i`` in draw ``d`` is seeded by :func:`noise_seed` ``(ids[i], d, seed)``, so every model
    sees the same query and a loss depends on neither order nor batch. Labels (classes, or caption indices for a
    pipeline) condition the model, as a member was trained with its label; unlabelled images use the null
    condition. All losses go through :meth:`Generator.denoising_losses`.
    """
    if data.shape != tuple(generator.image_shape):
        raise DataError(f"candidate images are {data.shape} but the model makes {tuple(generator.image_shape)}")
    bad = [int(t) for t in timesteps if not 0 <= int(t) < generator.num_train_timesteps]
    if bad:
        raise ConfigError(f"timesteps {bad} outside [0, {generator.num_train_timesteps})")
    if noise_draws < 1:
        raise ConfigError(f"noise_draws must be >= 1, got {noise_draws}")
    generator, labels = query_inputs(generator, data)
    flips = (False, True) if flip else (False,)
    out = np.empty((len(data), len(timesteps), noise_draws * len(flips)), dtype=np.float32)
    with progress_bar("mia losses", total=noise_draws * len(flips), enabled=show_progress) as bar:
        for d in range(noise_draws):
            seeds = noise_seeds(data.ids.tolist(), d, seed)
            for f, flipped in enumerate(flips):
                out[:, :, d * len(flips) + f] = generator.denoising_losses(
                    data.images, labels, timesteps, seeds, flip=flipped, batch_size=batch_size
                )
                bar.update(advance=1)
    return out


def loss_statistic(losses: np.ndarray) -> np.ndarray:
    """The LiRA statistic: log of the loss averaged over query variants, ``(..., V) -> (...)`` float64.

    Losses are positive and right-skewed; the log makes per-sample Gaussians fit better (the role LiRA's
    logit scaling plays for classifier confidences).
    """
    return np.log(np.maximum(np.asarray(losses, dtype=np.float64).mean(-1), 1e-12))


# ---- attacks ------------------------------------------------------------------------------------------------
def loss_threshold_scores(target_stat: np.ndarray) -> np.ndarray:
    """Scores ``(N,)`` of the threshold attack: ``-statistic`` (lower loss = member)."""
    return -np.asarray(target_stat, dtype=np.float64)


def _check_shadows(target_stat: np.ndarray, shadow_stats: np.ndarray, membership: np.ndarray) -> None:
    n = np.asarray(target_stat).shape[0]
    if shadow_stats.ndim != 2 or shadow_stats.shape[0] != n:
        raise DataError(f"shadow statistics must be (samples={n}, models), got {shadow_stats.shape}")
    if membership.shape != (shadow_stats.shape[1], n) or membership.dtype != bool:
        raise DataError(
            f"membership must be bool (models={shadow_stats.shape[1]}, samples={n}), got {membership.shape}"
        )
    if shadow_stats.shape[1] < 2:
        raise ConfigError("LiRA needs at least 2 shadow models")


def _gaussians(
    shadow_stats: np.ndarray, membership: np.ndarray, fix_variance: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Per-sample IN/OUT means and stds ``(N,)`` from shadows, plus counts of samples that needed a fallback."""
    inside = membership.T  # (N, K)
    n_in, n_out = inside.sum(1), (~inside).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(inside, shadow_stats, 0).sum(1) / n_in
        mu_out = np.where(~inside, shadow_stats, 0).sum(1) / n_out
    # A sample with no IN (or no OUT) shadow borrows the other mean shifted by the average IN-OUT gap of the
    # samples that have both: with K random halves this happens for about 2 * 2^-K of the samples.
    both = (n_in > 0) & (n_out > 0)
    gap = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(n_in > 0, mu_in, mu_out + gap)
    mu_out = np.where(n_out > 0, mu_out, mu_in - gap)
    res_in = np.where(inside, shadow_stats - mu_in[:, None], np.nan)
    res_out = np.where(~inside, shadow_stats - mu_out[:, None], np.nan)
    if fix_variance:
        # One variance for all samples (Carlini et al.'s choice when there are few shadows per sample).
        s_in = np.full(len(mu_in), np.sqrt(np.nanmean(res_in**2)) if (n_in > 1).any() else np.nan)
        s_out = np.full(len(mu_out), np.sqrt(np.nanmean(res_out**2)) if (n_out > 1).any() else np.nan)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            s_in = np.sqrt(np.nansum(res_in**2, 1) / np.maximum(n_in - 1, 1))
            s_out = np.sqrt(np.nansum(res_out**2, 1) / np.maximum(n_out - 1, 1))
        s_in = np.where(n_in > 1, s_in, np.nan)
        s_out = np.where(n_out > 1, s_out, np.nan)
    # Missing stds (0 or 1 shadow on a side) fall back to the pooled one.
    pooled = np.sqrt(np.nanmean(np.concatenate([res_in.ravel() ** 2, res_out.ravel() ** 2])))
    s_in = np.maximum(np.where(np.isfinite(s_in), s_in, pooled), MIN_STD)
    s_out = np.maximum(np.where(np.isfinite(s_out), s_out, pooled), MIN_STD)
    fallbacks = {
        "samples_without_in_shadow": int((n_in == 0).sum()),
        "samples_without_out_shadow": int((n_out == 0).sum()),
    }
    return mu_in, s_in, mu_out, s_out, fallbacks


def lira_online(
    target_stat: np.ndarray, shadow_stats: np.ndarray, membership: np.ndarray, fix_variance: bool = True
) -> tuple[np.ndarray, dict[str, int]]:
    """Online LiRA scores ``(N,)``: ``log N(obs; mu_in, s_in) - log N(obs; mu_out, s_out)``.

    ``target_stat`` ``(N,)`` and ``shadow_stats`` ``(N, K)`` are :func:`loss_statistic` values; ``membership``
    is bool ``(K, N)`` (shadow ``k`` trained on sample ``n``). Returns the scores and fallback counts.
    """
    shadow_stats, membership = np.asarray(shadow_stats, dtype=np.float64), np.asarray(membership)
    _check_shadows(target_stat, shadow_stats, membership)
    mu_in, s_in, mu_out, s_out, info = _gaussians(shadow_stats, membership, fix_variance)
    obs = np.asarray(target_stat, dtype=np.float64)
    return norm.logpdf(obs, mu_in, s_in) - norm.logpdf(obs, mu_out, s_out), info


def lira_offline(
    target_stat: np.ndarray, shadow_stats: np.ndarray, membership: np.ndarray, fix_variance: bool = True
) -> tuple[np.ndarray, dict[str, int]]:
    """Offline LiRA scores ``(N,)``: ``-log P(OUT <= obs)``, a one-sided test against the OUT Gaussian only.

    Uses only shadows that did not train on each sample (IN entries of ``membership`` are ignored).
    """
    shadow_stats, membership = np.asarray(shadow_stats, dtype=np.float64), np.asarray(membership)
    _check_shadows(target_stat, shadow_stats, membership)
    _, _, mu_out, s_out, info = _gaussians(shadow_stats, membership, fix_variance)
    info = {"samples_without_out_shadow": info["samples_without_out_shadow"]}
    return -norm.logcdf(np.asarray(target_stat, dtype=np.float64), mu_out, s_out), info


def attack_scores(
    name: str,
    target_stat: np.ndarray,
    shadow_stats: np.ndarray | None,
    membership: np.ndarray | None,
    fix_variance: bool = True,
) -> tuple[np.ndarray, dict[str, int]]:
    """Scores of attack ``name`` (one of :data:`ATTACKS`); shadows are needed for the LiRA variants."""
    if name == LOSS:
        return loss_threshold_scores(target_stat), {}
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {ATTACKS}")
    if shadow_stats is None or membership is None:
        raise ConfigError(f"attack {name!r} needs shadow models")
    fn = lira_online if name == LIRA_ONLINE else lira_offline
    return fn(target_stat, shadow_stats, membership, fix_variance)
