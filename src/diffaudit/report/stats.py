"""Intervals the summary cards quote: a count out of a total, and an ROC AUC.

Closed forms only (no resampling): the report sees the counts in the result files, not always the raw scores.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion ``k / n``.

    Chosen over the normal approximation because audits often see 0 of n (no image extracted, nothing
    blocked), where the normal interval collapses to [0, 0] and would overstate certainty.
    """
    if n <= 0:
        return (0.0, 1.0)
    k = min(max(k, 0), n)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends: with k = 0 (or n) the bound is 0 (or 1); floating point can leave 1e-17 otherwise.
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def auc_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for an ROC AUC from Hanley & McNeil (1982), clipped to [0, 1].

    Needs only the AUC and the two class sizes, which every MIA result carries; with a few dozen samples
    it is wide, and saying so is the point.
    """
    if n_pos <= 0 or n_neg <= 0:
        return (0.0, 1.0)
    a = min(max(auc, 0.0), 1.0)
    q1 = a / (2 - a)
    q2 = 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    # A degenerate AUC of exactly 0 or 1 has zero Hanley-McNeil variance; fall back to the 1/(4n) bound of
    # a proportion so the interval never claims certainty from a few samples.
    se = math.sqrt(max(var, 1.0 / (4 * min(n_pos, n_neg) ** 2)))
    return (max(0.0, a - z * se), min(1.0, a + z * se))


def pct(x: float, digits: int = 1) -> str:
    """``0.0473`` -> ``"4.7%"``; values under 1% keep two significant digits (0.76%, not 0.8%)."""
    value = 100 * x
    if 0 < abs(value) < 1:
        return f"{value:.2g}%"
    return f"{value:.{digits}f}%"


def interval_pct(lo: float, hi: float) -> str:
    """``"95% CI 2.9–7.6%"``."""
    return f"95% CI {pct(lo)}–{pct(hi)}"
