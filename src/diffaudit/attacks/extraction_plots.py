"""Figures of an extraction run: extracted pairs, extraction rate against duplication, the edge-threshold ROC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def save_pairs_figure(pairs: Sequence[tuple[np.ndarray, np.ndarray, float, str]], path: str | Path) -> Path:
    """PNG of rows "generation | training image | distance"; ``pairs`` holds uint8 ``(C, H, W)`` images."""
    from diffaudit.plotting import pyplot, save_png

    plt = pyplot()

    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, 2, figsize=(3.2, 1.5 * rows), squeeze=False)
    for r in range(rows):
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
        if not pairs:
            axes[r][0].set_title("no extracted pairs", fontsize=7)
            continue
        gen, tr, d, caption = pairs[r]
        for a, img in zip(axes[r], (gen, tr), strict=True):
            a.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        axes[r][0].set_title(caption, fontsize=6)
        axes[r][1].set_title(f"train, l2={d:.3f}", fontsize=6)
    fig.tight_layout()
    save_png(fig, path, dpi=100, tight=False)
    return Path(path)


def save_duplication_plot(by_copies: dict[str, dict[str, object]], path: str | Path) -> Path:
    """Extraction rate against duplication count (log x), clique attack and any-generation oracle."""
    from diffaudit.plotting import pyplot, save_png

    plt = pyplot()

    ks = sorted(by_copies, key=int)
    x = [int(k) for k in ks]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(x, [by_copies[k]["clique_rate"] for k in ks], "o-", label="clique attack (flagged, within delta)")
    ax.plot(x, [by_copies[k]["any_rate"] for k in ks], "s--", label="any generation within delta")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copies in the training set")
    ax.set_ylabel("fraction extracted")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=100, tight=False)
    return Path(path)


def save_roc_plot(fpr: np.ndarray, tpr: np.ndarray, chosen: tuple[float, float], path: str | Path) -> Path:
    """ROC of the edge threshold calibration with the chosen operating point."""
    from diffaudit.plotting import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(3.5, 3))
    ax.plot(fpr, tpr)
    ax.plot([chosen[0]], [chosen[1]], "ro")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("false-edge rate")
    ax.set_ylabel("true-edge rate")
    fig.tight_layout()
    save_png(fig, path, dpi=100, tight=False)
    return Path(path)
