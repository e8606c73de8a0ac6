"""Figures of a damage map (``map.json``): heat maps of paired differences and the mitigation comparison (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Heat maps drawn (metric, file name, colour map: red = worse).
HEATMAPS = (("all/fid", "map-fid.png", "Reds"), ("all/recall", "map-recall.png", "Reds_r"))


def _save(fig: Any, path: Path) -> Path:
    from diffaudit.plotting import save_png

    return save_png(fig, path, dpi=110)


def _layout(doc: dict[str, Any]) -> tuple[list[tuple[str, list]], list[float]]:
    axes = [(n, list(v)) for n, v in doc["sweep"]["axes"]]
    shares = [float(s) for s in doc["sweep"]["shares"] if float(s) > 0]
    return axes, shares


#: The metric the map's damage / collapse rule reads (map.json's "rule").
MAP_RULE_METRIC = "all/fid"


def square_mark(entry: dict[str, Any], metric: str) -> str:
    """The marker of one heat-map square: the map's own damage (+) / collapse (*) verdict for ``all/fid``;
    for any other metric, + when that metric's own 95% interval excludes 0 (never the FID verdict)."""
    if metric == MAP_RULE_METRIC:
        return "*" if entry["collapses"] else ("+" if entry["damages"] else "")
    p = entry["paired"].get(metric)
    significant = p is not None and p["n"] > 1 and (p["low"] > 0 or p["high"] < 0)
    return "+" if significant else ""


def plot_heatmap(doc: dict[str, Any], metric: str, path: str | Path, cmap: str = "Reds") -> Path | None:
    """One panel per value of the second axis (if any): rows = first axis values, columns = shares.

    Each square shows the paired difference (share - 0% control, same seed) at the read-out generation:
    mean and 95% half-width; a frame marks shares that damage (interval above 0), a star those that collapse.
    """
    from diffaudit.plotting import pyplot

    plt = pyplot()

    from diffaudit.loop.sweep import cell_id

    axes, shares = _layout(doc)
    rows_axis = axes[0] if axes else ("", [None])
    panel_axis = axes[1] if len(axes) > 1 else ("", [None])
    rest = axes[2:]
    # More than two axes: the figure shows the first value of the others (map.json holds them all).
    rest_fixed = {n: v[0] for n, v in rest}
    npanel = len(panel_axis[1])
    fig, grid = plt.subplots(1, npanel, figsize=(1.3 * len(shares) * npanel + 1.5, 0.8 * len(rows_axis[1]) + 1.6))
    grid = np.atleast_1d(grid)
    found = False
    for ax, pv in zip(grid, panel_axis[1], strict=True):
        values = np.full((len(rows_axis[1]), len(shares)), np.nan)
        labels = [["" for _ in shares] for _ in rows_axis[1]]
        for i, rv in enumerate(rows_axis[1]):
            combo = {}
            for name, val in ((rows_axis[0], rv), (panel_axis[0], pv)):
                if name:
                    combo[name] = val
            combo = {n: combo.get(n, rest_fixed.get(n)) for n, _ in axes}
            cell = doc["cells"].get(cell_id(combo))
            if cell is None:
                continue
            for j, s in enumerate(shares):
                entry = next((e for e in cell["shares"].values() if abs(e["share"] - s) < 1e-9), None)
                p = None if entry is None else entry["paired"].get(metric)
                if p is None:
                    continue
                found = True
                values[i, j] = p["mean"]
                half = (p["high"] - p["low"]) / 2 if p["n"] > 1 else float("nan")
                mark = square_mark(entry, metric)
                labels[i][j] = f"{p['mean']:+.3g}{mark}\n±{half:.2g}" if np.isfinite(half) else f"{p['mean']:+.3g}"
        finite = values[np.isfinite(values)]
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        vmin, vmax = (0.0, lim) if cmap == "Reds" else (-lim, 0.0)
        ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(shares)), [f"{100 * s:g}%" for s in shares])
        ax.set_yticks(range(len(rows_axis[1])), [f"{rows_axis[0]}={v}" if rows_axis[0] else "" for v in rows_axis[1]])
        ax.set_xlabel("synthetic share")
        if panel_axis[0]:
            ax.set_title(f"{panel_axis[0]}={pv}", fontsize=9)
    if not found:
        plt.close(fig)
        return None
    marks = "+ damages, * collapses" if metric == MAP_RULE_METRIC else "+ interval excludes 0"
    fig.suptitle(
        f"paired {metric} difference to the 0% control at generation {doc['generation']} "
        f"(mean, 95% half-width; {marks})",
        fontsize=9,
    )
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_mitigations(doc: dict[str, Any], path: str | Path, metric: str = "all/fid") -> Path | None:
    """Bars per cell: the paired difference of each mitigation at its share (vs the unmitigated control), beside
    no mitigation at the same share; 95% intervals over seeds."""
    if not doc.get("mitigations"):
        return None
    from diffaudit.plotting import pyplot

    plt = pyplot()

    groups = sorted(doc["mitigations"])
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, key in zip(axes[0], groups, strict=True):
        names, means, errs = [], [], []
        arms = doc["mitigations"][key]
        share = next(iter(arms.values()))["arm"]
        none = doc["cells"].get(key, {}).get("shares", {}).get(share, {}).get("paired", {}).get(metric)
        if none is not None:
            names.append("none")
            means.append(none["mean"])
            errs.append((none["high"] - none["low"]) / 2)
        for m, entry in sorted(arms.items()):
            p = next(iter(entry["shares"].values()), {}).get("paired_vs_unmitigated", {}).get(metric)
            if p is not None:
                names.append(m)
                means.append(p["mean"])
                errs.append((p["high"] - p["low"]) / 2)
        ax.bar(range(len(names)), means, yerr=errs, color="#c0504d", capsize=3)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(f"{key}\nat {share}", fontsize=8)
        ax.set_ylabel(f"paired {metric} diff. (vs unmitigated 0%)", fontsize=7)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_map(doc: dict[str, Any], directory: str | Path) -> list[Path]:
    """Every figure of the map into ``directory``; returns the files written."""
    directory = Path(directory)
    made = [plot_heatmap(doc, metric, directory / name, cmap) for metric, name, cmap in HEATMAPS]
    made.append(plot_mitigations(doc, directory / "map-mitigations.png"))
    return [p for p in made if p is not None]
