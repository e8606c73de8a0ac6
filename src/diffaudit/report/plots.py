"""Small matplotlib figures for the report, rendered to PNG bytes (Agg backend, no display needed)."""

from __future__ import annotations

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
    from diffaudit.plotting import png_bytes, pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), int | float) and x_key in r]
        xs, ys = zip(*pts, strict=True) if pts else ((), ())
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
    fig.tight_layout()
    return png_bytes(fig, dpi=80)


def _plain(text: str) -> str:
    """Label text for matplotlib: ``$`` escaped, so a run's name is never parsed as mathtext (errors, markup)."""
    return str(text).replace("\\", "\\\\").replace("$", r"\$")[:60]


def loop_arms_png(arms: dict[str, Any], control: str | None, keys: list[str]) -> bytes | None:
    """Every arm's curves of ``keys`` over generations on shared axes, the control arm in black.

    Bands are the 95% interval over repeats the loop recorded (absent with one repeat); a dotted line marks
    the last poisoning generation, after which any healing generations follow.
    """
    keys = [k for k in keys if any(isinstance((a.get("curves") or {}).get(k), dict) for a in arms.values())]
    if not keys:
        return None
    from diffaudit.plotting import png_bytes, pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, arm in arms.items():
            curve = (arm.get("curves") or {}).get(key)
            if not isinstance(curve, dict) or not isinstance(curve.get("mean"), list):
                continue
            mean = [v if isinstance(v, int | float) else float("nan") for v in curve["mean"]]
            gens = arm.get("generations") if isinstance(arm.get("generations"), list) else list(range(len(mean)))
            gens = gens[: len(mean)]
            is_ctrl = name == control
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if is_ctrl else {}
            label = _plain(name) + (" (control)" if is_ctrl else "")
            (line,) = ax.plot(gens, mean[: len(gens)], marker=".", label=label, **style)
            low, high = curve.get("low"), curve.get("high")
            if isinstance(low, list) and isinstance(high, list) and low != high and len(low) >= len(gens):
                ax.fill_between(gens, low[: len(gens)], high[: len(gens)], color=line.get_color(), alpha=0.15)
            g = (arm.get("config") or {}).get("poison_generations")
            if isinstance(g, int) and not is_ctrl:
                ax.axvline(g, color="grey", linestyle=":", linewidth=1)
        ax.set_title(_plain(key))
        ax.set_xlabel("generation")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig, dpi=80)
