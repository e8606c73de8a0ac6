"""Figures of a loop run: metric curves per generation with phases shaded, and grids side by side (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Panels of the curves figure (metric names; each is drawn per group present in the rows).
PANELS = ("fid", "precision", "recall", "coverage", "vendi")
_GROUP_STYLE = {"all": "-", "retrained": "--", "heldout": ":"}


def _save(fig: Any, path: Path) -> Path:
    from diffaudit.plotting import save_png

    return save_png(fig, path, dpi=110)


def plot_curves(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One panel per metric: a line per arm and group (all / retrained / held-out), 95% bands over repeats.

    Poisoning generations are shaded red, healing generations green (phases of the first arm).
    """
    from diffaudit.plotting import pyplot

    plt = pyplot()

    stats_keys = sorted({k for arm in summary.values() for k in arm["curves"] if k.startswith("fitted_")})
    panels = [p for p in PANELS if any(k.endswith("/" + p) for arm in summary.values() for k in arm["curves"])]
    panels += stats_keys
    panels = panels or ["(no metrics)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    first = next(iter(summary.values()))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels, strict=True):
        for phase, color in (("poison", "#f4cccc"), ("heal", "#d9ead3")):
            gens = [g for g, p in zip(first["generations"], first["phases"], strict=True) if p == phase]
            if gens:
                ax.axvspan(min(gens) - 0.5, max(gens) + 0.5, color=color, alpha=0.6, lw=0)
        for i, (arm, data) in enumerate(summary.items()):
            for key, curve in data["curves"].items():
                group, _, metric = key.rpartition("/")
                if (metric or key) != panel and key != panel:
                    continue
                x = np.asarray(data["generations"])
                mean = np.asarray(curve["mean"], float)
                style = _GROUP_STYLE.get(group, "-")
                ax.plot(x, mean, style, color=colors[i % len(colors)], marker="o", ms=3, label=f"{arm} {group}".strip())
                ax.fill_between(
                    x,
                    np.asarray(curve["low"], float),
                    np.asarray(curve["high"], float),
                    color=colors[i % len(colors)],
                    alpha=0.15,
                    lw=0,
                )
        ax.set_title(panel)
        ax.set_xlabel("generation")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="lower center",
            ncol=min(6, len(labels)),
            fontsize=7,
            bbox_to_anchor=(0.5, -0.02 - 0.04 * (len(labels) // 6)),
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_grids(run_path: str | Path, arm: str, num_generations: int, path: str | Path, repeat: int = 0) -> Path | None:
    """The sample grids of generations ``0..G+H`` of ``arm`` (repeat ``repeat``) side by side, titled."""
    from diffaudit.plotting import pyplot

    plt = pyplot()
    from PIL import Image

    root = Path(run_path) / f"repeat-{repeat}"
    files = [root / "gen-000" / "grid.png"] + [
        root / arm / f"gen-{g:03d}" / "grid.png" for g in range(1, num_generations)
    ]
    present = [(g, f) for g, f in enumerate(files) if f.exists()]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(2.2 * len(present), 2.5), squeeze=False)
    for ax, (g, f) in zip(axes[0], present, strict=True):
        ax.imshow(np.asarray(Image.open(f)), cmap="gray")
        ax.set_title(f"gen {g}", fontsize=8)
        ax.axis("off")
    fig.suptitle(arm)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
