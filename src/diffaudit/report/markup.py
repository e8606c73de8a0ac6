"""HTML building blocks; every value from a run or a user passes through :func:`esc` here.

Links are only ever in-page anchors built by :func:`diffaudit.report.files.slug` (letters, digits, dashes), so
no run can put a ``javascript:`` or remote URL into the page.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from diffaudit.report.files import Image

MAX_TABLE_ROWS = 500


def esc(value: object) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Display form of a table cell: floats to 4 significant digits, JSON for lists and dicts."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        text = json.dumps(value, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def anchor_link(anchor: str, label: str) -> str:
    """An in-page link; ``anchor`` must come from ``slug``-built ids (checked, so a mistake cannot leak a URL)."""
    if not all(c.isalnum() or c == "-" for c in anchor):
        raise ValueError(f"not an in-page anchor: {anchor!r}")
    return f'<a href="#{anchor}">{esc(label)}</a>'


def img_tag(image: Image, alt: str) -> str:
    data = base64.b64encode(image.data).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:{image.mime};base64,{data}">'


def figure(image: Image, caption: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f"<figure{cls}>{img_tag(image, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def _sort_value(value: Any) -> str:
    """``data-v`` attribute for numeric cells, so the sorting script compares numbers, not text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f' data-v="{float(value)!r}"'
    return ""


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], sortable: bool = False, caption: str = "", limit: int = 0
) -> str:
    """A table; ``sortable`` marks it for the (optional) sorting script. Cells are escaped."""
    rows = list(rows)
    limit = limit or MAX_TABLE_ROWS
    cls = ' class="sortable"' if sortable else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{_sort_value(v)}>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows[:limit]
    )
    more = f"<p class='meta'>{len(rows) - limit} more rows in the file.</p>" if len(rows) > limit else ""
    return f"<table{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def key_table(pairs: Iterable[tuple[str, Any]], caption: str = "") -> str:
    """A two-column table of (quantity, value) rows, the quantity as a row header."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    body = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{esc(fmt(v))}</td></tr>' for k, v in pairs)
    return f'<table class="keys">{cap}<tbody>{body}</tbody></table>'


def details(summary: str, body: str, cls: str = "raw") -> str:
    """Collapsed content (open without JavaScript by clicking; hidden when printed for ``raw``)."""
    return f'<details class="{cls}"><summary>{esc(summary)}</summary>{body}</details>'


def flatten(obj: Any, prefix: str = "", depth: int = 0) -> Iterable[tuple[str, Any]]:
    """(dotted key, scalar) rows of nested dicts; long lists are summarised by their length."""
    if isinstance(obj, dict):
        if depth >= 6:
            yield prefix.rstrip("."), f"{{{len(obj)} keys}}"
            return
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}{key}.", depth + 1)
    elif isinstance(obj, list):
        short = len(obj) <= 8 and all(not isinstance(v, dict | list) for v in obj)
        yield prefix.rstrip("."), ", ".join(fmt(v) for v in obj) if short else f"[{len(obj)} items]"
    else:
        yield prefix.rstrip("."), obj


def rows_table(rows: list[dict[str, Any]], max_columns: int = 40) -> str:
    """All scalar columns of JSON rows (e.g. metrics.jsonl) as one sortable table."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, dict)]
    keys = keys[:max_columns]
    return table(keys, ([r.get(k, "") for k in keys] for r in rows), sortable=True)
