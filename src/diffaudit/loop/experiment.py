"""A loop experiment: arms (LoopConfigs differing in mode / share / ...) run over the same repeats.

Each ``(arm, repeat)`` is a unit of work: :func:`~diffaudit.loop.engine.run_repeat` writes only under
``RUN/repeat-<r>/<arm>/`` (and the shared ``RUN/repeat-<r>/gen-000/``), from seeds ``(seed + repeat,
generation)``; runs with different seeds merge by arm and repeat (:mod:`diffaudit.loop.merge`).

:func:`run_experiment` is :func:`prepare`, :func:`run_units` over every unit in :func:`work_items` order, then
:func:`finish`; a shard (:mod:`diffaudit.loop.shards`) runs the same :func:`run_units` over its range and the
merge the same :func:`finish`, so a sharded run equals the one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class Prepared:
    """What every unit of an experiment reads: the real data, the sample counts, each arm's models, the shared
    evaluator (one feature extractor for the whole experiment) and the run's ``config.json`` document."""

    real: ImageSet
    data_info: dict[str, Any]
    num_samples: int
    base_extra: int  # extra samples of the shared generation 0: the most any arm needs
    models: dict[str, Any]
    evaluator0: Evaluator
    config_doc: dict[str, Any]


def prepare(exp: Experiment, real: ImageSet | None = None, data_info: dict[str, Any] | None = None) -> Prepared:
    """Load the real data (the first arm's, unless given) and build what :func:`run_units` needs."""
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
    evaluator0 = Evaluator(real, first.features, (), first.num_bootstrap, first.seed, first.clip_model)
    config_doc = exp.to_dict() | {
        "data_info": data_info,
        "real_images": len(real),
        "conditions": list(real.class_names),
        "heldout_conditions": list(heldout_conditions(first, real)),
        "samples_per_generation": num_samples,
        "extra_samples": extras | {"generation-0 (shared)": base_extra},
        "backend": next(iter(models.values())).describe(),
        "choices": _CHOICES,
    }
    return Prepared(real, data_info, num_samples, base_extra, models, evaluator0, config_doc)


def work_items(exp: Experiment) -> list[tuple[int, str]]:
    """The experiment's units ``(repeat, arm)`` in run order: repeat-major, arms in the experiment's order."""
    return [(rep, name) for rep in range(exp.first.repeats) for name in exp.arms]


def run_units(
    exp: Experiment,
    prep: Prepared,
    root: Path,
    units: list[tuple[int, str]],
    on_row: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run the units ``(repeat, arm)`` (in :func:`work_items` order) into ``root/repeat-<r>/``.

    Generation 0 of a repeat is computed once, by the first arm's settings and models exactly as the
    one-process run does, even when that arm is not among ``units`` (a shard starting mid-repeat); the other
    arms load it. ``on_row(arm, row)`` receives each row in order.
    """
    real, first_name = prep.real, next(iter(exp.arms))
    base: Any = None
    base_rep = -1

    def evaluator_for(cfg: LoopConfig, seed: int) -> Evaluator:
        ev = Evaluator(real, cfg.features, heldout_conditions(cfg, real), cfg.num_bootstrap, seed, cfg.clip_model)
        ev.share(prep.evaluator0)  # one extractor for the whole experiment
        return ev

    for rep, name in units:
        folder = root / f"repeat-{rep}"
        seed = exp.first.seed + rep
        if rep != base_rep:
            base, base_rep = None, rep
            if name != first_name:  # a shard starting mid-repeat: generation 0 as the first arm makes it
                first = exp.first
                ev = evaluator_for(first, seed)
                run_repeat(
                    first, real, rep, folder, first_name, prep.models[first_name], ev, exp.hooks,
                    prep.num_samples, None, base_extra=prep.base_extra, stop=1,
                )  # fmt: skip
                prep.evaluator0.share(ev)
                base = load_generation(folder / "gen-000", prep.models[first_name], real.class_names)
        cfg = exp.arms[name]
        evaluator = evaluator_for(cfg, seed)
        run_repeat(
            cfg, real, rep, folder, name, prep.models[name], evaluator, exp.hooks, prep.num_samples,
            lambda row, name=name: on_row(name, row), base=base, base_extra=prep.base_extra,
        )  # fmt: skip
        prep.evaluator0.share(evaluator)
        if base is None:
            base = load_generation(folder / "gen-000", prep.models[name], real.class_names)


def finish(exp: Experiment, prep: Prepared, run: Any, plots: bool = True) -> dict[str, Any]:
    """Summary (``summary.json``), curves and grids of the open run ``run`` from its ``metrics.jsonl``."""
    summary = summarize(run.rows(), exp.arms)
    summary_doc = {"experiment": exp.name, "arms": summary, "features": prep.evaluator0.describe()}
    atomic_write_json(run.file(SUMMARY_FILE), summary_doc)
    if plots:
        from diffaudit.loop.plots import plot_curves, plot_grids

        plot_curves(summary, run.file("curves.png"), title=exp.name)
        for name, cfg in exp.arms.items():
            if min(prep.real.shape[1:]) >= 4:
                plot_grids(run.path, name, cfg.num_generations, run.file(f"grids-{name}.png"))
    run.update_manifest(arms=list(exp.arms))
    return summary_doc


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

    prep = prepare(exp, real, data_info)
    total = exp.first.repeats * sum(cfg.num_generations for cfg in exp.arms.values())
    with RunDir(out, kind="loop", resume=resume) as run:
        run.write_config(prep.config_doc)
        logged = {(r.get(KEY_ARM), r.get(KEY_REPEAT), r.get(KEY_GENERATION)) for r in run.rows()}

        with progress_bar(f"loop {exp.name}", total=total, enabled=show_progress) as bar:
            done = 0

            def on_row(name: str, row: dict[str, Any]) -> None:
                nonlocal done
                key = (row[KEY_ARM], row[KEY_REPEAT], row[KEY_GENERATION])
                if key not in logged:  # merged by id: a resumed run never logs a generation twice
                    run.log(row)
                    logged.add(key)
                done += 1
                bar.update(completed=min(done, total), info=f"{name} gen {row[KEY_GENERATION]}")

            run_units(exp, prep, run.path, work_items(exp), on_row)
        return finish(exp, prep, run, plots)
