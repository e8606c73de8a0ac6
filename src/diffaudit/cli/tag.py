"""``diffaudit tag`` and ``diffaudit detect``: embed an invisible tag in images, and look for one; or detect
generated images without a tag (``--method loss | spectral | cnn``, :mod:`diffaudit.detectors.synthetic`)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import err, print_json

TAGGER_HELP = "spread-spectrum | dwtdct"
METHOD_HELP = "tagless detection: loss (the suspect --model's own denoising loss) | spectral | cnn"
MODEL_HELP = "suspect generator for --method loss: model/run dir, analytic dir or diffusers pipeline dir"


def register(app: typer.Typer) -> None:
    @app.command("tag")
    def tag(
        images: Path = typer.Option(..., help="images to tag (.npz ImageSet)"),
        out: Path = typer.Option(..., help="tagged .npz to write"),
        tagger: str = typer.Option("spread-spectrum", help=TAGGER_HELP),
        key: int = typer.Option(None, help="spread-spectrum secret key"),
        amplitude: float = typer.Option(None, help="spread-spectrum strength in uint8 levels (default 3)"),
        preset: str = typer.Option("sd-v1", help="dwtdct message: sd-v1 | sdxl"),
    ) -> None:
        """Embed a tag in every image and record it in the provenance column ``tag``."""
        from diffaudit.guards.tag_run import TagConfig, run_tag

        done = run_tag(TagConfig(tagger, key, amplitude, preset), images, out)
        err.print(f"{done['num_images']} images tagged with {done['tag']} -> {out}")

    @app.command("detect")
    def detect(
        images: Path = typer.Option(None, help="images to test (.npz ImageSet)"),
        folder: Path = typer.Option(None, help="folder of PNG/JPEG images (with --known-tags)"),
        known_tags: bool = typer.Option(False, "--known-tags", help="look for Stable Diffusion v1 / SDXL tags"),
        tagger: str = typer.Option("spread-spectrum", help=TAGGER_HELP),
        method: str = typer.Option(None, help=METHOD_HELP),
        detector: Path = typer.Option(None, help="a saved detector directory (from --save-detector)"),
        save_detector: Path = typer.Option(None, help="write the trained, calibrated detector to this directory"),
        model: str = typer.Option(None, help=MODEL_HELP),
        prompts: Path = typer.Option(None, help="prompts file, when --model is a text-to-image pipeline"),
        dtype: str = typer.Option("auto", help="pipeline dtype: auto | fp32 | fp16 | bf16"),
        train_real: Path = typer.Option(None, help="real training images for spectral/cnn (.npz)"),
        train_generated: Path = typer.Option(None, help="generated training images for spectral/cnn (.npz)"),
        cnn_steps: int = typer.Option(300, help="training steps of the cnn detector"),
        seed: int = typer.Option(0, help="detector training seed"),
        key: int = typer.Option(None, help="spread-spectrum secret key"),
        amplitude: float = typer.Option(None, help="spread-spectrum strength (does not change detection)"),
        preset: str = typer.Option("sd-v1", help="dwtdct message: sd-v1 | sdxl"),
        calibrate_on: Path = typer.Option(None, help="untagged / real held-out images (.npz) that set the threshold"),
        target_fpr: float = typer.Option(0.01, help="false-positive (false-removal) rate for --calibrate-on"),
        threshold: float = typer.Option(None, help="detection threshold (score > threshold is tagged)"),
        out: Path = typer.Option(None, help="write per-image results as JSON"),
    ) -> None:
        """Score images for a tag, or for being generated without one (--method), with a threshold calibrated on
        real images; or scan a folder for public models' tags."""
        from diffaudit.guards.tag_run import DetectConfig, DetectorOptions, TagConfig, detect_brief, run_detect

        detection = DetectorOptions(
            method, detector, model, prompts, dtype, train_real, train_generated, calibrate_on, target_fpr, seed,
            cnn_steps,
        )  # fmt: skip
        config = DetectConfig(
            images=images,
            folder=folder,
            known_tags=known_tags,
            tag=TagConfig(tagger, key, amplitude, preset),
            threshold=threshold,
            detection=detection,
            save_detector=save_detector,
        )
        print_json(detect_brief(run_detect(config, out)))
