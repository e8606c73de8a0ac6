"""``diffaudit scrub``: drop tagged images, images a tagless detector flags, and near-copies of known generated
sets from a data source."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json
from diffaudit.cli.tag import METHOD_HELP, MODEL_HELP, TAGGER_HELP

#: Carlini et al.'s near-copy threshold (diffaudit.guards.index.CARLINI_DELTA; not imported, to keep start-up light).
CARLINI_DELTA = 0.15


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
        from diffaudit.guards.scrub_run import ScrubConfig, parse_generated, run_scrub, scrub_manifest_path
        from diffaudit.guards.tag_run import DetectorOptions

        detection = DetectorOptions(
            method, detector, model, prompts, dtype, train_real, train_generated, calibrate_on, target_fpr, seed,
            cnn_steps,
        )  # fmt: skip
        config = ScrubConfig(
            data=data,
            tagger=tagger,
            key=key,
            preset=preset,
            threshold=threshold,
            generated=parse_generated(generated),
            near_copy_delta=near_copy_delta,
            metric=metric,
            detection=detection,
        )
        summary = run_scrub(config, out)["summary"]
        path = scrub_manifest_path(out)
        err.print(f"kept {summary['num_kept']} of {summary['num_in']}; removed {summary['num_removed']} ({path})")
        print_json(summary)
