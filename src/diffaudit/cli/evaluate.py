"""``diffaudit evaluate``: distribution and memorization metrics of generated samples against real data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from diffaudit.cli.common import out
from diffaudit.errors import ConfigError


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["epochs=10", "mode=autoencoder"]`` -> ``{"epochs": 10, "mode": "autoencoder"}`` (JSON, else str)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_results(result: dict[str, Any]) -> None:
    """Print the metrics (with CI and class mean when present) and the memorization summary as tables."""
    from diffaudit.metrics import distribution as D
    from diffaudit.metrics import evaluate as ev
    from diffaudit.metrics import features as F

    feats = result[ev.KEY_FEATURES]
    if feats.get(F.KEY_ACCURACY) is not None:
        quality = f"held-out accuracy {feats[F.KEY_ACCURACY]:.3f}"
    elif feats.get(F.KEY_RECON_MSE) is not None:
        quality = f"held-out reconstruction MSE {feats[F.KEY_RECON_MSE]:.4g}"
    else:
        quality = "untrained"
    sizes = result[ev.KEY_SIZES]
    metrics = result[ev.KEY_METRICS]
    table = Table(
        title=f"{sizes['samples']} samples vs {sizes['reference']} reference; features "
        f"{feats[F.KEY_NAME]} (dim {feats[F.KEY_DIM]}, {quality})"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    ci, class_mean = metrics.get(D.CI) or {}, metrics.get(D.CLASS_MEAN) or {}
    if ci:
        table.add_column(f"{int(100 * metrics.get(D.CI_LEVEL, 0.95))}% CI", justify="right")
    if class_mean:
        table.add_column("class mean", justify="right")
    for key in D.METRIC_KEYS:
        row = [key, _fmt(metrics.get(key))]
        if ci:
            lo_hi = ci.get(key)
            row.append(f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "")
        if class_mean:
            row.append(_fmt(class_mean.get(key)))
        table.add_row(*row)
    out.print(table)
    skipped = metrics.get(D.SKIPPED_CLASSES) or {}
    if skipped:
        out.print(f"per-class metrics skipped for {len(skipped)} class(es): {', '.join(skipped)}")
    mem = result.get(ev.KEY_MEMORIZATION)
    if mem:
        summary = mem.get("summary", mem)
        table = Table(title=f"memorization against {sizes['train']} training images", show_header=False)
        for key, value in summary.items():
            table.add_row(str(key), _fmt(value))
        out.print(table)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        samples: Path = typer.Option(..., help="generated images: a `diffaudit sample` run directory, or an .npz"),
        reference: str = typer.Option(
            ..., help="real data: digits | faces | glyphs | folder:PATH | captioned:PATH | npz:PATH"
        ),
        features: str = typer.Option("classifier", help="feature extractor: classifier | random-cnn | pixels"),
        out_path: Path = typer.Option(None, "--out", help="write every number as JSON here"),
        train: str = typer.Option(None, help="the model's training data for memorization (default: reference)"),
        bootstrap: int = typer.Option(0, help="bootstrap resamples for confidence intervals"),
        seed: int = typer.Option(0, help="seed of the bootstrap and memorization measures"),
        delta: float = typer.Option(0.15, help="normalized-L2 threshold for an extracted training image"),
        feature_option: list[str] = typer.Option(None, help="extractor option KEY=VALUE (repeatable)"),
        metric_option: list[str] = typer.Option(
            None, help="compute_metrics option KEY=VALUE, e.g. kid_subsets=10 (repeatable)"
        ),
        no_memorization: bool = typer.Option(False, "--no-memorization", help="skip the memorization report"),
    ) -> None:
        """Compare generated SAMPLES with REFERENCE data: FID, KID, precision/recall, coverage, memorization."""
        from diffaudit.metrics.evaluate import EvaluateConfig, run_evaluate

        config = EvaluateConfig(
            samples=str(samples),
            reference=reference,
            features=features,
            train=train,
            num_bootstrap=bootstrap,
            seed=seed,
            delta=delta,
            feature_options=parse_options(feature_option, "--feature-option"),
            metric_options=parse_options(metric_option, "--metric-option"),
            memorization=not no_memorization,
        )
        print_results(run_evaluate(config, out_path))
        if out_path is not None:
            out.print(f"wrote {out_path}")
