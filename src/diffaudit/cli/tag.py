"""``diffaudit tag`` and ``diffaudit detect``: embed an invisible tag in images, and look for one; or detect
generated images without a tag (``--method loss | spectral | cnn``, :mod:`diffaudit.detectors.synthetic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from diffaudit.cli.common import err, print_json
from diffaudit.errors import ConfigError

TAGGER_HELP = "spread-spectrum | dwtdct"
METHOD_HELP = "tagless detection: loss (the suspect --model's own denoising loss) | spectral | cnn"
MODEL_HELP = "suspect generator for --method loss: model/run dir, analytic dir or diffusers pipeline dir"


def detector_from_options(
    method: str | None,
    detector: Path | None,
    model: str | None,
    prompts: Path | None,
    dtype: str,
    train_real: Path | None,
    train_generated: Path | None,
    calibrate_on: Path | None,
    target_fpr: float,
    seed: int,
    cnn_steps: int,
) -> Any:
    """A calibrated synthetic-image detector: loaded from ``--detector DIR``, or trained and calibrated."""
    from diffaudit.data.imageset import ImageSet
    from diffaudit.detectors.synthetic import METHODS, fit_detector, load_detector

    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if detector is None:
        # Option errors first, before a model or data set is loaded.
        if method == "loss" and model is None:
            raise ConfigError("--method loss needs the suspect generator: pass --model RUN_OR_DIR")
        if calibrate_on is None:
            raise ConfigError(f"--method {method} needs --calibrate-on REAL.npz (held-out real images)")
        if method != "loss" and (train_real is None or train_generated is None):
            raise ConfigError(f"--method {method} is trained: give --train-real REAL.npz and --train-generated GEN.npz")
    gen = None
    if model is not None:
        from diffaudit.generators.select import open_generator

        gen, _ = open_generator(model, prompts, None, None, dtype)
    if detector is not None:
        return load_detector(detector, gen)
    params: dict[str, Any] = {"steps": cnn_steps} if method == "cnn" else {}
    real = None if train_real is None else ImageSet.load(train_real)
    generated = None if train_generated is None else ImageSet.load(train_generated)
    return fit_detector(method, ImageSet.load(calibrate_on), real, generated, target_fpr, seed, gen, **params)


def make_tagger(name: str, key: int | None, amplitude: float | None, preset: str) -> Any:
    """A tagger from CLI options: spread-spectrum needs ``--key``; dwtdct takes ``--preset``."""
    from diffaudit.guards.tagging import SpreadSpectrumTagger, get_tagger
    from diffaudit.guards.tags_dwt import DwtDctTagger

    if name == SpreadSpectrumTagger.name:
        if key is None:
            raise ConfigError("the spread-spectrum tagger needs --key (the secret that reproduces its pattern)")
        params: dict[str, Any] = {"key": key}
        if amplitude is not None:
            params["amplitude"] = amplitude
        return get_tagger(name, **params)
    if name == DwtDctTagger.name:
        return get_tagger(name, preset=preset)
    return get_tagger(name)  # raises ConfigError listing the known taggers


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
        from diffaudit.data.imageset import ImageSet
        from diffaudit.guards.scrub import tag_name

        t = make_tagger(tagger, key, amplitude, preset)
        data = ImageSet.load(images)
        tagged_images = t.embed(data.images)
        # Ids are content hashes: tagged images are new images, so their ids are recomputed.
        tagged = ImageSet(tagged_images, data.labels, data.class_names, {**data.provenance, "tag": tag_name(t)})
        tagged.save(out)
        err.print(f"{len(tagged)} images tagged with {tag_name(t)} -> {out}")

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
        from diffaudit.data.imageset import ImageSet
        from diffaudit.guards.tags_dwt import KNOWN_TAG_FALSE_ALARM, DwtDctTagger, detect_known_tags, min_bit_accuracy
        from diffaudit.io import atomic_write_json

        if method is not None or detector is not None:
            if images is None or folder is not None or known_tags:
                raise ConfigError("--method / --detector score --images FILE.npz")
            if threshold is not None:
                raise ConfigError("a tagless detector's threshold comes from --calibrate-on real images")
            from diffaudit.detectors.synthetic import detect_report
            from diffaudit.detectors.synthetic import save_detector as save_det

            det = detector_from_options(
                method, detector, model, prompts, dtype, train_real, train_generated, calibrate_on, target_fpr, seed,
                cnn_steps,
            )  # fmt: skip
            if save_detector is not None:
                save_det(det, save_detector, model)
            report = detect_report(det, ImageSet.load(images))
            report["images"] = str(images)
            if out is not None:
                atomic_write_json(out, report)
            print_json({k: v for k, v in report.items() if k != "per_image"})
            return
        if known_tags:
            if folder is None or images is not None:
                raise ConfigError("--known-tags scans a --folder of image files (not --images)")
            matches = detect_known_tags(folder, KNOWN_TAG_FALSE_ALARM)
            rows = [{"file": m.source, "tag": m.tag, "bit_accuracy": m.bit_accuracy, "note": m.note} for m in matches]
            result: dict[str, Any] = {
                "folder": str(folder),
                "false_alarm": KNOWN_TAG_FALSE_ALARM,
                "min_bit_accuracy": {"sd-v1": min_bit_accuracy(136), "sdxl": min_bit_accuracy(48)},
                "num_images": len(rows),
                "num_tagged": sum(bool(r["tag"]) for r in rows),
                "images": rows,
            }
        else:
            if images is None or folder is not None:
                raise ConfigError("detect needs --images FILE.npz (or --folder DIR with --known-tags)")
            t = make_tagger(tagger, key, amplitude, preset)
            data = ImageSet.load(images)
            if threshold is not None and calibrate_on is not None:
                raise ConfigError("give either --threshold or --calibrate-on, not both")
            if calibrate_on is not None:
                thr, how = t.calibrate(ImageSet.load(calibrate_on).images, target_fpr), f"calibrated on {calibrate_on}"
            elif threshold is not None:
                thr, how = float(threshold), "given"
            elif isinstance(t, DwtDctTagger):
                thr = min_bit_accuracy(len(t.bits), KNOWN_TAG_FALSE_ALARM)
                how = f"bit accuracy random bits reach with probability <= {KNOWN_TAG_FALSE_ALARM}"
            else:
                raise ConfigError(
                    "a detection threshold must come from untagged images: pass --calibrate-on CLEAN.npz "
                    "(or --threshold T from an earlier calibration)"
                )
            scores = t.score(data.images)
            hits = scores > thr
            result = {
                "images": str(images),
                "tagger": t.name,
                "params": t.params,
                "threshold": thr,
                "threshold_source": how,
                "target_fpr": target_fpr if calibrate_on is not None else None,
                "num_images": len(data),
                "num_tagged": int(hits.sum()),
                "fraction_tagged": float(hits.mean()) if len(data) else 0.0,
                "per_image": [
                    {"id": str(i), "score": float(s), "tagged": bool(h)}
                    for i, s, h in zip(data.ids, scores, hits, strict=True)
                ],
            }
        if out is not None:
            atomic_write_json(out, result)
        print_json({k: v for k, v in result.items() if k not in ("per_image", "images")} | _brief(result))

    def _brief(result: dict[str, Any]) -> dict[str, Any]:
        if "per_image" in result:
            return {"images": result["images"]}
        return {"images": [{"file": r["file"], "tag": r["tag"], "note": r["note"]} for r in result["images"]]}
