"""``diffaudit tag`` and ``diffaudit detect``: embed an invisible tag in images, and look for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from diffaudit.cli.common import err, print_json
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.guards.scrub import tag_name
from diffaudit.guards.tagging import (
    KNOWN_TAG_FALSE_ALARM,
    DwtDctTagger,
    SpreadSpectrumTagger,
    Tagger,
    detect_known_tags,
    get_tagger,
    min_bit_accuracy,
)
from diffaudit.io import atomic_write_json

TAGGER_HELP = "spread-spectrum | dwtdct"


def make_tagger(name: str, key: int | None, amplitude: float | None, preset: str) -> Tagger:
    """A tagger from CLI options: spread-spectrum needs ``--key``; dwtdct takes ``--preset``."""
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
        key: int = typer.Option(None, help="spread-spectrum secret key"),
        amplitude: float = typer.Option(None, help="spread-spectrum strength (does not change detection)"),
        preset: str = typer.Option("sd-v1", help="dwtdct message: sd-v1 | sdxl"),
        calibrate_on: Path = typer.Option(None, help="untagged images (.npz) that set the threshold"),
        target_fpr: float = typer.Option(0.01, help="false-positive rate for --calibrate-on"),
        threshold: float = typer.Option(None, help="detection threshold (score > threshold is tagged)"),
        out: Path = typer.Option(None, help="write per-image results as JSON"),
    ) -> None:
        """Score images for a tag, with a calibrated threshold; or scan a folder for public models' tags."""
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
