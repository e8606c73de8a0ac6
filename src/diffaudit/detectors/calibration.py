"""Split-conformal calibration of a synthetic-image detector on real images, and leak checks.

A detector's score means nothing without the rate at which it flags *real* images (a false removal, when a
curator scrubs a data set). :func:`calibrate_scores` sets the threshold on held-out real images exactly as the
copy filter does (:func:`diffaudit.guards.index.calibrate_threshold`), with the direction flipped: an image is
flagged as synthetic when ``score > threshold``, and a fresh real image exchangeable with the calibration
images is flagged with probability at most the target rate.

:func:`check_disjoint` enforces the rule that a detector never sees its test images in training or
calibration: images are compared by content id, so a re-saved copy counts as the same image.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from diffaudit.errors import ConfigError, DataError


def calibrate_scores(real_scores: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """Threshold ``T`` such that real images score ``> T`` with probability at most ``target_fpr``.

    Args:
        real_scores: ``float`` ``(M,)`` scores of held-out real images (never used to train the detector).
        target_fpr: target false-removal rate in (0, 1).

    Returns:
        ``(T, achieved)``: ``T`` is the ``k``-th largest score with ``k = floor(target_fpr * (M + 1))`` (the
        split-conformal quantile; flagging is strict), ``achieved`` the share of ``real_scores`` above ``T``.
        Needs ``M >= ceil(1 / target_fpr) - 1`` calibration images.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target false-removal rate must be in (0, 1); got {target_fpr!r}")
    s = np.asarray(real_scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(s).all():
        raise DataError("detector scores of the calibration images contain NaN or infinity")
    # The copy filter's split-conformal rule on negated scores: flagging s > T is blocking -s < -T.
    from diffaudit.guards.index import calibrate_threshold

    neg, rate = calibrate_threshold(
        -s, target_fpr, "false-removal", "give more real images to calibrate on, or a larger target rate"
    )
    return -neg + 0.0, rate  # + 0.0 turns a -0.0 threshold into 0.0


def check_disjoint(test_ids: Iterable[str], seen: dict[str, Iterable[str]], what: str = "test images") -> None:
    """Raise DataError when any of ``test_ids`` was seen before (``seen``: stage name -> ids used there).

    A detector scored on images it was trained or calibrated on reports a flattering, meaningless rate.
    """
    test = set(map(str, test_ids))
    for stage, ids in seen.items():
        overlap = test & set(map(str, ids))
        if overlap:
            example = sorted(overlap)[0]
            raise DataError(
                f"{len(overlap)} of the {what} were used for {stage} (e.g. id {example}); a detector must be "
                "tested on images it never saw"
            )


def roc_auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``positive`` vs ``negative`` scores (higher = positive), ties counting half."""
    neg = np.asarray(negative, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=np.float64).reshape(-1)
    if neg.size == 0 or pos.size == 0:
        raise DataError("an AUC needs at least one real and one generated image")
    from scipy.stats import rankdata

    # Mann-Whitney U from the ranks of the pooled scores (average ranks for ties).
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))
