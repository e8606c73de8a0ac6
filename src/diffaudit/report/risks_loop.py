"""Self-consumption / collapse: each loop arm against the run's 0%-synthetic control arm.

Read from ``summary.json`` ``arms`` (loop, loop-merge). Without a control arm there is no verdict: a metric
that moves over generations may move just as much when retraining on real data alone (forgetting, drift).
"""

from __future__ import annotations

from typing import Any

from diffaudit.report.card import CLEAR, RISK, SEVERITY, UNCLEAR, Card, as_float, as_int, dig, num
from diffaudit.report.files import RunData

# ---- self-consumption / collapse -------------------------------------------------------------------------
LOWER_IS_BETTER = ("fid", "kid")


def is_control(name: str, arm: dict[str, Any]) -> bool:
    """The 0%-synthetic arm: named ``control`` or with synthetic share / count 0 (e.g. ``share-0``)."""
    cfg = arm.get("config") if isinstance(arm.get("config"), dict) else {}
    if name.lower() == "control":
        return True
    share, count = cfg.get("synthetic_share"), cfg.get("synthetic_count")
    return (isinstance(share, int | float) and share == 0 and not count) or (
        isinstance(count, int) and count == 0 and not share
    )


def metric_key(curves: dict[str, Any]) -> str | None:
    """The curve a verdict is read from: FID over all classes when present, else any FID, else the first."""
    keys = [k for k, v in curves.items() if isinstance(v, dict) and isinstance(v.get("mean"), list) and v["mean"]]
    for pick in (lambda k: k == "all/fid", lambda k: k.endswith("fid"), lambda k: "fid" in k):
        match = next((k for k in keys if pick(k)), None)
        if match:
            return match
    return keys[0] if keys else None


def _at(curve: dict[str, Any], part: str, i: int) -> float | None:
    values = curve.get(part)
    return as_float(values[i]) if isinstance(values, list) and -len(values) <= i < len(values) else None


def _poison_index(arm: dict[str, Any], length: int) -> int:
    """Index of the last poisoning generation in the arm's curves (generation G, before healing)."""
    g = as_int(dig(arm, "config", "poison_generations"))
    gens = arm.get("generations") if isinstance(arm.get("generations"), list) else list(range(length))
    if g is not None and g in gens:
        return min(gens.index(g), length - 1)
    return length - 1


def loop_comparison(run: RunData) -> dict[str, Any] | None:
    """Each poisoned arm against the run's control at the last poisoning generation; None if not a loop."""
    arms = dig(run.json("summary.json"), "arms")
    if not isinstance(arms, dict) or not arms:
        return None
    arms = {str(k): v for k, v in arms.items() if isinstance(v, dict) and isinstance(v.get("curves"), dict)}
    control = next((n for n, a in arms.items() if is_control(n, a)), None)
    out: dict[str, Any] = {"control": control, "arms": []}
    for name, arm in arms.items():
        if name == control:
            continue
        key = metric_key(arm["curves"])
        if key is None:
            continue
        curve = arm["curves"][key]
        i = _poison_index(arm, len(curve["mean"]))
        row: dict[str, Any] = {
            "arm": name,
            "metric": key,
            "generation": (arm.get("generations") or list(range(i + 1)))[i],
            "start": _at(curve, "mean", 0),
            "value": _at(curve, "mean", i),
            "low": _at(curve, "low", i),
            "high": _at(curve, "high", i),
            "repeats": len(arm.get("repeats") or [0]),
        }
        ccurve = dig(arms.get(control or ""), "curves", key)
        if isinstance(ccurve, dict):
            row |= {
                "control": _at(ccurve, "mean", i),
                "control_low": _at(ccurve, "low", i),
                "control_high": _at(ccurve, "high", i),
            }
        lower_better = any(t in key.lower() for t in LOWER_IS_BETTER)
        if row["value"] is not None and row.get("control") is not None:
            row["excess"] = (row["value"] - row["control"]) * (1 if lower_better else -1)
        row["lower_better"] = lower_better
        out["arms"].append(row)
    return out


def _loop_verdict(run: RunData, cmp: dict[str, Any]) -> tuple[str, str, str, str]:
    """(status, verdict, number, comparison) for one loop run."""
    rows = cmp["arms"]
    if not rows:
        return UNCLEAR, "The loop run has no arm with a metric curve.", "", ""
    if cmp["control"] is None:
        r = rows[0]
        more = f" (and {len(rows) - 1} more arms)" if len(rows) > 1 else ""
        return (
            UNCLEAR,
            "No control arm, so no verdict: without a 0%-synthetic arm trained alongside, the change cannot be "
            "told apart from what retraining on real data alone does.",
            f"{r['metric']} {num(r['start'])} → {num(r['value'])} by generation {r['generation']}, arm "
            f"{r['arm']}{more}",
            "No control arm (0% synthetic data) in this run to compare with.",
        )
    worst = max((r for r in rows if r.get("excess") is not None), key=lambda r: r["excess"], default=rows[0])
    metric, gen = worst["metric"], worst["generation"]
    number = (
        f"{metric} {num(worst['value'])}{_band(worst, '')} for arm {worst['arm']} vs "
        f"{num(worst.get('control'))}{_band(worst, 'control_')} for control {cmp['control']}, generation {gen}"
    )
    comparison = f"Compared with the control arm {cmp['control']} (0% synthetic data), same generation."
    bands = worst["low"] != worst["high"] and worst.get("control_low") != worst.get("control_high")
    if not bands or worst["repeats"] < 2 or None in (worst["low"], worst["high"], worst.get("control_low")):
        direction = "worse" if (worst.get("excess") or 0) > 0 else "not worse"
        return (
            UNCLEAR,
            f"Indicative only: the most self-consumed arm is {direction} than the control, but one repeat gives "
            "no interval, so the difference may be noise.",
            number,
            comparison,
        )
    # Separated: the arm's interval lies entirely on the worse side of the control's.
    lower_better = worst["lower_better"]
    separated = worst["low"] > worst["control_high"] if lower_better else worst["high"] < worst["control_low"]
    if separated:
        return (
            RISK,
            f"Training on its own outputs degrades the model: arm {worst['arm']} is worse than the control, "
            "beyond the repeat-to-repeat spread.",
            number,
            comparison,
        )
    return (
        CLEAR,
        "No collapse detected at this run's resolution: every arm's interval overlaps the control's.",
        number,
        comparison,
    )


def _band(row: dict[str, Any], prefix: str) -> str:
    lo, hi = row.get(prefix + "low"), row.get(prefix + "high")
    if lo is None or hi is None or lo == hi:
        return ""
    return f" (95% interval {num(lo)}–{num(hi)})"


def collapse_card(runs: list[RunData]) -> Card:
    """Self-consuming loops: the most severe loop run (a run with a control beats one without) leads."""
    card = Card("collapse", "Self-consumption / collapse")
    found = [(run, c) for run in runs if (c := loop_comparison(run)) is not None]
    if not found:
        card.verdict = "No self-consuming loop run was given, so collapse was not measured."
        return card
    judged = [(run, _loop_verdict(run, c)) for run, c in found]
    with_control = [j for j, (_, c) in zip(judged, found, strict=True) if c["control"] is not None]
    pool = with_control or judged
    run, (status, verdict, number, comparison) = max(pool, key=lambda j: SEVERITY[j[1][0]])
    card.status, card.verdict, card.number, card.comparison = status, verdict, number, comparison
    card.links = [(r.anchor + "-evidence", r.name) for r, _ in found]
    if len(found) > 1:
        card.notes.append(f"Shown: {run.name}, one of {len(found)} loop runs in this report.")
    return card
