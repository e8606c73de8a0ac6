"""Findings in plain words, one function per run kind.

Each function reads what its command wrote (manifest, config, metrics rows, result JSON files) and returns short
sentences with the numbers, e.g. "12 of 100 training faces extracted at delta = 0.15". A kind without a function
gets the generic summary. Missing keys give fewer sentences, never an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
