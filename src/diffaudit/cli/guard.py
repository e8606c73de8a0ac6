"""``diffaudit guard build`` / ``guard check``: a training-set index and the copy filter behind it.

Sampling behind the filter, for any generator, is ``diffaudit sample --model RUN_OR_DIR --guard INDEX``.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from diffaudit.cli.common import data_config_from_options, err, print_json

# Defaults of diffaudit.guards.index, repeated so that listing commands imports no numpy-heavy module.
CARLINI_DELTA = 0.15
DEFAULT_TARGET_FPR = 0.01
DEFAULT_HOLDOUT_FRACTION = 0.1


def register(app: typer.Typer) -> None:
    guard_app = typer.Typer(help="Copy filter: index a training set, check samples against it.", no_args_is_help=True)

    @guard_app.command("build")
    def build(
        data: str = typer.Option(..., help="training source: digits | faces | glyphs | folder:PATH | npz:PATH"),
        out: Path = typer.Option(..., help="index directory to create (also a run directory)"),
        features: str = typer.Option("pixels", help="pixels | classifier"),
        metric: str = typer.Option("l2", help="l2 | tiled (pixel features only)"),
        grid: int = typer.Option(4, help="tiles per side for tiled L2"),
        calibrate_fpr: float = typer.Option(DEFAULT_TARGET_FPR, help="target false-block rate on held-out images"),
        holdout: str = typer.Option(None, help="held-out real source (default: a split of --data)"),
        holdout_fraction: float = typer.Option(DEFAULT_HOLDOUT_FRACTION, help="fraction of --data held out"),
        delta: float = typer.Option(CARLINI_DELTA, help="absolute rule: normalized L2 threshold"),
        resolution: int = typer.Option(None, help="resize every image to this square size"),
        channels: int = typer.Option(None, help="convert to 1 (grey) or 3 (RGB) channels"),
        subset: int = typer.Option(None, help="index a seeded random subset of this size"),
        seed: int = typer.Option(0, help="holdout split, subset and classifier seed"),
        backend: str = typer.Option("exact", help="exact | faiss"),
        invariant: bool = typer.Option(
            True, "--invariant/--no-invariant", help="also calibrate the robust rule (copies after resize/crop/flip)"
        ),
        crop_fractions: str = typer.Option("0,0.1,0.2", help="robust rule: crop sizes indexed (share of a side)"),
        blur: float = typer.Option(0.7, help="robust rule: Gaussian blur sigma in pixels"),
    ) -> None:
        """Index a training set and calibrate the copy threshold on held-out real images."""
        from diffaudit.data.loading import load_data
        from diffaudit.errors import ConfigError
        from diffaudit.guards.index import build_index
        from diffaudit.guards.invariant import InvariantConfig
        from diffaudit.runs import RunDir

        inv = None
        if invariant:
            try:
                fractions = tuple(float(f) for f in crop_fractions.split(",") if f.strip())
            except ValueError:
                raise ConfigError(f"--crop-fractions {crop_fractions!r}: expected numbers like 0,0.1,0.2") from None
            inv = InvariantConfig(crop_fractions=fractions, blur=blur)
        cfg = data_config_from_options(data, resolution, channels, subset, seed, False)
        config = {
            "data": data,
            "features": features,
            "metric": metric,
            "grid": grid,
            "calibrate_fpr": calibrate_fpr,
            "holdout": holdout,
            "holdout_fraction": holdout_fraction if holdout is None else None,
            "delta": delta,
            "resolution": resolution,
            "channels": channels,
            "subset": subset,
            "seed": seed,
            "backend": backend,
            "invariant": None if inv is None else inv.to_json(),
            "reasons": {
                "calibrate_fpr": "the papers publish no copy threshold for a filter; it is set on held-out real "
                "images so that its false-block rate is known",
                "delta": "Carlini et al. 2023 extraction threshold (normalized L2 <= 0.15), reported beside",
            },
        }
        with RunDir(out, "guard-index") as run:
            run.write_config(config)
            train, _ = load_data(cfg)
            held = None
            if holdout is not None:
                held, _ = load_data(data_config_from_options(holdout, resolution, channels, None, seed, False))
            start = time.perf_counter()
            index = build_index(
                train, held, features, metric, grid, calibrate_fpr, holdout_fraction, delta, seed, backend, inv
            )
            index.info["source"] = data
            index.save(run.path)
            row = {
                "num_indexed": len(index),
                "num_holdout": index.calibration["num_holdout"],
                "calibrated_threshold": index.calibration["calibrated"]["threshold"],
                "calibrated_false_block_rate": index.calibration["calibrated"]["achieved_false_block_rate"],
                "absolute_delta": delta,
                "absolute_false_block_rate": index.calibration["absolute"]["achieved_false_block_rate"],
                "robust_false_block_rate": index.calibration.get("robust", {}).get("achieved_false_block_rate"),
                "build_seconds": round(time.perf_counter() - start, 3),
            }
            run.log(row)
            run.update_manifest(index=str(run.path), **row)
        print_json(row)

    @guard_app.command("check")
    def check(
        index: Path = typer.Option(..., help="index directory from `guard build`"),
        samples: Path = typer.Option(..., help="images to check (.npz ImageSet)"),
        out: Path = typer.Option(..., help="decisions JSON to write"),
        rule: str = typer.Option(
            "auto", help="auto (robust if built, else calibrated) | calibrated | absolute | either | robust"
        ),
        backend: str = typer.Option("exact", help="exact | faiss"),
    ) -> None:
        """A block/pass decision per image with its evidence (nearest training id, distance, rule, threshold)."""
        from diffaudit.data.imageset import ImageSet
        from diffaudit.guards.copy_filter import CopyFilter, check_report
        from diffaudit.guards.index import TrainingIndex
        from diffaudit.io import atomic_write_json

        copy_filter = CopyFilter(TrainingIndex.load(index), rule, backend)
        report = check_report(copy_filter, ImageSet.load(samples))
        report["index"] = str(index)
        report["samples"] = str(samples)
        atomic_write_json(out, report)
        err.print(f"{report['summary']['num_blocked']} of {report['summary']['num_images']} blocked; see {out}")
        print_json(report["summary"])

    app.add_typer(guard_app, name="guard")
