"""Safeguards: a copy filter against its calibrated false-block rate, tag-and-scrub against its catch rate.

Read from ``decisions.json`` / ``index.json`` (``calibration``), loop metrics rows with ``filter``, and runs of
kind ``mitigations``.
"""

from __future__ import annotations

from typing import Any

from diffaudit.report.card import CLEAR, RISK, SEVERITY, UNCLEAR, Card, as_float, as_int, dig, num
from diffaudit.report.files import RunData
from diffaudit.report.stats import interval_pct, pct, wilson


# ---- safeguards ------------------------------------------------------------------------------------------
def copy_filter_of(run: RunData) -> dict[str, Any] | None:
    """Calibration and decisions of a copy-filter run (index.json and/or decisions.json); None if not one."""
    decisions = run.json("decisions.json")
    calib = dig(decisions, "filter", "calibration") or dig(run.json("index.json"), "calibration")
    if not isinstance(calib, dict):
        return None
    # The robust rule (crop/flip/shift-aligned, docs/safeguards.md) is the active one whenever the index has it,
    # unless decisions.json names another rule: its own calibrated rate is then the one to report.
    rule = dig(decisions, "filter", "rule")
    robust = isinstance(calib.get("robust"), dict) and rule in (None, "auto", "robust")
    source = "robust" if robust else "calibrated"
    return {
        "rule": source,
        "n_holdout": as_int(calib.get("num_holdout")),
        "target": as_float(dig(calib, source, "target_fpr")),
        "rate": as_float(dig(calib, source, "achieved_false_block_rate")),
        "absolute": as_float(dig(calib, "absolute", "achieved_false_block_rate")),
        "delta": as_float(dig(calib, "absolute", "delta")),
        "blocked": as_int(dig(decisions, "summary", "num_blocked")),
        "images": as_int(dig(decisions, "summary", "num_images")),
    }


def scrub_of(run: RunData) -> dict[str, int] | None:
    """Totals of a loop's tag-and-scrub filter rows; None when the run has none."""
    filters = [r["filter"] for r in run.rows if isinstance(r.get("filter"), dict)]
    if not filters:
        return None
    total = {
        key: sum(as_int(f.get(key)) or 0 for f in filters)
        for key in ("synthetic_in", "synthetic_removed", "synthetic_slipped", "real_removed", "num_in")
    }
    total["real_in"] = total["num_in"] - total["synthetic_in"]
    return total


def safeguards_card(runs: list[RunData]) -> Card:
    """Copy filter and tag-and-scrub, each against the rate it was calibrated to."""
    card = Card("safeguards", "Safeguards")
    filters = [(run, f) for run in runs if (f := copy_filter_of(run)) is not None]
    scrubs = [(run, s) for run in runs if (s := scrub_of(run)) is not None]
    mitigations = [run for run in runs if run.kind == "mitigations"]
    if not (filters or scrubs or mitigations):
        card.verdict = "No safeguard run was given (copy filter, tag-and-scrub, mitigations), so none was measured."
        return card
    statuses: list[str] = []
    sentences: list[str] = []
    if filters:
        run, f = filters[0]
        if f["rate"] is not None and f["n_holdout"]:
            lo, hi = wilson(round(f["rate"] * f["n_holdout"]), f["n_holdout"])
            target = f["target"]
            over = target is not None and lo > target
            statuses.append(RISK if over else CLEAR)
            which = " (robust rule)" if f["rule"] == "robust" else ""
            card.number = (
                f"Copy filter{which} wrongly blocks {pct(f['rate'])} of {f['n_holdout']} held-out real images "
                f"({interval_pct(lo, hi)})"
            )
            card.comparison = (
                f"Compared with its calibrated target of {pct(target)}" if target is not None else "No target recorded"
            ) + (
                f"; the fixed rule δ = {num(f['delta'])} would block {pct(f['absolute'])}."
                if f["absolute"] is not None
                else "."
            )
            sentences.append(
                "The copy filter blocks more real images than it was calibrated to."
                if over
                else "The copy filter holds its calibrated false-block rate"
            )
        else:
            statuses.append(UNCLEAR)
            sentences.append("A copy filter was built but its calibration was not recorded")
        if f["images"] is not None:
            sentences[-1] = (
                sentences[-1].rstrip(".") + f" and blocked {f['blocked']} of {f['images']} generated samples."
            )
        else:
            sentences[-1] = sentences[-1].rstrip(".") + "; it was not run on generated samples."
    for _run, s in scrubs[:1]:
        syn, caught = s["synthetic_in"], s["synthetic_removed"]
        lo, hi = wilson(caught, syn)
        line = (
            f"Tag-and-scrub removed {caught} of {syn} tagged synthetic images before retraining "
            f"({interval_pct(lo, hi)}; {s['synthetic_slipped']} slipped through) and {s['real_removed']} of "
            f"{s['real_in']} real images."
        )
        statuses.append(RISK if syn and s["synthetic_slipped"] > 0.1 * syn else CLEAR)
        if card.number:
            card.notes.append(line)
        else:
            card.number = line
            card.comparison = "Compared with all tagged images removed and no real image lost."
            sentences.append("Tag-and-scrub keeps tagged synthetic images out of retraining.")
    if mitigations:
        card.notes.append(f"{len(mitigations)} mitigation runs: see the mitigations table.")
        statuses.append(UNCLEAR if not statuses else CLEAR)
    card.status = max(statuses, key=lambda s: SEVERITY[s]) if statuses else UNCLEAR
    card.verdict = " ".join(s if s.endswith(".") else s + "." for s in sentences) or (
        "Mitigation runs were given; their numbers are in the mitigations table."
    )
    card.links = [
        (r.anchor + "-evidence", r.name) for r in dict.fromkeys([r for r, _ in filters + scrubs] + mitigations)
    ]
    if mitigations:
        card.links.append(("mitigations", "mitigations table"))
    return card
