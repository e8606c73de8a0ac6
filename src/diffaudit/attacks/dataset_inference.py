"""Dataset inference: "was this set of images used to train the model?" (in the spirit of Dubinski et al.,
CVPR 2025, CDI), on any generator.

Each image of a *suspect* set and of an *unseen* set (images known not to be in training, from the same
distribution) gets the per-image signals of the attacks that need no shadow model: the log denoising loss at
several timesteps, PIA and PIAN distances and SecMI's t-error (:func:`image_features`). A linear combination of
them is learned by cross-fitting (two folds: fit on one, score the other) and the statistic is the AUC of the
cross-fitted scores, suspect vs unseen. The p-value is a **permutation test** of that statistic (the whole
procedure, fitting included, is repeated on random relabellings of the pooled images), so under the null
hypothesis (suspect and unseen exchangeable: the suspect set was not used) ``P(p <= a) <= a`` exactly, for any
sample sizes. CDI combines the attacks with logistic regression and a t-test; here the combiner is closed-form
(ridge least squares on standardised features, an LDA-like direction) so that hundreds of permutations cost
milliseconds, and the test is exact rather than asymptotic.

``images_needed``: the smallest suspect subset (nested random prefixes of a size grid) whose p-value is below
``alpha``, against the full unseen set. It is reported for information (how much data the evidence needs); the
decision uses the p-value of the full suspect set (a minimum over sizes would not be calibrated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffaudit.attacks import mia, pia, secmi
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator

#: Ridge penalty of the combiner, in units of standardised features (1 per training image would be heavy; 1.0
#: in total is a light regulariser that keeps the solve well posed when features are collinear).
RIDGE = 1.0
SIZE_GRID = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@dataclass(frozen=True)
class DatasetInferenceConfig:
    """Settings of one dataset-inference run (recorded in config.json)."""

    timesteps: tuple[int, ...] = (50, 100, 200, 300)
    noise_draws: int = 4
    pia_t: int = pia.PIA_T
    secmi_t: int = secmi.SECMI_T
    secmi_k: int = secmi.SECMI_K
    alpha: float = 0.01
    permutations: int = 499
    seed: int = 0
    batch_size: int = 64

    def validate(self) -> None:
        if not self.timesteps:
            raise ConfigError("give at least one timestep")
        if self.noise_draws < 1:
            raise ConfigError(f"noise_draws must be >= 1, got {self.noise_draws}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.permutations < 19:
            raise ConfigError(f"permutations must be >= 19 (p-values down to 0.05), got {self.permutations}")
        if (self.permutations + 1) * self.alpha <= 1:
            raise ConfigError(
                f"{self.permutations} permutations cannot give p < alpha={self.alpha} (smallest p: "
                f"1/{self.permutations + 1}); use >= {int(1 / self.alpha)}"
            )


def feature_names(config: DatasetInferenceConfig) -> list[str]:
    return [f"log_loss_t{t}" for t in config.timesteps] + ["log_pia", "log_pian", "log_secmi"]


def image_features(generator: Generator, data: ImageSet, config: DatasetInferenceConfig) -> np.ndarray:
    """``float64 (N, F)`` per-image signals (:func:`feature_names`); lower values mean "more member-like"."""
    losses = mia.sample_losses(
        generator, data, config.timesteps, config.noise_draws, seed=config.seed, batch_size=config.batch_size
    )
    cols = [np.log(np.maximum(losses.astype(np.float64).mean(-1), 1e-30))]
    p = pia.pia_scores(generator, data, config.pia_t, batch_size=config.batch_size)
    err = secmi.stat_scores(secmi.t_errors(generator, data, config.secmi_t, config.secmi_k, config.batch_size))
    for score in (p[pia.PIA], p[pia.PIAN], err):
        cols.append(np.log(np.maximum(-score, 1e-30))[:, None])
    return np.concatenate(cols, axis=1)


# ---- the test --------------------------------------------------------------------------------------------------
def _folds(labels: np.ndarray, order_rank: np.ndarray) -> np.ndarray:
    """``int (B, n)`` fold 0/1 per image: alternate within each class along a fixed random order."""
    out = np.empty(labels.shape, dtype=np.int64)
    for b in range(labels.shape[0]):
        for c in (False, True):
            idx = np.flatnonzero(labels[b] == c)
            idx = idx[np.argsort(order_rank[idx])]
            out[b, idx] = np.arange(len(idx)) % 2
    return out


def _statistics(x: np.ndarray, labels: np.ndarray, order_rank: np.ndarray) -> np.ndarray:
    """Cross-fitted AUC ``(B,)`` of suspect (True) vs unseen for each labelling ``labels`` ``bool (B, n)``."""
    n, f = x.shape
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    y = np.where(labels, 1.0, -1.0)
    folds = _folds(labels, order_rank)
    scores = np.empty(labels.shape)
    penalty = RIDGE * np.eye(f + 1)
    penalty[-1, -1] = 0.0  # no penalty on the intercept
    for k in (0, 1):
        w = (folds != k).astype(np.float64)  # training rows of the model that scores fold k
        gram = np.einsum("bn,nf,ng->bfg", w, xa, xa) + penalty
        rhs = np.einsum("bn,nf->bf", w * y, xa)
        coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
        held = folds == k
        scores[held] = (coef @ xa.T)[held]
    ranks = np.argsort(np.argsort(scores, axis=1), axis=1) + 1.0
    n1 = labels.sum(1)
    n0 = n - n1
    return (np.where(labels, ranks, 0).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def dataset_test(
    suspect: np.ndarray, unseen: np.ndarray, permutations: int = 499, seed: int = 0
) -> dict[str, float | int]:
    """Permutation test that ``suspect`` features ``(n_s, F)`` score as more member-like than ``unseen`` ``(n_u, F)``.

    Returns ``p_value`` (``(1 + #{T_perm >= T_obs}) / (1 + permutations)``), the cross-fitted AUC
    ``statistic`` and the set sizes. Needs at least 4 images in each set (two per fold).
    """
    if len(suspect) < 4 or len(unseen) < 4:
        raise DataError(f"dataset inference needs >= 4 suspect and unseen images, got {len(suspect)}, {len(unseen)}")
    x = np.concatenate([suspect, unseen]).astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError("non-finite per-image features")
    # Standardise on the pooled set: a symmetric function of the pool keeps suspect and unseen exchangeable.
    sd = x.std(0)
    x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
    # Member-like = low loss/distance: flip the sign so that a positive direction means "member".
    x = -x
    n, n_s = len(x), len(suspect)
    rng = np.random.default_rng([seed, 17])
    order_rank = rng.permutation(n)
    observed = np.zeros((1, n), dtype=bool)
    observed[0, :n_s] = True
    perms = np.zeros((permutations, n), dtype=bool)
    for b in range(permutations):
        perms[b, rng.permutation(n)[:n_s]] = True
    t_obs = float(_statistics(x, observed, order_rank)[0])
    t_perm = np.concatenate([_statistics(x, perms[i : i + 100], order_rank) for i in range(0, permutations, 100)])
    p = (1 + int((t_perm >= t_obs - 1e-12).sum())) / (1 + permutations)
    return {"p_value": p, "statistic": t_obs, "num_suspect": n_s, "num_unseen": n - n_s, "permutations": permutations}


def images_needed(
    suspect: np.ndarray,
    unseen: np.ndarray,
    alpha: float,
    permutations: int = 499,
    seed: int = 0,
    sizes: Sequence[int] = SIZE_GRID,
) -> tuple[int | None, list[dict[str, float | int]]]:
    """Smallest suspect size on ``sizes`` (nested random subsets, all of ``unseen``) with ``p < alpha``; and
    the test at every size tried (up to the full suspect set)."""
    order = np.random.default_rng([seed, 19]).permutation(len(suspect))
    grid = [s for s in sizes if 4 <= s < len(suspect)] + [len(suspect)]
    rows, needed = [], None
    for size in grid:
        row = dataset_test(suspect[order[:size]], unseen, permutations, seed)
        rows.append(row)
        if needed is None and row["p_value"] < alpha:
            needed = size
    return needed, rows


def dataset_inference(
    generator: Generator, suspect: ImageSet, unseen: ImageSet, config: DatasetInferenceConfig
) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
    """The whole procedure on a model: features of both sets, the test of the full suspect set, the images
    needed. Returns the results dict and the two feature matrices (for scores.json)."""
    config.validate()
    fs = image_features(generator, suspect, config)
    fu = image_features(generator, unseen, config)
    full = dataset_test(fs, fu, config.permutations, config.seed)
    needed, curve = images_needed(fs, fu, config.alpha, config.permutations, config.seed)
    results: dict[str, object] = {
        **full,
        "alpha": config.alpha,
        "used": bool(full["p_value"] < config.alpha),
        "images_needed": needed,
        "by_size": [{k: r[k] for k in ("num_suspect", "p_value", "statistic")} for r in curve],
        "features": feature_names(config),
    }
    return results, fs, fu


def run_dataset_inference(
    config: DatasetInferenceConfig, generator: Generator, suspect: ImageSet, unseen: ImageSet, run: Any
) -> dict[str, object]:
    """Dataset inference into the run directory ``run`` (a :class:`~diffaudit.runs.RunDir`): ``results.json``
    (``dataset_inference``: p-value, statistic, sizes, ``used`` at ``alpha``, images needed, p by size; an empty
    ``attacks``), ``scores.json`` (per image: id, set, features) and a ``metrics.jsonl`` row; returns results."""
    import time

    from diffaudit.io import atomic_write_json

    t0 = time.perf_counter()
    found, fs, fu = dataset_inference(generator, suspect, unseen, config)
    seconds = time.perf_counter() - t0
    names = feature_names(config)
    rows = [
        {"id": str(i), "set": which, **{n: float(v) for n, v in zip(names, f, strict=True)}}
        for which, data, feats in (("suspect", suspect, fs), ("unseen", unseen, fu))
        for i, f in zip(data.ids, feats, strict=True)
    ]
    queries = (
        len(config.timesteps) * config.noise_draws
        + pia.QUERIES
        + 1
        + secmi.secmi_queries(config.secmi_t, config.secmi_k)
    )
    results: dict[str, object] = {
        "dataset_inference": found,
        "attacks": {},
        "target": {"model_id": generator.model_id, "family": generator.describe().get("family")},
        "costs": {
            "queries_per_image": queries,
            "seconds_per_image": seconds / (len(suspect) + len(unseen)),
        },
        "seconds": seconds,
    }
    atomic_write_json(run.file("results.json"), results)
    atomic_write_json(run.file("scores.json"), rows)
    run.log({k: found[k] for k in ("p_value", "statistic", "num_suspect", "num_unseen", "images_needed")})
    return results
