"""Side-by-side views: a loop's arms with their control on one plot, and all mitigation runs in one table.

(MIA attacks already share one ROC: the ``roc.png`` every MIA run writes plots all attacks on the evaluation
split, and the report embeds it next to the attack table.)
"""

from __future__ import annotations

from typing import Any

from diffaudit.report.card import dig
from diffaudit.report.files import Image, RunData
from diffaudit.report.markup import figure, table
from diffaudit.report.plots import loop_arms_png
from diffaudit.report.risks_loop import is_control, metric_key

# Plotted next to the verdict metric when the arms have them: quality (FID) and diversity (recall, coverage).
LOOP_PLOT_KEYS = ("all/fid", "heldout/fid", "all/recall", "all/coverage")


def loop_figure(run: RunData) -> str:
    """The arms-vs-control figure of a loop run ('' when the run has no arms)."""
    arms = dig(run.json("summary.json"), "arms")
    if not isinstance(arms, dict) or not arms:
        return ""
    arms = {str(k): v for k, v in arms.items() if isinstance(v, dict)}
    control = next((n for n, a in arms.items() if is_control(n, a)), None)
    keys = [k for k in LOOP_PLOT_KEYS if any(k in (a.get("curves") or {}) for a in arms.values())]
    if not keys:
        first = next(iter(arms.values()))
        key = metric_key(first.get("curves") or {})
        keys = [key] if key else []
    png = loop_arms_png(arms, control, keys)
    if png is None:
        return ""
    caption = (
        f"Arms against the control arm {control} (black, dashed) per generation; bands: 95% interval over repeats"
        if control
        else "Arms per generation. No control arm (0% synthetic) in this run, so no curve to compare with"
    )
    return figure(Image(png, "image/png", "arms.png"), caption, wide=True)


def _mitigation_rows(run: RunData) -> list[dict[str, Any]]:
    """Rows of one mitigations run, whatever shape its results take (list, named dict, or one summary)."""
    res = run.files.get("results.json")
    candidates: list[Any] = []
    if isinstance(res, list):
        candidates = res
    elif isinstance(res, dict):
        for key in ("mitigations", "rows", "results"):
            value = res.get(key)
            if isinstance(value, list):
                candidates = value
                break
            if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
                candidates = [{"mitigation": k, **v} for k, v in value.items()]
                break
        else:
            summary = res.get("summary") if isinstance(res.get("summary"), dict) else res
            candidates = [summary]
    rows = [r for r in candidates if isinstance(r, dict)] or run.rows
    return [{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in rows]


def mitigations_table(runs: list[RunData]) -> str:
    """All runs of kind ``mitigations`` as one sortable table with a ``run`` column ('' when there are none)."""
    rows = [{"run": run.name, **row} for run in runs if run.kind == "mitigations" for row in _mitigation_rows(run)]
    if not rows:
        return ""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    body = table(keys[:30], ([r.get(k, "") for k in keys[:30]] for r in rows), sortable=True)
    return f'<section id="mitigations"><h2>Mitigations compared</h2>{body}</section>'
