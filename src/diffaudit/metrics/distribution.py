"""Distribution metrics over feature arrays: FID, KID, precision/recall, density/coverage, Vendi.

Every function that compares two sets takes the **generated** features first and the **reference** (real)
features second. Features are ``(N, D)`` float arrays (numpy or anything ``np.asarray`` accepts); all
arithmetic is float64. The k-NN machinery is :mod:`diffaudit.distances` (metric "euclidean"), the one kNN
implementation of the project, so results are exact and independent of the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.linalg

from diffaudit import distances
from diffaudit.errors import ConfigError, DataError

#: Result keys of :func:`compute_metrics`.
FID = "fid"
KID_MEAN = "kid_mean"
KID_STD = "kid_std"
PRECISION = "precision"
RECALL = "recall"
DENSITY = "density"
COVERAGE = "coverage"
VENDI = "vendi"  # Vendi score of the generated set
VENDI_REF = "vendi_ref"  # Vendi score of the reference set, the yardstick for VENDI
METRIC_KEYS = (FID, KID_MEAN, KID_STD, PRECISION, RECALL, DENSITY, COVERAGE, VENDI, VENDI_REF)
#: Per-class results: ``{class name: {metric key: value}}``.
PER_CLASS = "per_class"
#: Mean over the evaluated classes of each per-class metric: ``{metric key: value}``.
CLASS_MEAN = "class_mean"
#: Classes left out of the per-class results: ``{class name: reason}``.
SKIPPED_CLASSES = "skipped_classes"
#: Bootstrap percentile intervals: ``{metric key: [low, high]}``.
CI = "ci"
CI_LEVEL = "ci_level"
NUM_BOOTSTRAP = "num_bootstrap"
NUM_GENERATED = "num_generated"
NUM_REFERENCE = "num_reference"


def _features(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.ndim != 2:
        raise DataError(f"{name} features must be 2-D (N, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{name} features must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{name} features contain NaN or infinite values")
    return arr


def _pair(gen: object, ref: object, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    g, r = _features(gen, "generated"), _features(ref, "reference")
    if g.shape[1] != r.shape[1]:
        raise DataError(f"generated features have dimension {g.shape[1]}, reference {r.shape[1]}")
    for name, a in (("generated", g), ("reference", r)):
        if len(a) < min_rows:
            raise DataError(f"{name} set has {len(a)} rows; this metric needs at least {min_rows}")
    return g, r


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))``. The trace term is computed as the sum of
    square roots of the eigenvalues of the symmetric PSD matrix ``s1^(1/2) s2 s1^(1/2)`` (same eigenvalues as
    ``s1 s2``), which stays real and stable for singular covariances, unlike a general ``sqrtm``.

    Args:
        mu1, mu2: means ``(D,)``; sigma1, sigma2: covariances ``(D, D)``. Any float dtype; computed in
            float64.

    Returns:
        The distance (>= 0 up to rounding) as a Python float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DataError(
            f"inconsistent Gaussian parameters: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    w1, v1 = scipy.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    eig = scipy.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(gen: np.ndarray, ref: np.ndarray) -> float:
    """Frechet Inception-style distance between generated ``(N, D)`` and reference ``(M, D)`` features.

    Gaussians are fitted with the sample mean and the unbiased (ddof=1) covariance.
    """
    g, r = _pair(gen, ref, 2)
    return frechet_distance(g.mean(0), np.cov(g, rowvar=False), r.mean(0), np.cov(r, rowvar=False))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(
    gen: np.ndarray, ref: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception-style distance: unbiased MMD^2 with the kernel ``(x.y / D + 1)^3``.

    Averaged over ``num_subsets`` random subsets (without replacement) of ``min(subset_size, N, M)`` rows of
    each set, drawn from ``np.random.default_rng(seed)``.

    Args:
        gen: generated features ``(N, D)``; ref: reference features ``(M, D)``.

    Returns:
        ``(mean, std)`` of the per-subset MMD^2 (std with ddof=0; 0 for one subset).
    """
    g, r = _pair(gen, ref, 2)
    if num_subsets < 1 or subset_size < 2:
        raise ConfigError(f"KID needs num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    m = min(subset_size, len(g), len(r))
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        x = g[rng.choice(len(g), m, replace=False)]
        y = r[rng.choice(len(r), m, replace=False)]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = m * (m - 1)
        values[s] = (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean()
    return float(values.mean()), float(values.std())


def precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls.

    Precision: fraction of generated rows inside some reference row's ball (radius = distance to its k-th
    nearest other reference row). Recall: fraction of reference rows inside some generated row's ball.
    Strict ``<``, as in the ``prdc`` package.

    Args:
        gen: generated features ``(N, D)``; ref: reference features ``(M, D)``; both need more than k rows.
        k: neighbour defining the radius; block: rows per block of the distance engine.

    Returns:
        ``(precision, recall)`` in [0, 1].
    """
    g, r = _pair(gen, ref, k + 1)
    r_radii = distances.knn_radii(r, k, block=block)
    g_radii = distances.knn_radii(g, k, block=block)
    precision = (distances.count_within_radii(g, r, r_radii, block_q=block, block_r=block) > 0).mean()
    recall = (distances.count_within_radii(r, g, g_radii, block_q=block, block_r=block) > 0).mean()
    return float(precision), float(recall)


def density_coverage(gen: np.ndarray, ref: np.ndarray, k: int = 5, block: int = 1024) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with reference k-NN balls.

    Density: mean over generated rows of (number of reference balls containing it) / k; can exceed 1.
    Coverage: fraction of reference rows whose nearest generated row lies inside their ball.

    Args:
        gen: generated features ``(N, D)``; ref: reference features ``(M, D)``, M > k.

    Returns:
        ``(density, coverage)``.
    """
    g, r = _pair(gen, ref, 1)
    if len(r) <= k:
        raise DataError(f"reference set has {len(r)} rows; density/coverage with k={k} needs more than {k}")
    # The distance engine works on float32 values; use the same values for the exact check below.
    g32, r32 = g.astype(np.float32), r.astype(np.float32)
    r_radii = distances.knn_radii(r32, k, block=block)
    density = distances.count_within_radii(g32, r32, r_radii, block_q=block, block_r=block).mean() / k
    _, nn_idx = distances.nearest_neighbors(r32, g32, k=1, metric="euclidean", block_q=block, block_r=block)
    # Compare float64 distances with the float64 radii (the returned float32 distances could round across).
    nn_dist = np.sqrt(((r32.astype(np.float64) - g32[nn_idx[:, 0]]) ** 2).sum(1))
    coverage = (nn_dist < r_radii).mean()
    return float(density), float(coverage)


def vendi_score(x: np.ndarray) -> float:
    """Vendi score (Friedman & Dieng 2023) of features ``(N, D)``: an effective number of distinct items.

    Kernel: cosine similarity, ``K_ij = <x_i, x_j> / (|x_i| |x_j|)`` (so ``K_ii = 1``). The score is
    ``exp(-sum_i l_i log l_i)`` over the eigenvalues ``l_i`` of ``K / N``; it is 1 for N identical rows
    and N for N mutually orthogonal rows. Computed from the ``D x D`` Gram matrix when D < N (same
    nonzero spectrum). Returns a float >= 1.
    """
    a = _features(x, "vendi")
    if len(a) == 0:
        raise DataError("Vendi score of an empty set")
    norms = np.linalg.norm(a, axis=1)
    if (norms == 0).any():
        raise DataError(f"{int((norms == 0).sum())} feature rows are all zero; cosine similarity is undefined")
    u = a / norms[:, None]
    gram = (u.T @ u) if u.shape[1] < len(u) else (u @ u.T)
    eig = np.clip(np.linalg.eigvalsh(gram / len(u)), 0, None)
    eig = eig[eig > 1e-15]
    return float(np.exp(-(eig * np.log(eig)).sum()))


def _all_metrics(g: np.ndarray, r: np.ndarray, opts: Mapping[str, int]) -> dict[str, float]:
    kid_mean, kid_std = kid(g, r, opts["kid_subsets"], opts["kid_subset_size"], opts["seed"])
    precision, recall = precision_recall(g, r, opts["k_pr"], opts["block"])
    density, coverage = density_coverage(g, r, opts["k_dc"], opts["block"])
    return {
        FID: fid(g, r),
        KID_MEAN: kid_mean,
        KID_STD: kid_std,
        PRECISION: precision,
        RECALL: recall,
        DENSITY: density,
        COVERAGE: coverage,
        VENDI: vendi_score(g),
        VENDI_REF: vendi_score(r),
    }


def _bootstrap(
    g: np.ndarray, r: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], dict[str, float]], n: int, seed: int
) -> dict[str, list[float]]:
    rng = np.random.default_rng([seed, 1])  # a stream separate from the KID subsets
    samples: dict[str, list[float]] = {key: [] for key in METRIC_KEYS}
    for _ in range(n):
        res = fn(g[rng.integers(0, len(g), len(g))], r[rng.integers(0, len(r), len(r))])
        for key in METRIC_KEYS:
            samples[key].append(res[key])
    return {key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for key, v in samples.items()}


