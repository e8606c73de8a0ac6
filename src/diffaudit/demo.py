"""``diffaudit demo``: the whole audit end to end on built-in data, then one HTML report.

Stages (each its own run directory under OUT, each an ordinary diffaudit command, so the demo shows exactly what
a user would type):

1. ``train-digits``: a class-conditional model on scikit-learn's digits, and 200 samples of it.
2. ``loop``: Bohacek & Farid's self-consuming loop at small scale (30 of 900 images self-generated, digits 5-9
   never retrained on), poisoning then healing generations.
3. ``loop-tag-scrub``: the same loop with 25% synthetic data, every synthetic image tagged and detected images
   scrubbed before retraining.
4. ``train-faces`` + ``extract-faces``: a model trained on the 100 LFW faces at 16x16 (1,500 steps: it starts to
   memorize; 6,000 steps reproduce 95 of the 100, see docs/extraction.md), then generate-and-filter extraction
   (cliques and Carlini's adaptive ratio) against its training faces.
5. ``mia``: membership inference (loss threshold, LiRA) with shadow models on a 200-image digits pool.
6. ``guard``: a copy-filter index of the digits training set, checked against the model's samples.
7. ``report.html``: one self-contained page.

A finished stage is skipped when the demo is run again with the same OUT, and an interrupted one resumes.
``quick`` shrinks every model and count so the whole demo runs in under a minute (for tests); its numbers
mean nothing. The default sizes finish in about 10 minutes on 2 free CPU cores (measured 569 s; 790 s before the loop
sampled only the images it scores or mixes).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffaudit.io import atomic_write_json, atomic_write_text
from diffaudit.report.html import build_report

# Tiny U-Net for --quick: every stage exercises its code path in seconds.
_TINY = ["--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=4"]


@dataclass(frozen=True)
class Stage:
    """One demo step: a diffaudit command line (built from OUT), its run directory and whether it resumes."""

    name: str
    argv: Callable[[Path], list[str]]
    run_dir: str | None  # directory (relative to OUT) whose finished manifest means "done"; None: check output
    output: str | None = None  # a file that means "done" for commands without a run directory
    resumable: bool = True


def stages(quick: bool) -> list[Stage]:
    """The demo's stages, sized for ``quick`` (tests) or the default (about 10 minutes on 2 cores)."""
    q = quick
    train_digits = ["train", "--preset", "digits-8", "--steps", "30" if q else "600"]
    if q:
        train_digits += [*_TINY, "--set", "train.batch_size=16", "--set", "data.subset=300", "--grid-images", "20"]
    loop_common = ["loop", "--preset", "nepotism-digits"]
    if q:
        loop_common += ["--quick", "--poison-generations", "1", "--set", "train_size=40", "--set", "num_samples=20"]
    else:
        loop_common += ["--set", "base_steps=300", "--set", "num_samples=300"]
    faces = ["--preset", "faces-32", "--set", "data.resolution=16", "--set", "model.resolution=16"]
    faces += (
        [
            "--set",
            "model.block_out_channels=[8,16,16]",
            "--set",
            "model.norm_num_groups=4",
            "--steps",
            "10",
            "--set",
            "train.batch_size=8",
            "--grid-images",
            "10",
        ]
        if q
        else ["--set", "model.block_out_channels=[16,32,32]", "--set", "train.batch_size=16", "--steps", "1500"]
    )
    mia = ["mia", "--data", "digits", "--preset", "digits-8", "--num-shadows", "2", "--timesteps", "50,100,200"]
    mia += (
        ["--pool-size", "40", "--steps", "5", *_TINY, "--set", "train.batch_size=8", "--noise-draws", "1"]
        if q
        else [
            "--pool-size",
            "200",
            "--steps",
            "300",
            "--set",
            "model.block_out_channels=[16,32]",
            "--set",
            "model.norm_num_groups=8",
            "--noise-draws",
            "2",
        ]
    )
    return [
        Stage("train-digits", lambda o: [*train_digits, "--out", str(o / "train-digits")], "train-digits"),
        Stage(
            "sample-digits",
            lambda o: [
                "sample",
                "--model",
                str(o / "train-digits"),
                "--num-images",
                "40" if q else "200",
                "--num-steps",
                "5" if q else "25",
                "--out",
                str(o / "sample-digits"),
            ],
            "sample-digits",
            resumable=False,
        ),
        Stage(
            "loop",
            lambda o: [
                *loop_common,
                "--synthetic-count",
                "3" if q else "30",
                "--holdout-classes",
                "5,6,7,8,9",
                "--poison-generations",
                "1" if q else "3",
                "--heal-generations",
                "1" if q else "2",
                "--out",
                str(o / "loop"),
            ],
            "loop",
        ),
        Stage(
            "loop-tag-scrub",
            lambda o: [
                *loop_common,
                "--synthetic-share",
                "0.25",
                "--poison-generations",
                "1" if q else "2",
                "--heal-generations",
                "0",
                "--tag-and-scrub",
                "--tag-amplitude",
                "48",
                "--out",
                str(o / "loop-tag-scrub"),
            ],
            "loop-tag-scrub",
        ),
        Stage("train-faces", lambda o: ["train", *faces, "--out", str(o / "train-faces")], "train-faces"),
        Stage(
            "extract-faces",
            lambda o: [
                "extract",
                "--model",
                str(o / "train-faces"),
                "--out",
                str(o / "extract-faces"),
                "--per-label",
                "20" if q else "300",
                # Ancestral DDPM: deterministic samplers leave speckled 16x16 faces after short training.
                "--sampler",
                "ddpm",
                "--num-steps",
                "5" if q else "100",
                "--calibrate",
                "--untargeted",
                "--max-cliques",
                "5",
                "--min-clique",
                "3" if q else "10",
                *(["--n-neighbors", "10", "--calibration-pairs", "20"] if q else []),
            ],
            "extract-faces",
        ),
        Stage("mia", lambda o: [*mia, "--out", str(o / "mia")], "mia"),
        Stage(
            "guard",
            lambda o: [
                "guard",
                "build",
                "--data",
                "digits",
                "--out",
                str(o / "guard"),
                "--holdout-fraction",
                "0.2",
                *(["--calibrate-fpr", "0.05"] if q else []),
            ],
            "guard",
            resumable=False,
        ),
        Stage(
            "guard-check",
            lambda o: [
                "guard",
                "check",
                "--index",
                str(o / "guard"),
                "--samples",
                str(o / "sample-digits" / "samples.npz"),
                "--out",
                str(o / "guard" / "decisions.json"),
            ],
            None,
            output="guard/decisions.json",
            resumable=False,
        ),
    ]


