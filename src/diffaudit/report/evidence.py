"""Per run, the short tables of the numbers the findings and cards cite (not every key of the result files).

Each table is chosen by the keys a run wrote (same rule as the cards), so any run kind that writes MIA
attacks, extraction summaries, loop arms or copy-filter calibration gets the matching table. A run with none of
these gets the scalar values of its result summaries; the full files stay available under the raw data.
"""

from __future__ import annotations

from typing import Any

from diffaudit.report.card import as_float, as_int, dig, num
from diffaudit.report.files import RunData
from diffaudit.report.markup import esc, key_table, table
from diffaudit.report.risks_loop import is_control, loop_comparison, metric_key
from diffaudit.report.risks_privacy import attacks_of, extraction_of
from diffaudit.report.risks_safeguards import copy_filter_of, scrub_of
from diffaudit.report.stats import auc_interval, pct, wilson


def mia_table(run: RunData) -> str:
    """One row per attack: AUC with its interval, TPR at low FPR (or 'below resolution'), class sizes."""
    attacks = attacks_of(run)
    if not attacks:
        return ""
    rows = []
    for name, a in attacks.items():
        n_in, n_out = int(a["num_members"]), int(a["num_nonmembers"])
        lo, hi = auc_interval(float(a["auc"]), n_in, n_out)
        below = a.get("below_resolution") if isinstance(a.get("below_resolution"), list) else []

        def tpr(key: str, below: list[Any] = below, a: dict[str, Any] = a) -> Any:
            value = a.get(key)
            return f"{num(value)} (below resolution)" if key in below else value

        rows.append(
            [name, a.get("t"), a["auc"], f"{lo:.2f}–{hi:.2f}", tpr("tpr@1%fpr"), tpr("tpr@0.1%fpr"), n_in, n_out]
        )
    header = ["attack", "t", "AUC", "AUC 95% CI", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "members", "non-members"]
    return table(header, rows, sortable=True, caption="Membership inference attacks (chance: AUC 0.5)")


def extraction_table(run: RunData) -> str:
    e = extraction_of(run)
    if e is None:
        return ""
    res = run.results()
    u = dig(res, "untargeted", "summary") or {}
    pairs: list[tuple[str, Any]] = [("training images extracted (distinct)", e["extracted"])]
    if e["num_train"]:
        lo, hi = wilson(e["extracted"], e["num_train"])
        pairs += [("training set size", e["num_train"]), ("extracted share, 95% CI", f"{pct(lo)}–{pct(hi)}")]
    pairs += [
        ("generations searched", e["generated"]),
        ("match distance δ (normalized L2)", e["delta"]),
        ("clique filter: labels flagged", dig(res, "summary", "num_flagged")),
        ("clique filter: images extracted", dig(res, "summary", "num_extracted")),
        ("edge threshold", dig(res, "edge_threshold", "value")),
        ("edge threshold source", dig(res, "edge_threshold", "source")),
        ("adaptive ratio: training images extracted", u.get("num_train_extracted")),
        ("generations within δ of a training image", pct(e["within_delta"]) if e["within_delta"] is not None else None),
    ]
    return key_table([(k, v) for k, v in pairs if v is not None], caption="Extraction")