def compute_metrics(
    gen: np.ndarray,
    ref: np.ndarray,
    gen_labels: Sequence[int] | np.ndarray | None = None,
    ref_labels: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    num_bootstrap: int = 0,
    seed: int = 0,
    *,
    k_pr: int = 3,
    k_dc: int = 5,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    block: int = 1024,
) -> dict[str, object]:
    """All distribution metrics between generated features (first) and reference features (second).

    Args:
        gen: generated features ``(N, D)``; ref: reference features ``(M, D)``.
        gen_labels, ref_labels: integer labels ``(N,)`` and ``(M,)``; give both or neither. With labels,
            each class present in either set is evaluated on its own (generated rows of that class vs
            reference rows of that class); a class with too few rows in either set (fewer than
            ``max(k_pr, k_dc) + 1``) is listed under ``SKIPPED_CLASSES`` with the reason instead.
        class_names: names per label (sequence indexed by label, or mapping); default ``str(label)``.
        num_bootstrap: if > 0, 95% percentile intervals of the overall metrics over that many resamplings
            (with replacement) of both sets. Resampling duplicates rows, which shrinks k-NN radii, so the PRDC
            intervals are indicative only.
        seed: seeds KID subsets and bootstrap resampling (no global RNG).
        k_pr, k_dc: neighbours for precision/recall and density/coverage.
        kid_subsets, kid_subset_size, block: see :func:`kid` and :mod:`diffaudit.distances`.

    Returns:
        ``{FID, KID_MEAN, KID_STD, PRECISION, RECALL, DENSITY, COVERAGE, VENDI, VENDI_REF: float,
        NUM_GENERATED, NUM_REFERENCE: int}``, plus ``PER_CLASS``, ``CLASS_MEAN``, ``SKIPPED_CLASSES``
        with labels and ``CI``, ``CI_LEVEL``, ``NUM_BOOTSTRAP`` with bootstrap; JSON-serialisable.
    """
    if num_bootstrap < 0:
        raise ConfigError(f"num_bootstrap must be >= 0, got {num_bootstrap}")
    if (gen_labels is None) != (ref_labels is None):
        raise ConfigError("give labels for both the generated and the reference set, or for neither")
    need = max(k_pr, k_dc) + 1
    g, r = _pair(gen, ref, need)
    opts = dict(k_pr=k_pr, k_dc=k_dc, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, block=block, seed=seed)

    def run(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        return _all_metrics(a, b, opts)

    result: dict[str, object] = dict(run(g, r))
    result[NUM_GENERATED], result[NUM_REFERENCE] = len(g), len(r)

    if gen_labels is not None:
        gl, rl = np.asarray(gen_labels), np.asarray(ref_labels)
        if gl.shape != (len(g),) or rl.shape != (len(r),):
            raise DataError(f"labels have shapes {gl.shape} and {rl.shape}, expected ({len(g)},) and ({len(r)},)")
        per_class: dict[str, dict[str, float]] = {}
        skipped: dict[str, str] = {}
        for label in np.union1d(gl, rl).tolist():
            name = _class_name(label, class_names)
            ng, nr = int((gl == label).sum()), int((rl == label).sum())
            if min(ng, nr) < need:
                skipped[name] = f"{ng} generated and {nr} reference samples; need at least {need} of each"
                continue
            per_class[name] = run(g[gl == label], r[rl == label])
        result[PER_CLASS] = per_class
        result[SKIPPED_CLASSES] = skipped
        result[CLASS_MEAN] = (
            {key: float(np.mean([c[key] for c in per_class.values()])) for key in METRIC_KEYS} if per_class else {}
        )

    if num_bootstrap > 0:
        result[CI] = _bootstrap(g, r, run, num_bootstrap, seed)
        result[CI_LEVEL] = 0.95
        result[NUM_BOOTSTRAP] = num_bootstrap
    return result


def _class_name(label: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if class_names is None:
        return str(label)
    try:
        return str(class_names[label])
    except (IndexError, KeyError):
        raise DataError(f"label {label} has no entry in class_names") from None
