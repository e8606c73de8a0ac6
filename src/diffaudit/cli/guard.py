"""``diffaudit guard build`` / ``guard check``: a training-set index and the copy filter behind it.

Sampling behind the filter, for any generator, is ``diffaudit sample --model RUN_OR_DIR --guard INDEX``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json

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
        from diffaudit.errors import ConfigError
        from diffaudit.guards.guard_run import GuardBuildConfig, run_guard_build

        try:
            fractions = tuple(float(f) for f in crop_fractions.split(",") if f.strip())
        except ValueError:
            raise ConfigError(f"--crop-fractions {crop_fractions!r}: expected numbers like 0,0.1,0.2") from None
        cfg = GuardBuildConfig(
            data=data,
            features=features,
            metric=metric,
            grid=grid,
            calibrate_fpr=calibrate_fpr,
            holdout=holdout,
            holdout_fraction=holdout_fraction,
            delta=delta,
            resolution=resolution,
            channels=channels,
            subset=subset,
            seed=seed,
            backend=backend,
            invariant=invariant,
            crop_fractions=fractions,
            blur=blur,
        )
        print_json(run_guard_build(cfg, out))

    @guard_app.command("check")
    def check(
        index: Path = typer.Option(..., help="index directory from `guard build`"),
        samples: Path = typer.Option(..., help="images to check: a `diffaudit sample` run or an .npz ImageSet"),
        out: Path = typer.Option(..., help="decisions JSON to write"),
        rule: str = typer.Option(
            "auto", help="auto (robust if built, else calibrated) | calibrated | absolute | either | robust"
        ),
        backend: str = typer.Option("exact", help="exact | faiss"),
    ) -> None:
        """A block/pass decision per image with its evidence (nearest training id, distance, rule, threshold)."""
        from diffaudit.guards.guard_run import run_guard_check

        report = run_guard_check(index, samples, out, rule, backend)
        err.print(f"{report['summary']['num_blocked']} of {report['summary']['num_images']} blocked; see {out}")
        print_json(report["summary"])

    app.add_typer(guard_app, name="guard")