def loop_table(run: RunData) -> str:
    """One row per arm: synthetic share, the verdict metric at generation 0 and at the end of poisoning."""
    arms = dig(run.json("summary.json"), "arms")
    cmp = loop_comparison(run)
    if not isinstance(arms, dict) or cmp is None:
        return ""
    rows = []
    control = cmp["control"]
    by_arm = {r["arm"]: r for r in cmp["arms"]}
    for name, arm in arms.items():
        if not isinstance(arm, dict):
            continue
        cfg = arm.get("config") if isinstance(arm.get("config"), dict) else {}
        count, share = cfg.get("synthetic_count"), cfg.get("synthetic_share")
        synthetic = (
            f"{count} of {cfg.get('train_size', '?')}" if count is not None else pct(share) if share is not None else ""
        )
        r = by_arm.get(name)
        key = (r or {}).get("metric") or metric_key(arm.get("curves") or {})
        curve = (arm.get("curves") or {}).get(key) or {}
        mean = curve.get("mean") if isinstance(curve.get("mean"), list) else []
        end = (
            r["value"]
            if r
            else (mean[min(len(mean) - 1, as_int(cfg.get("poison_generations")) or 0)] if mean else None)
        )
        band = f"{num(r['low'])}–{num(r['high'])}" if r and r["low"] is not None and r["low"] != r["high"] else "—"
        rows.append(
            [
                name + (" (control)" if name == control or is_control(str(name), arm) else ""),
                cfg.get("mode", ""),
                synthetic,
                key,
                mean[0] if mean else None,
                end,
                band,
                mean[-1] if mean else None,
                len(arm.get("repeats") or [0]),
            ]
        )
    header = ["arm", "mode", "synthetic", "metric", "gen 0", "end of poisoning", "95% interval", "last gen", "repeats"]
    note = (
        "" if control else "<p class='warn'>No control arm (0% synthetic data): no arm can be judged against one.</p>"
    )
    return table(header, rows, sortable=True, caption="Loop arms") + note


def copy_filter_table(run: RunData) -> str:
    f = copy_filter_of(run)
    pairs: list[tuple[str, Any]] = []
    if f is not None:
        if f["rate"] is not None and f["n_holdout"]:
            lo, hi = wilson(round(f["rate"] * f["n_holdout"]), f["n_holdout"])
            pairs.append(("false-block rate on held-out real images", f"{pct(f['rate'])} (95% CI {pct(lo)}–{pct(hi)})"))
        pairs += [
            ("calibration target", pct(f["target"]) if f["target"] is not None else None),
            ("held-out real images", f["n_holdout"]),
            (f"fixed rule δ = {num(f['delta'])}: false-block rate", pct(f["absolute"]) if f["absolute"] else None),
            ("generated samples checked", f["images"]),
            ("generated samples blocked", f["blocked"]),
            ("ms per image", as_float(dig(run.json("decisions.json"), "summary", "ms_per_image"))),
        ]
    s = scrub_of(run)
    if s is not None:
        pairs += [
            ("tag-and-scrub: synthetic images in", s["synthetic_in"]),
            ("tag-and-scrub: synthetic removed", s["synthetic_removed"]),
            ("tag-and-scrub: synthetic slipped through", s["synthetic_slipped"]),
            ("tag-and-scrub: real images removed", f"{s['real_removed']} of {s['real_in']}"),
        ]
    pairs = [(k, v) for k, v in pairs if v is not None]
    return key_table(pairs, caption="Safeguards") if pairs else ""


def generic_table(run: RunData) -> str:
    """Scalar values of each result file's ``summary`` (or top level), for kinds the report does not know."""
    pairs: list[tuple[str, Any]] = []
    for name, data in run.files.items():
        if not isinstance(data, dict):
            continue
        src = data.get("summary") if isinstance(data.get("summary"), dict) else data
        pairs += [(f"{name}: {k}", v) for k, v in src.items() if isinstance(v, int | float | str | bool)][:12]
    return key_table(pairs, caption="Result summary") if pairs else ""


def key_numbers(run: RunData) -> str:
    """The key-number tables that apply to ``run`` (by its result keys), or the generic one."""
    parts = [t for build in (mia_table, extraction_table, loop_table, copy_filter_table) if (t := build(run))]
    if not parts and run.kind != "train":
        parts = [generic_table(run)]
    if run.kind == "train" and run.rows:
        last = run.rows[-1]
        pairs = [
            ("steps", last.get("step")),
            ("final loss", last.get("loss")),
            ("model id", run.manifest.get("model_id")),
        ]
        parts.append(key_table([(k, v) for k, v in pairs if v is not None], caption="Training"))
    return "".join(p for p in parts if p) or f"<p class='meta'>No result numbers found in {esc(run.name)}.</p>"
