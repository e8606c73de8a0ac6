"""One self-contained HTML page for one or more run directories.

Everything is embedded (images as data URIs, inline CSS); nothing is fetched from a network. Every string that
comes from a user or a run (paths, labels, class names, prompts, config values) goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffaudit.io import read_jsonl
from diffaudit.report.findings import findings_for
from diffaudit.report.plots import metric_curves_png
from diffaudit.runs import read_manifest

MAX_IMAGES_PER_RUN = 24
MAX_IMAGE_BYTES = 3 * 2**20
# summary.json (loop) is summarised by its findings; its nested curves make a poor table.
RESULT_FILES = ("results.json", "metrics.json", "decisions.json", "index.json")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1b1b;
line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2.5rem}
h3{font-size:1.05rem;margin-top:1.4rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}td,th{border:1px solid #ddd;padding:.2rem .5rem;
text-align:left;vertical-align:top}th{background:#f4f4f4}
.findings li{margin:.3rem 0}.figs{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;max-width:100%}figure img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
figcaption{font-size:.8rem;color:#555}pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.78rem}
.meta{color:#555;font-size:.85rem}.warn{color:#9a3412}
"""


def esc(value: object) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape(str(value), quote=True)


def _img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_img_tag(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def _scalar_rows(obj: Any, prefix: str = "", depth: int = 0) -> Iterable[tuple[str, Any]]:
    """Flatten nested dicts into (dotted key, scalar) rows; long lists and deep nesting are summarised."""
    if isinstance(obj, dict):
        if depth >= 4:
            yield prefix.rstrip("."), f"{{{len(obj)} keys}}"
            return
        for key, value in obj.items():
            yield from _scalar_rows(value, f"{prefix}{key}.", depth + 1)
    elif isinstance(obj, list):
        short = len(obj) <= 8 and all(not isinstance(v, dict | list) for v in obj)
        yield prefix.rstrip("."), ", ".join(_fmt(v) for v in obj) if short else f"[{len(obj)} items]"
    else:
        yield prefix.rstrip("."), obj


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Iterable[tuple[str, Any]], limit: int = 60) -> str:
    rows = list(rows)
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in rows[:limit])
    more = f"<p class='meta'>{len(rows) - limit} more values in the JSON file.</p>" if len(rows) > limit else ""
    return f"<table>{body}</table>{more}"


def _rows_table(rows: list[dict[str, Any]], limit: int = 40) -> str:
    if not rows:
        return ""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, dict | list)]
    keys = keys[:12]
    shown = rows if len(rows) <= limit else rows[:: max(1, len(rows) // limit)]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in shown)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pngs(run: Path) -> list[Path]:
    """PNG files of a run (top level first, then one level down), newest generation grids last."""
    found = sorted(run.glob("*.png")) + sorted(p for p in run.glob("*/*.png") if "checkpoints" not in p.parts)
    return [p for p in found if p.stat().st_size <= MAX_IMAGE_BYTES][:MAX_IMAGES_PER_RUN]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_section(run: Path) -> str:
    """The HTML section for one run directory."""
    manifest = read_manifest(run)
    kind = str(manifest.get("kind", "run"))
    config = _load_json(run / "config.json") or {}
    rows = read_jsonl(run / "metrics.jsonl")
    results = {name: data for name in RESULT_FILES if (data := _load_json(run / name)) is not None}
    parts = [f"<section><h2>{esc(kind)}: {esc(run.name)}</h2>"]
    status = manifest.get("status", "?")
    parts.append(
        f"<p class='meta'>path {esc(run)} · status {esc(status)} · started {esc(manifest.get('started', '?'))}"
        f" · ended {esc(manifest.get('ended', '?'))}</p>"
    )
    if status != "finished":
        parts.append(f"<p class='warn'>This run did not finish (status {esc(status)}); results may be partial.</p>")
    findings = findings_for(kind, run, manifest, config, rows, results)
    if findings:
        parts.append(
            "<h3>Findings</h3><ul class='findings'>" + "".join(f"<li>{esc(f)}</li>" for f in findings) + "</ul>"
        )
    figures = []
    curve = metric_curves_png(rows, kind)
    if curve is not None:
        figures.append(_figure(curve, f"{kind} metrics per step / generation"))
    for png in _pngs(run):
        figures.append(_figure(png.read_bytes(), str(png.relative_to(run))))
    if figures:
        parts.append("<h3>Figures</h3><div class='figs'>" + "".join(figures) + "</div>")
    for name, data in results.items():
        parts.append(f"<h3>{esc(name)}</h3>" + _table(_scalar_rows(data)))
    if rows:
        parts.append("<h3>metrics.jsonl</h3>" + _rows_table(rows))
    parts.append(
        "<details><summary>Resolved configuration</summary><pre>"
        + esc(json.dumps(config, indent=2, default=str))
        + "</pre></details>"
    )
    env = manifest.get("environment", {})
    parts.append("<details><summary>Versions and machine</summary>" + _table(env.items()) + "</details>")
    parts.append("</section>")
    return "\n".join(parts)


def build_report(runs: list[Path], title: str = "diffaudit report") -> str:
    """A complete, self-contained HTML document covering ``runs`` (each a run directory)."""
    sections = [run_section(Path(r)) for r in runs]
    toc = "".join(f"<li>{esc(read_manifest(r).get('kind', 'run'))}: {esc(Path(r).name)}</li>" for r in runs)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><ul>{toc}</ul>"
        + "\n".join(sections)
        + "<p class='meta'>Generated by diffaudit; every image is embedded and nothing is loaded from a network.</p>"
        "</body></html>"
    )
