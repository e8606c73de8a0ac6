"""``diffaudit demo``: the whole audit end to end on built-in data, then one HTML report.

Each stage calls the same library function its command does (``run_train``, ``run_sample``, ``run_loop``,
``run_extract``, ``run_mia_audit``, ``run_guard_build``, ``run_guard_check``) and writes its own run directory
under OUT:

1. ``train-digits`` + ``sample-digits``: a class-conditional model on scikit-learn's digits, and samples of it.
2. ``loop``: Bohacek & Farid's self-consuming loop at small scale (30 of 900 images self-generated, digits 5-9
   never retrained on), poisoning then healing generations, with its paired control arm (no synthetic data,
   same seeds), so the report shows the difference rather than one curve.
3. ``loop-tag-scrub``: the same loop with 25% synthetic data, every synthetic image tagged and detected images
   scrubbed before retraining.
4. ``train-faces`` + ``extract-faces``: a model trained on the 100 LFW faces at 16x16 (1,500 steps: it starts to
   memorize; 6,000 steps reproduce 95 of the 100, see docs/extraction.md), then generate-and-filter extraction
   (cliques and Carlini's adaptive ratio) against its training faces.
5. ``mia``: membership inference (loss threshold, LiRA, PIA, SecMI, GSA) with shadow models on a 200-image
   digits pool.
6. ``guard``: a copy-filter index of the digits training set, checked against the model's samples.
7. ``report.html``: one self-contained page.

A finished stage is skipped when the demo is run again with the same OUT, and an interrupted one resumes.
``quick`` shrinks every model and count so the whole demo runs in about a minute (for tests); its numbers
mean nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffaudit.io import atomic_write_json, atomic_write_text

# Tiny U-Net for --quick: every stage exercises its code path in seconds.
_TINY = ("model.block_out_channels=[8,16]", "model.norm_num_groups=4")


@dataclass(frozen=True)
class Stage:
    """One demo step: a library call writing the run directory ``OUT/run_dir`` (``resume`` continues it)."""

    name: str
    run_dir: str
    call: Callable[[Path, bool], object]  # (OUT, resume)
    resumable: bool = True
    output: str | None = None  # a file (relative to OUT) that means "done" when the run has no manifest


def _train(name: str, preset: str, overrides: tuple[str, ...], steps: int, grid_images: int):
    def call(out: Path, resume: bool) -> object:
        from diffaudit.config import apply_overrides, get_preset
        from diffaudit.train_run import run_train

        cfg = apply_overrides(get_preset(preset), [*overrides, f"train.steps={steps}"])
        return run_train(cfg, out / name, resume=resume, grid_images=grid_images, show_progress=False)

    return call


def stages(quick: bool) -> list[Stage]:
    """The demo's stages, sized for ``quick`` (tests) or the default (about 10-18 minutes on 2 cores)."""
    from diffaudit.config import SampleConfig

    q = quick
    digits_overrides = (*_TINY, "train.batch_size=16", "data.subset=300") if q else ()
    faces_overrides = ("data.resolution=16", "model.resolution=16") + (
        ("model.block_out_channels=[8,16,16]", "model.norm_num_groups=4", "train.batch_size=8")
        if q
        else ("model.block_out_channels=[16,32,32]", "train.batch_size=16")
    )

    def sample(out: Path, resume: bool) -> object:
        from diffaudit.runs import RunDir
        from diffaudit.sampling import SampleRunConfig, run_sample

        cfg = SampleRunConfig(
            model=str(out / "train-digits"),
            num_images=40 if q else 200,
            sample=SampleConfig(num_steps=5 if q else 25),
        )
        with RunDir(out / "sample-digits", kind="sample") as run:
            return run_sample(cfg, run, show_progress=False)

    def loop(name: str, **fields: object) -> Callable[[Path, bool], object]:
        def call(out: Path, resume: bool) -> object:
            from diffaudit.loop.request import LoopRequest, run_loop

            settings = {"train_size": 40, "num_samples": 20} if q else {"base_steps": 300, "num_samples": 300}
            request = LoopRequest(preset="nepotism-digits", quick=q, settings=settings, **fields)  # type: ignore[arg-type]
            return run_loop(request, out / name, resume=resume)

        return call

    def extract(out: Path, resume: bool) -> object:
        from diffaudit.attacks.extraction_run import CalibrationConfig, ExtractConfig, run_extract

        calibration = CalibrationConfig(pairs=20) if q else CalibrationConfig()
        cfg = ExtractConfig(
            model=str(out / "train-faces"),
            per_label=20 if q else 300,
            # Ancestral DDPM: deterministic samplers leave speckled 16x16 faces after short training.
            sample=SampleConfig(sampler="ddpm", num_steps=5 if q else 100, guidance_scale=2.0),
            calibration=calibration,
            untargeted=True,
            max_cliques=5,
            min_clique=3 if q else 10,
            n_neighbors=10 if q else 50,
            resume=resume,
            show_progress=False,
        )
        return run_extract(cfg, out / "extract-faces")

    def mia(out: Path, resume: bool) -> object:
        from diffaudit.attacks.mia_audit import MiaRequest, run_mia_audit

        request = MiaRequest(
            data="digits",
            preset="digits-8",
            num_shadows=2,
            timesteps=(50, 100, 200),
            pool_size=40 if q else 200,
            steps=5 if q else 300,
            overrides=(*_TINY, "train.batch_size=8")
            if q
            else ("model.block_out_channels=[16,32]", "model.norm_num_groups=8"),
            noise_draws=1 if q else 2,
        )
        return run_mia_audit(request, out / "mia", resume=resume, show_progress=False)

    def guard(out: Path, resume: bool) -> object:
        from diffaudit.guards.guard_run import GuardBuildConfig, run_guard_build

        fpr = {"calibrate_fpr": 0.05} if q else {}
        return run_guard_build(GuardBuildConfig(data="digits", holdout_fraction=0.2, **fpr), out / "guard")

    def guard_check(out: Path, resume: bool) -> object:
        from diffaudit.guards.guard_run import run_guard_check

        return run_guard_check(out / "guard", out / "sample-digits", out / "guard" / "decisions.json")

    return [
        Stage(
            "train-digits",
            "train-digits",
            _train("train-digits", "digits-8", digits_overrides, 30 if q else 600, 20 if q else 100),
        ),  # fmt: skip
        Stage("sample-digits", "sample-digits", sample, resumable=False),
        Stage(
            "loop",
            "loop",
            loop(
                "loop",
                synthetic_count=3 if q else 30,
                holdout_classes=(5, 6, 7, 8, 9),
                poison_generations=1 if q else 3,
                heal_generations=1 if q else 2,
                with_control=True,
            ),
        ),
        Stage(
            "loop-tag-scrub",
            "loop-tag-scrub",
            loop(
                "loop-tag-scrub",
                synthetic_share=0.25,
                poison_generations=1 if q else 2,
                heal_generations=0,
                tag_and_scrub=True,
                tag_amplitude=48.0,
            ),
        ),
        Stage(
            "train-faces",
            "train-faces",
            _train("train-faces", "faces-32", faces_overrides, 10 if q else 1500, 10 if q else 100),
        ),  # fmt: skip
        Stage("extract-faces", "extract-faces", extract),
        Stage("mia", "mia", mia),
        Stage("guard", "guard", guard, resumable=False),
        Stage("guard-check", "guard", guard_check, resumable=False, output="guard/decisions.json"),
    ]


