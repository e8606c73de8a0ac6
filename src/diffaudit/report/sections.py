"""One run's section: findings, then evidence (key numbers and figures, visible), then raw data (collapsed).

Ids: ``run-<i>-<name>`` for the section, ``...-evidence`` for the numbers and figures the summary cards link
to, ``...-raw`` for the collapsed files.
"""

from __future__ import annotations

import json

from diffaudit.report.card import Card
from diffaudit.report.comparisons import loop_figure
from diffaudit.report.evidence import key_numbers
from diffaudit.report.files import Image, RunData, run_images
from diffaudit.report.findings import findings_for
from diffaudit.report.markup import anchor_link, details, esc, figure, flatten, key_table, rows_table, table
from diffaudit.report.plots import metric_curves_png

# Result files shown as flattened tables under the raw data; scores.json (one row per sample) is a row table.
RAW_KEY_FILES = ("results.json", "summary.json", "metrics.json", "decisions.json", "index.json", "safeguard.json")


def card_html(card: Card) -> str:
    """One summary card: status badge, verdict, key number, what it is compared with, links to evidence."""
    links = " · ".join(anchor_link(a, label) for a, label in card.links)
    notes = "".join(f"<li>{esc(n)}</li>" for n in card.notes)
    return (
        f'<article class="card {esc(card.status)}" id="{card.anchor}">'
        f'<h3><span>{esc(card.title)}</span><span class="badge">{esc(card.label)}</span></h3>'
        f'<p class="verdict">{esc(card.verdict)}</p>'
        + (f'<p class="number">{esc(card.number)}</p>' if card.number else "")
        + (f'<p class="comparison">{esc(card.comparison)}</p>' if card.comparison else "")
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
        + (f'<p class="links">Evidence: {links}</p>' if links else "")
        + "</article>"
    )


def _figures(run: RunData) -> str:
    figs = []
    loop = loop_figure(run)
    if loop:
        figs.append(loop)
    curve = metric_curves_png(run.rows, run.kind)
    if curve is not None:
        figs.append(figure(Image(curve, "image/png", "metrics.png"), f"{run.kind} metrics per step / generation"))
    figs += [figure(img, img.rel) for img in run_images(run.path)]
    return "<div class='figs'>" + "".join(figs) + "</div>" if figs else ""


def _raw(run: RunData) -> str:
    parts = []
    for name in RAW_KEY_FILES:
        data = run.files.get(name)
        if data is not None:
            body = table(["key", "value"], flatten(data), sortable=True)
            parts.append(details(f"{name} (all values)", f"<div class='scroll'>{body}</div>"))
    scores = run.files.get("scores.json")
    if isinstance(scores, list) and scores and all(isinstance(r, dict) for r in scores[:5]):
        rows = [r for r in scores if isinstance(r, dict)]
        parts.append(details(f"scores.json ({len(rows)} rows)", f"<div class='scroll'>{rows_table(rows)}</div>"))
    if run.rows:
        parts.append(
            details(f"metrics.jsonl ({len(run.rows)} rows)", f"<div class='scroll'>{rows_table(run.rows)}</div>")
        )
    parts.append(
        details("Resolved configuration", "<pre>" + esc(json.dumps(run.config, indent=2, default=str)) + "</pre>")
    )
    env = run.manifest.get("environment")
    if isinstance(env, dict):
        parts.append(details("Versions and machine", key_table(env.items())))
    return "".join(parts)


def run_section(run: RunData) -> str:
    """The HTML section for one loaded run."""
    status = run.status
    parts = [
        f'<section class="run" id="{run.anchor}"><h2>{esc(run.kind)}: {esc(run.name)}</h2>',
        f"<p class='meta'>path {esc(run.path)} · status {esc(status)} · started "
        f"{esc(run.manifest.get('started', '?'))} · ended {esc(run.manifest.get('ended', '?'))}</p>",
    ]
    if status != "finished":
        parts.append(f"<p class='warn'>This run did not finish (status {esc(status)}); results may be partial.</p>")
    findings = findings_for(run.kind, run.path, run.manifest, run.config, run.rows, run.files)
    if findings:
        parts.append("<ul class='findings'>" + "".join(f"<li>{esc(f)}</li>" for f in findings) + "</ul>")
    parts.append(f'<div id="{run.anchor}-evidence"><h3>Evidence</h3>{key_numbers(run)}{_figures(run)}</div>')
    parts.append(f'<div id="{run.anchor}-raw"><h3 class="noprint">Raw data</h3>{_raw(run)}</div></section>')
    return "\n".join(parts)
