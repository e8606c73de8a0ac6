"""Findings in plain words, one function per run kind.

Each function reads what its command wrote (manifest, config, metrics rows, result JSON files) and returns short
sentences with the numbers, e.g. "12 of 100 training faces extracted at delta = 0.15". A kind without a function
gets the generic summary. Missing keys give fewer sentences, never an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffaudit.report.files import read_json

# (run dir, manifest, config, metrics rows, parsed JSON files by name) -> sentences. The JSON files come from
# diffaudit.report.files, which reads only regular files inside the run.
Findings = Callable[[Path, dict[str, Any], dict[str, Any], list[dict[str, Any]], dict[str, Any]], list[str]]
_REGISTRY: dict[str, Findings] = {}


def register(kind: str) -> Callable[[Findings], Findings]:
    def wrap(fn: Findings) -> Findings:
        _REGISTRY[kind] = fn
        return fn

    return wrap


def _num(value: Any, fmt: str = ".3g") -> str:
    return format(value, fmt) if isinstance(value, int | float) else str(value)


def findings_for(
    kind: str,
    run: Path,
    manifest: dict[str, Any],
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    results: dict[str, Any],
) -> list[str]:
    """Sentences for one run; falls back to the generic summary for unknown kinds."""
    fn = _REGISTRY.get(kind, generic_findings)
    try:
        return fn(run, manifest, config, rows, results)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return [f"(could not summarise this {kind} run: {type(exc).__name__}: {exc})"]


def generic_findings(
    run: Path, manifest: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    out = []
    for name, data in results.items():
        summary = data.get("summary") if isinstance(data, dict) else None
        if isinstance(summary, dict):
            scalars = [f"{k} = {_num(v)}" for k, v in summary.items() if isinstance(v, int | float | str)][:8]
            if scalars:
                out.append(f"{name}: " + "; ".join(scalars))
    return out


@register("train")
def train_findings(
    run: Path, manifest: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    out = []
    data = config.get("data", {})
    info = config.get("data_info", {})
    steps = config.get("train", {}).get("steps")
    out.append(
        f"Trained preset {config.get('preset')} for {steps} steps on {info.get('num_images', '?')} images "
        f"of {data.get('source')}; model id {manifest.get('model_id', '?')}."
    )
    if rows:
        first, last = rows[0], rows[-1]
        out.append(
            f"Training loss went from {_num(first.get('loss'))} (step {first.get('step')}) to "
            f"{_num(last.get('loss'))} (step {last.get('step')}), at about {_num(last.get('images_per_s'), '.0f')}"
            " images/s at the end."
        )
    if manifest.get("canaries"):
        counts = sorted({c["copies"] for c in manifest["canaries"]})
        out.append(f"{len(manifest['canaries'])} canary images were planted with copy counts {counts}.")
    return out


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else str(x)


@register("loop")
@register("loop-merge")
def loop_findings(
    run: Path, manifest: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    # Callers outside the report (tests, the loop CLI) may pass no files; read them here, inside the run only.
    summary = results["summary.json"] if "summary.json" in results else read_json(run, "summary.json")
    out = []
    arms = summary.get("arms") if isinstance(summary, dict) else None
    for name, arm in (arms if isinstance(arms, dict) else {}).items():
        cfg, curves, phases = arm["config"], arm["curves"], arm["phases"]
        share = (
            f"{cfg['synthetic_count']} of {cfg['train_size']}"
            if cfg.get("synthetic_count") is not None
            else _pct(cfg.get("synthetic_share"))
        )
        fid = curves.get("all/fid", {}).get("mean", [])
        g_p = cfg["poison_generations"]
        if fid and len(fid) > g_p:
            repeats = len(arm.get("repeats", []))
            mean_of = f" (mean of {repeats} repeats)" if repeats > 1 else ""
            text = (
                f"Arm {name} ({cfg['mode']}, {share} self-generated): FID (all classes){mean_of} went from "
                f"{_num(fid[0])} to {_num(fid[g_p])} by generation {g_p}"
            )
            if "poison" in phases and cfg.get("heal_generations", 0) > 0:
                text += f", and was {_num(fid[-1])} after {cfg['heal_generations']} real-only healing generations"
            out.append(text + ".")
        held = curves.get("heldout/fid", {}).get("mean", [])
        if held and len(held) > g_p and cfg.get("holdout_classes"):
            out.append(
                f"Held-out classes {cfg['holdout_classes']} (never retrained on synthetic data): FID "
                f"{_num(held[0])} -> {_num(held[g_p])}."
            )
        for key in ("all/fid", "all/recall", "all/coverage"):
            res = arm.get("healing", {}).get(key)
            if res:
                ratio = "undefined (" + str(res.get("reason")) + ")" if res.get("ratio") is None else _num(res["ratio"])
                out.append(f"Healing ratio of {key} (1 = full recovery): {ratio}; {res.get('noise_note', '')}.")
    filtered = [r["filter"] for r in rows if isinstance(r.get("filter"), dict)]
    if filtered:
        syn_in = sum(f.get("synthetic_in", 0) for f in filtered)
        out.append(
            f"Tag-and-scrub removed {sum(f.get('synthetic_removed', 0) for f in filtered)} of {syn_in} tagged "
            f"synthetic images before retraining ({sum(f.get('synthetic_slipped', 0) for f in filtered)} "
            f"slipped through) and {sum(f.get('real_removed', 0) for f in filtered)} real images."
        )
    guard = results["safeguard.json"] if "safeguard.json" in results else read_json(run, "safeguard.json")
    if isinstance(guard, dict) and guard.get("inherited_tag_rate_by_generation"):
        rates = ", ".join(f"gen {g}: {_pct(v)}" for g, v in guard["inherited_tag_rate_by_generation"].items())
        out.append(f"Share of each model's own (untagged) samples that already carry the tag: {rates}.")
    return out


@register("extract")
def extract_findings(
    run: Path, manifest: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    res = results.get("results.json") or {}
    summary, params = res.get("summary", {}), res.get("params", {})
    delta = params.get("delta", 0.15)
    edge = res.get("edge_threshold")
    edge = edge.get("value") if isinstance(edge, dict) else edge
    out = [
        f"Clique filter (k >= {params.get('min_clique', 10)}, edge threshold {_num(edge)}): "
        f"{summary.get('num_flagged', 0)} of {summary.get('num_labels', '?')} labels flagged, "
        f"{summary.get('num_extracted', 0)} training images extracted at delta = {delta}."
    ]
    untargeted = (res.get("untargeted") or {}).get("summary")
    if untargeted:
        out.append(
            f"Adaptive ratio (alpha {untargeted.get('alpha')}, n {untargeted.get('n_neighbors_used')}): "
            f"{untargeted.get('num_train_extracted')} of {untargeted.get('num_train')} training images extracted "
            f"({untargeted.get('num_extracted')} of {untargeted.get('num_generated')} generations); "
            f"{_pct(untargeted.get('frac_within_delta'))} of generations lie within delta = {delta} of some "
            "training image in plain L2."
        )
    return out


@register("mia")
def mia_findings(
    run: Path, manifest: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    res = results.get("results.json") or {}
    out = []
    for name, attack in res.get("attacks", {}).items():
        below = attack.get("below_resolution", [])
        note = (
            " (1% FPR is below this run's FPR resolution, so this is TPR at the lowest FPR measured)"
            if ("tpr@1%fpr" in below)
            else ""
        )
        out.append(
            f"{name}: AUC {_num(attack.get('auc'))}, TPR at 1% FPR {_num(attack.get('tpr@1%fpr'))}{note}, "
            f"t = {attack.get('t')}, {attack.get('num_members')} members vs "
            f"{attack.get('num_nonmembers')} non-members."
        )
    shadows = res.get("shadows", {})
    if shadows:
        out.append(
            f"{shadows.get('num')} shadow models, each trained on a random half of the "
            f"{res.get('pool', {}).get('pool_size')}-image pool."
        )
    return out


@register("guard-index")
def guard_findings(
    run: Path, manifest: dict[str, Any], config: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> list[str]:
    out = []
    decisions = (results.get("decisions.json") or {}).get("summary")
    if decisions:
        out.append(
            f"Copy filter: {decisions.get('num_blocked')} of {decisions.get('num_images')} generated images blocked "
            f"by the calibrated rule ({decisions.get('num_blocked_calibrated')}); Carlini's absolute rule "
            f"(L2 <= 0.15) would block {decisions.get('num_blocked_absolute')}; "
            f"{_num(decisions.get('ms_per_image'))} ms per image."
        )
    return out or generic_findings(run, manifest, config, rows, results)