def _finished(out: Path, stage: Stage) -> bool:
    if stage.run_dir is None:
        return stage.output is not None and (out / stage.output).exists()
    manifest = out / stage.run_dir / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "finished"


def run_demo(out: Path, quick: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run every stage into ``out`` (skipping finished ones), write ``out/report.html``; returns its path."""
    from diffaudit.cli import app  # here, not at import time: the CLI package imports this module's command

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for stage in stages(quick):
        if _finished(out, stage):
            log(f"[demo] {stage.name}: already finished, skipped")
            continue
        argv = stage.argv(out)
        partial = stage.run_dir is not None and (out / stage.run_dir).exists()
        if partial and stage.resumable:
            argv.append("--resume")
        elif partial:  # a demo-owned directory left by an interrupted non-resumable stage: redo it
            shutil.rmtree(out / stage.run_dir)  # type: ignore[operator]
        log(f"[demo] {stage.name}: diffaudit {' '.join(argv)}")
        start = time.perf_counter()
        app(argv, standalone_mode=False)
        timings[stage.name] = round(time.perf_counter() - start, 1)
    runs = [out / s.run_dir for s in stages(quick) if s.run_dir is not None]
    report = out / "report.html"
    title = "diffaudit demo" + (" (--quick: tiny models, numbers are meaningless)" if quick else "")
    atomic_write_text(report, build_report(runs, title=title))
    timings_path = out / "timings.json"
    previous = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    atomic_write_json(timings_path, previous | timings)
    return report
