"""``diffaudit scrub``: drop tagged images, images a tagless detector flags, and near-copies of known generated
sets from a data source."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import data_config_from_options, err, print_json
from diffaudit.cli.tag import METHOD_HELP, MODEL_HELP, TAGGER_HELP, detector_from_options, make_tagger
from diffaudit.errors import ConfigError

#: Carlini et al.'s near-copy threshold (diffaudit.guards.index.CARLINI_DELTA; not imported, to keep start-up light).
CARLINI_DELTA = 0.15


def scrub_manifest_path(out: Path) -> Path:
    """``clean.npz`` -> ``clean.scrub.json``."""
    return out.with_name(out.stem + ".scrub.json")


def register(app: typer.Typer) -> None:
    @app.command("scrub")
    def scrub_cmd(
        data: str = typer.Option(..., help="source to clean: digits | faces | glyphs | folder:PATH | npz:PATH"),
        out: Path = typer.Option(..., help="cleaned .npz to write (manifest: OUT.scrub.json beside it)"),
        tagger: str = typer.Option(None, help=f"remove images carrying this tag: {TAGGER_HELP}"),
        key: int = typer.Option(None, help="spread-spectrum secret key"),
        preset: str = typer.Option("sd-v1", help="dwtdct message: sd-v1 | sdxl"),
        threshold: float = typer.Option(None, help="tag detection threshold (calibrated on untagged images)"),
        calibrate_on: Path = typer.Option(None, help="untagged .npz to calibrate the tag threshold on instead"),
        target_fpr: float = typer.Option(0.01, help="false-positive rate for --calibrate-on"),
        generated: str = typer.Option(None, help="comma-separated generated .npz sets whose near-copies to remove"),
        near_copy_delta: float = typer.Option(CARLINI_DELTA, help="near-copy threshold (normalized L2)"),
        metric: str = typer.Option("l2", help="near-copy metric: l2 | tiled"),
        method: str = typer.Option(None, help=METHOD_HELP),
        detector: Path = typer.Option(None, help="a saved detector directory (diffaudit detect --save-detector)"),
        model: str = typer.Option(None, help=MODEL_HELP),
        prompts: Path = typer.Option(None, help="prompts file, when --model is a text-to-image pipeline"),
        dtype: str = typer.Option("auto", help="pipeline dtype: auto | fp32 | fp16 | bf16"),
        train_real: Path = typer.Option(None, help="real training images for a spectral/cnn detector (.npz)"),
        train_generated: Path = typer.Option(None, help="generated training images for a spectral/cnn detector"),
        cnn_steps: int = typer.Option(300, help="training steps of the cnn detector"),
        seed: int = typer.Option(0, help="detector training seed"),
    ) -> None:
        """Write OUT without the removed images, and a manifest of what was removed and why.

        With --method/--detector, --calibrate-on names real images that set the detector's threshold (and the
        tag threshold, when --tagger is given too)."""
        from diffaudit.data.imageset import ImageSet
        from diffaudit.data.loading import load_data
        from diffaudit.guards.scrub import scrub, scrub_summary
        from diffaudit.io import atomic_write_json

        use_detector = method is not None or detector is not None
        if tagger is None and generated is None and not use_detector:
            raise ConfigError(
                "nothing to scrub by: give --tagger (with a threshold), --method / --detector, or --generated"
            )
        source, _ = load_data(data_config_from_options(data, None, None, None, 0, False))
        det = None
        if use_detector:
            det = detector_from_options(
                method, detector, model, prompts, dtype, train_real, train_generated, calibrate_on, target_fpr, seed,
                cnn_steps,
            )  # fmt: skip
        t = None
        thr = threshold
        if tagger is not None:
            t = make_tagger(tagger, key, None, preset)
            if calibrate_on is not None:
                if threshold is not None:
                    raise ConfigError("give either --threshold or --calibrate-on, not both")
                thr = t.calibrate(ImageSet.load(calibrate_on).images, target_fpr)
            elif threshold is None:
                raise ConfigError("--tagger needs --threshold T or --calibrate-on CLEAN.npz")
        gens = [ImageSet.load(Path(p.strip())) for p in generated.split(",") if p.strip()] if generated else []
        kept, removed = scrub(source, t, thr, gens, near_copy_delta, metric, detector=det)
        kept.save(out)
        summary = scrub_summary(source, removed)
        manifest = {
            "data": data,
            "out": str(out),
            "tagger": None if t is None else {"name": t.name, "params": t.params},
            "tag_threshold": thr,
            "tag_threshold_source": None if t is None else ("calibrated" if calibrate_on else "given"),
            "generated": [p.strip() for p in generated.split(",")] if generated else [],
            "detector": None if det is None else det.describe(),
            "near_copy_delta": near_copy_delta if gens else None,
            "metric": metric,
            "summary": summary,
            "removed": removed,
        }
        path = scrub_manifest_path(out)
        atomic_write_json(path, manifest)
        err.print(f"kept {summary['num_kept']} of {summary['num_in']}; removed {summary['num_removed']} ({path})")
        print_json(summary)
