"""ROC utilities for membership inference: curve, AUC, TPR at a fixed low FPR, and a log-log plot.

Convention: a higher score means "more likely a member". Membership attacks are judged by their true-positive
rate at a low false-positive rate (Carlini et al. 2022, "Membership inference from first principles") and by
AUC, never by accuracy alone.

TPR at FPR ``f`` rule (no interpolation): the largest TPR among ROC points whose FPR is ``<= f``. This is the
TPR of the best threshold an auditor could actually set without exceeding ``f``, so it never overstates the
attack. With ``n`` non-members the finest non-zero FPR is ``1/n`` (the resolution): a target ``f < 1/n`` can
only be met at FPR = 0, and the result is reported with ``below_resolution: true``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from diffaudit.errors import DataError

# Result keys (constants, so a typo is an error rather than a silent new key).
AUC = "auc"
TPR_AT_1PCT = "tpr@1%fpr"
TPR_AT_01PCT = "tpr@0.1%fpr"
LOW_FPRS: dict[str, float] = {TPR_AT_1PCT: 0.01, TPR_AT_01PCT: 0.001}


def _check(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_member = np.asarray(is_member).reshape(-1)
    if scores.shape != is_member.shape:
        raise DataError(f"scores {scores.shape} and membership labels {is_member.shape} differ in length")
    if np.isnan(scores).any():
        raise DataError(f"{int(np.isnan(scores).sum())} membership scores are NaN")
    if is_member.dtype != bool:
        if not np.isin(is_member, (0, 1)).all():
            raise DataError("membership labels must be boolean or 0/1")
        is_member = is_member.astype(bool)
    if is_member.all() or not is_member.any():
        raise DataError("an ROC needs both members and non-members among the scored samples")
    return scores, is_member


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for ``scores`` ``(N,)`` (higher = member) and boolean ``is_member`` ``(N,)``.

    Returns ``(fpr, tpr, thresholds)``, float64 arrays of length ``distinct scores + 1``; point ``i`` predicts
    "member" for ``score >= thresholds[i]``; the first point is ``(0, 0)`` with threshold ``+inf``. Equal to
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    scores, is_member = _check(scores, is_member)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_member[order]
    # The last position of each run of equal scores: ties move together.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under an ROC curve by the trapezoid rule (ties count one half, as in ``roc_auc_score``)."""
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points with FPR <= ``target`` (see the module docstring for the rule)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def summarize(scores: np.ndarray, is_member: np.ndarray) -> dict[str, object]:
    """AUC, TPR at 1% and 0.1% FPR, sample counts and the FPR resolution for one attack.

    ``below_resolution`` lists the TPR keys whose FPR target is below ``1/num_nonmembers``.
    """
    scores, is_member = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(scores, is_member)
    n_out = int((~is_member).sum())
    out: dict[str, object] = {
        AUC: roc_auc(fpr, tpr),
        "num_members": int(is_member.sum()),
        "num_nonmembers": n_out,
        "fpr_resolution": 1.0 / n_out,
        "below_resolution": [k for k, f in LOW_FPRS.items() if f < 1.0 / n_out],
    }
    for key, f in LOW_FPRS.items():
        out[key] = tpr_at_fpr(fpr, tpr, f)
    return out


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    title: str = "membership inference ROC",
    fpr_floor: float | None = None,
) -> None:
    """Write a log-log ROC plot (PNG) of ``{name: (fpr, tpr)}`` with the chance diagonal.

    Zero rates cannot be drawn on log axes; they are clipped to ``fpr_floor`` (default: half the smallest
    non-zero FPR of the curves), which is marked in the caption.
    """
    from diffaudit.plotting import pyplot, save_png

    plt = pyplot()

    nonzero = [f[f > 0].min() for f, _ in curves.values() if (f > 0).any()]
    floor = fpr_floor if fpr_floor is not None else (min(nonzero) / 2 if nonzero else 1e-3)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, color="grey", linestyle=":", label="chance")
    for name, (fpr, tpr) in curves.items():
        auc = roc_auc(fpr, tpr)
        ax.step(np.maximum(fpr, floor), np.maximum(tpr, floor), where="post", label=f"{name} (AUC {auc:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel(f"false positive rate (0 drawn at {floor:.1g})")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110, tight=False)


def curves_for(scores: Mapping[str, np.ndarray], is_member: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (fpr, tpr)}`` for several attacks' scores on the same samples."""
    out = {}
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(s, is_member)
        out[name] = (fpr, tpr)
    return out


__all__: Sequence[str] = [
    "AUC",
    "TPR_AT_1PCT",
    "TPR_AT_01PCT",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "summarize",
    "plot_roc",
    "curves_for",
]
