"""The one place figures are made and written: a headless backend, atomic PNG files, PNG bytes for the report.

Every figure of diffaudit (loop curves and maps, ROC curves, extraction pairs, report plots) is drawn with
``pyplot()`` (matplotlib on the non-interactive Agg backend, imported only when a figure is drawn) and written
with :func:`save_png` (temporary file + rename, so a killed run never leaves half a PNG) or turned into bytes
with :func:`png_bytes` (embedded in the HTML report). Both close the figure.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed, same output on every machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 110, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically and close it; returns the path."""
    from diffaudit.io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    return Path(path)


def png_bytes(fig: Any, dpi: int = 80) -> bytes:
    """``fig`` as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