def _finished(out: Path, stage: Stage) -> bool:
    if stage.output is not None:
        return (out / stage.output).exists()
    manifest = out / stage.run_dir / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "finished"


def run_demo(out: Path, quick: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run every stage into ``out`` (skipping finished ones), write ``out/report.html``; returns its path."""
    from diffaudit.report.html import build_report

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    all_stages = stages(quick)
    for stage in all_stages:
        if _finished(out, stage):
            log(f"[demo] {stage.name}: already finished, skipped")
            continue
        partial = stage.output is None and (out / stage.run_dir).exists()
        if partial and not stage.resumable:  # a demo-owned directory left by an interrupted stage: redo it
            shutil.rmtree(out / stage.run_dir)
        log(f"[demo] {stage.name}: {'resuming' if partial and stage.resumable else 'running'}")
        start = time.perf_counter()
        stage.call(out, partial and stage.resumable)
        timings[stage.name] = round(time.perf_counter() - start, 1)
    runs = list(dict.fromkeys(out / s.run_dir for s in all_stages))
    report = out / "report.html"
    title = "diffaudit demo" + (" (--quick: tiny models, numbers are meaningless)" if quick else "")
    atomic_write_text(report, build_report(runs, title=title))
    timings_path = out / "timings.json"
    previous = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    atomic_write_json(timings_path, previous | timings)
    return report
