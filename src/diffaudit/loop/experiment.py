"""A loop experiment: arms (LoopConfigs differing in mode / share / ...) run over the same repeats.

Each ``(arm, repeat)`` is a unit of work: :func:`~diffaudit.loop.engine.run_repeat` writes only under
``RUN/repeat-<r>/<arm>/`` (and the shared ``RUN/repeat-<r>/gen-000/``), from seeds ``(seed + repeat,
generation)``; runs with different seeds merge by arm and repeat (:mod:`diffaudit.loop.merge`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.io import atomic_write_json
from diffaudit.loop.config import (
    BASE_ARM,
    KEY_ARM,
    KEY_GENERATION,
    KEY_REPEAT,
    SUMMARY_FILE,
    LoopConfig,
    LoopHooks,
)
from diffaudit.loop.engine import load_generation, run_repeat
from diffaudit.loop.evaluate import Evaluator
from diffaudit.loop.models import make_models
from diffaudit.loop.plan import extra_samples, heldout_conditions, load_real
from diffaudit.loop.summary import summarize
from diffaudit.progress import progress_bar

#: Settings that determine generation 0, which the arms of an experiment share.
BASE_FIELDS = (
    "backend",
    "diffusion_preset",
    "overrides",
    "train_size",
    "num_samples",
    "base_steps",
    "sample_steps",
    "guidance_scale",
    "temperature",
    "gmm_components",
    "features",
    "num_bootstrap",
    "seed",
    "repeats",
    "holdout_classes",
    "drift_samples",
    "model",
    "data",
    "prompts",
    "dtype",
    "pretrain_steps",
    "heldout_finetune",
    "guidance_schedule",
    "clip_model",
)


@dataclass
class Experiment:
    """A set of arms (named LoopConfigs differing in mode / share / ...) run over the same repeats."""

    arms: dict[str, LoopConfig]
    name: str = "custom"
    hooks: LoopHooks = field(default_factory=LoopHooks)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("an experiment needs at least one arm")
        first = next(iter(self.arms.values()))
        for name, cfg in self.arms.items():
            cfg.validate()
            if name == BASE_ARM or "/" in name or not name:
                raise ConfigError(f"arm name {name!r} is reserved or invalid")
            # Arms share generation 0, so everything that determines it must agree.
            diff = [f for f in BASE_FIELDS if getattr(cfg, f) != getattr(first, f)]
            if diff:
                raise ConfigError(f"arm {name!r} differs from the first arm in {diff}; arms share generation 0")

    @property
    def first(self) -> LoopConfig:
        return next(iter(self.arms.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.name,
            "arms": {k: v.to_dict() for k, v in self.arms.items()},
            "hooks": self.hooks.describe(),
        }


_CHOICES = {
    "samples_per_generation": "num_samples evaluation samples (labels cycling over all classes, the "
    "same seeds in every arm) are scored; a generation whose samples feed a later poisoning "
    "generation also samples the retrained-class images the arm's mix needs beyond those",
    "sample_seeds": "(seed + repeat, generation) -> a range shared by all arms (common random "
    "numbers); generation 0 is shared by all arms of a repeat",
    "features": "one extractor trained on the whole real set, reused for every generation",
    "healing_noise": "95% half-width of (poisoned - base) over repeats; single repeat: none",
}


def run_experiment(
    exp: Experiment,
    out: str | os.PathLike[str],
    resume: bool = False,
    real: ImageSet | None = None,
    show_progress: bool = True,
    plots: bool = True,
    data_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every arm and repeat into the run directory ``out``; returns the summary (also ``summary.json``).

    ``real`` defaults to the first arm's data (:func:`~diffaudit.loop.plan.load_real`; bad data or model paths
    raise before the run directory is made). With ``resume`` the complete generations already on disk are
    reused and the incomplete ones redone.
    """
    from diffaudit.runs import RunDir

    first = exp.first
    data_info = data_info or {"source": "given"}
    if real is None:
        real, data_info = load_real(first)
    num_samples = first.num_samples
    extras = {
        name: [extra_samples(cfg, real, num_samples, g) for g in range(cfg.num_generations)]
        for name, cfg in exp.arms.items()
    }
    base_extra = max(e[0] for e in extras.values())  # generation 0 is shared: it samples for the neediest arm
    models = {name: make_models(cfg, show_progress=False) for name, cfg in exp.arms.items()}
    first_models = next(iter(models.values()))
    total = first.repeats * sum(cfg.num_generations for cfg in exp.arms.values())
    with RunDir(out, kind="loop", resume=resume) as run:
        evaluator0 = Evaluator(real, first.features, (), first.num_bootstrap, first.seed, first.clip_model)
        run.write_config(
            exp.to_dict()
            | {
                "data_info": data_info,
                "real_images": len(real),
                "conditions": list(real.class_names),
                "heldout_conditions": list(heldout_conditions(first, real)),
                "samples_per_generation": num_samples,
                "extra_samples": extras | {"generation-0 (shared)": base_extra},
                "backend": first_models.describe(),
                "choices": _CHOICES,
            }
        )
        logged = {(r.get(KEY_ARM), r.get(KEY_REPEAT), r.get(KEY_GENERATION)) for r in run.rows()}

        def log(row: dict[str, Any]) -> None:
            key = (row[KEY_ARM], row[KEY_REPEAT], row[KEY_GENERATION])
            if key not in logged:  # merged by id: a resumed run never logs a generation twice
                run.log(row)
                logged.add(key)

        with progress_bar(f"loop {exp.name}", total=total, enabled=show_progress) as bar:
            done = 0
            for rep in range(first.repeats):
                root = run.path / f"repeat-{rep}"
                seed = first.seed + rep
                base = None
                for name, cfg in exp.arms.items():
                    evaluator = Evaluator(
                        real, cfg.features, heldout_conditions(cfg, real), cfg.num_bootstrap, seed, cfg.clip_model
                    )
                    evaluator.share(evaluator0)  # one extractor for the whole experiment

                    def on_row(row: dict[str, Any], name: str = name) -> None:
                        nonlocal done
                        log(row)
                        done += 1
                        bar.update(completed=min(done, total), info=f"{name} gen {row[KEY_GENERATION]}")

                    rows = run_repeat(
                        cfg, real, rep, root, name, models[name], evaluator, exp.hooks, num_samples, on_row,
                        base=base, base_extra=base_extra,
                    )  # fmt: skip
                    evaluator0.share(evaluator)
                    if base is None:
                        model, samples, _, drift = load_generation(root / "gen-000", models[name], real.class_names)
                        base_row = {k: v for k, v in rows[0].items() if k not in (KEY_ARM, KEY_REPEAT)}
                        base = (model, samples, base_row, drift)
        summary = summarize(run.rows(), exp.arms)
        summary_doc = {"experiment": exp.name, "arms": summary, "features": evaluator0.describe()}
        atomic_write_json(run.file(SUMMARY_FILE), summary_doc)
        if plots:
            from diffaudit.loop.plots import plot_curves, plot_grids

            plot_curves(summary, run.file("curves.png"), title=exp.name)
            for name, cfg in exp.arms.items():
                if min(real.shape[1:]) >= 4:
                    plot_grids(run.path, name, cfg.num_generations, run.file(f"grids-{name}.png"))
        run.update_manifest(arms=list(exp.arms))
    return summary_doc
