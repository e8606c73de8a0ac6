"""``diffaudit scrub``: drop tagged images and near-copies of known generated sets from a data source."""

from __future__ import annotations

from pathlib import Path

import typer

from diffaudit.cli.common import data_config_from_options, err, print_json
from diffaudit.cli.tag import TAGGER_HELP, make_tagger
from diffaudit.data.imageset import ImageSet
from diffaudit.data.loading import load_data
from diffaudit.errors import ConfigError
from diffaudit.guards.index import CARLINI_DELTA
from diffaudit.guards.scrub import scrub, scrub_summary
from diffaudit.io import atomic_write_json


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
    ) -> None:
        """Write OUT without the removed images, and a manifest of what was removed and why."""
        if tagger is None and generated is None:
            raise ConfigError("nothing to scrub by: give --tagger (with a threshold) and/or --generated")
        source, _ = load_data(data_config_from_options(data, None, None, None, 0, False))
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
        kept, removed = scrub(source, t, thr, gens, near_copy_delta, metric)
        kept.save(out)
        summary = scrub_summary(source, removed)
        manifest = {
            "data": data,
            "out": str(out),
            "tagger": None if t is None else {"name": t.name, "params": t.params},
            "tag_threshold": thr,
            "tag_threshold_source": None if t is None else ("calibrated" if calibrate_on else "given"),
            "generated": [p.strip() for p in generated.split(",")] if generated else [],
            "near_copy_delta": near_copy_delta if gens else None,
            "metric": metric,
            "summary": summary,
            "removed": removed,
        }
        path = scrub_manifest_path(out)
        atomic_write_json(path, manifest)
        err.print(f"kept {summary['num_kept']} of {summary['num_in']}; removed {summary['num_removed']} ({path})")
        print_json(summary)
