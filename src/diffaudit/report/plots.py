"""Small matplotlib figures for the report, rendered to PNG bytes (Agg backend, no display needed)."""

from __future__ import annotations

import io
from typing import Any

# Metric keys worth plotting against the step or generation column, in display order.
CURVE_KEYS = ("loss", "fid", "precision", "recall", "coverage", "density", "vendi")


def metric_curves_png(rows: list[dict[str, Any]], kind: str) -> bytes | None:
    """Line plots of the numeric metrics in ``rows`` against ``step`` or ``generation``; None if nothing to plot."""
    if not rows:
        return None
    x_key = next((k for k in ("generation", "step") if k in rows[0]), None)
    if x_key is None:
        return None
    keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), int | float) for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), int | float) and x_key in r]
        xs, ys = zip(*pts, strict=True) if pts else ((), ())
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
