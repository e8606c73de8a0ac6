"""The self-consuming loop engine: G poisoning generations, then H healing generations, per arm and repeat.

Generation 0 trains on real data; generations ``1..G`` train on a mix of real data and earlier generations'
samples (:mod:`diffaudit.loop.mixing`); generations ``G+1..G+H`` train on real data only ("healing",
Bohacek & Farid). Every generation trains (fine-tuning the previous model by default), samples
``num_samples`` images whose provenance records generation and seed, evaluates them against the real set
(features from one extractor trained on the real data), saves a grid and appends a row to ``metrics.jsonl``.

Layout of a run directory::

    RUN/config.json, manifest.json, metrics.jsonl, summary.json, curves.png, grids-<arm>.png
    RUN/repeat-<r>/gen-000/                  generation 0, shared by every arm of repeat r
    RUN/repeat-<r>/<arm>/gen-<g>/            model/, train-set.npz, samples.npz, grid.png, row.json

A generation is built in ``gen-<g>.partial/`` and renamed into place when complete, so a killed run leaves
either a complete generation or a partial directory that ``resume`` deletes and redoes. Everything is seeded
by ``(seed + repeat, generation)``, so a resumed run ends with exactly the results of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.data.grid import save_grid
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.io import atomic_write_json
from diffaudit.loop import backends as bk
from diffaudit.loop.mixing import MODES, MixSpec, mix_generation, mix_summary
from diffaudit.progress import progress_bar

# ---- row keys ---------------------------------------------------------------------------------------------
KEY_ARM = "arm"
KEY_REPEAT = "repeat"
KEY_GENERATION = "generation"
KEY_PHASE = "phase"
KEY_SEEDS = "sample_seeds"  # [first, last] sampling seed of the generation
KEY_MODEL_ID = "model_id"
KEY_FILTER = "filter"
PHASE_BASE, PHASE_POISON, PHASE_HEAL = "base", "poison", "heal"
GROUP_ALL, GROUP_RETRAINED, GROUP_HELDOUT = "all", "retrained", "heldout"
#: Metrics kept per group in each row (keys ``"<group>/<metric>"``).
ROW_METRICS = ("fid", "kid_mean", "precision", "recall", "density", "coverage", "vendi")
#: Metrics whose healing ratio is reported.
HEALING_METRICS = ("fid", "recall", "coverage")
BASE_ARM = "base"

ROW_FILE = "row.json"
SAMPLES_FILE = "samples.npz"
TRAIN_FILE = "train-set.npz"
MODEL_DIR = "model"
GRID_FILE = "grid.png"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class LoopConfig:
    """One loop arm's settings (all recorded in config.json)."""

    backend: str = bk.DIFFUSION
    diffusion_preset: str = "digits-8"
    overrides: tuple[str, ...] = ()  # diffusion preset overrides, e.g. "train.lr=1e-3"; data.* also picks the data
    mode: str = "replace"
    train_size: int = 900
    synthetic_share: float | None = 0.033
    synthetic_count: int | None = None
    poison_generations: int = 5
    heal_generations: int = 3
    holdout_classes: tuple[int, ...] = ()
    heldout_real: bool = True  # False: poisoning generations see no real images of the held-out classes either
    num_samples: int = 500
    retrain: str = "finetune"
    base_steps: int = 600
    steps_per_generation: int = 60
    sample_steps: int = 25
    guidance_scale: float = 2.0
    temperature: float = 1.0
    gmm_components: int = 3
    features: str = "classifier"  # or "random-cnn", "pixels", "none" (backend stats only)
    num_bootstrap: int = 0
    seed: int = 0
    repeats: int = 1

    def mix_spec(self) -> MixSpec:
        return MixSpec(self.mode, self.train_size, self.synthetic_share, self.synthetic_count)

    def validate(self) -> None:
        if self.backend not in bk.BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {list(bk.BACKENDS)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {list(MODES)}")
        self.mix_spec().validate()
        if not isinstance(self.heldout_real, bool):
            raise ConfigError(f"heldout_real={self.heldout_real!r} must be true or false")
        for name in ("poison_generations", "heal_generations"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} must be a non-negative integer")
        for name in ("num_samples", "repeats", "base_steps", "steps_per_generation", "sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_generations(self) -> int:
        """Models trained per arm and repeat, generation 0 included."""
        return 1 + self.poison_generations + self.heal_generations

    def phase(self, generation: int) -> str:
        if generation == 0:
            return PHASE_BASE
        return PHASE_POISON if generation <= self.poison_generations else PHASE_HEAL


def replace_config(cfg: LoopConfig, **fields: Any) -> LoopConfig:
    """``cfg`` with fields replaced; unknown names are a ConfigError listing the known ones."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(f"unknown loop setting(s) {unknown}; known: {sorted(names)}")
    if "holdout_classes" in fields and fields["holdout_classes"] is not None:
        fields["holdout_classes"] = tuple(int(c) for c in fields["holdout_classes"])
    if "overrides" in fields:
        fields["overrides"] = tuple(fields["overrides"])
    return dataclasses.replace(cfg, **fields)


# ---- hooks for the safeguards --------------------------------------------------------------------------------
# Implementations live in diffaudit.guards.scrub (make_loop_filter, LoopTagger); the engine only calls them.
#: ``filter_fn(mixed, generation) -> (kept, report)``: called on each poisoning generation's training set
#: before retraining (e.g. detect tagged synthetic images and drop them); ``report`` is stored in the row.
FilterFn = Callable[[ImageSet, int], tuple[ImageSet, dict[str, Any]]]
#: ``tag_fn(samples, generation) -> samples``: applied to every generation's samples as they are made (e.g. a
#: Tagger's embed, setting the ``tag`` provenance column), before they are evaluated and enter later mixes.
TagFn = Callable[[ImageSet, int], ImageSet]


@dataclass(frozen=True)
class LoopHooks:
    filter_fn: FilterFn | None = None
    tag_fn: TagFn | None = None

    def describe(self) -> dict[str, str | None]:
        def name(fn: Any) -> str | None:
            return None if fn is None else getattr(fn, "__qualname__", type(fn).__name__)

        return {"filter_fn": name(self.filter_fn), "tag_fn": name(self.tag_fn)}


# ---- backends and data -----------------------------------------------------------------------------------
def diffusion_preset(cfg: LoopConfig):
    from diffaudit.config import apply_overrides, get_preset

    return apply_overrides(get_preset(cfg.diffusion_preset), list(cfg.overrides))


def make_backend(cfg: LoopConfig, show_progress: bool = False) -> bk.Backend:
    """The backend named by ``cfg.backend``, configured from ``cfg``."""
    if cfg.backend == bk.GAUSSIAN:
        return bk.GaussianBackend(cfg.temperature)
    if cfg.backend == bk.GMM:
        return bk.GMMBackend(cfg.temperature, cfg.gmm_components)
    return bk.DiffusionBackend(
        diffusion_preset(cfg),
        cfg.base_steps,
        cfg.steps_per_generation,
        cfg.retrain,
        cfg.guidance_scale,
        cfg.temperature,
        cfg.sample_steps,
        show_progress,
    )


def load_real(cfg: LoopConfig) -> tuple[ImageSet, dict[str, Any]]:
    """The real image pool: the diffusion preset's data section (with ``data.*`` overrides)."""
    from diffaudit.data.loading import load_data

    return load_data(diffusion_preset(cfg).data)


# ---- evaluation ------------------------------------------------------------------------------------------
class Evaluator:
    """Distribution metrics of samples against the real set, overall and for retrained / held-out classes.

    One feature extractor (trained on the whole real set, cached on disk) serves every generation, so the
    numbers of different generations are comparable.
    """

    def __init__(self, real: ImageSet, features: str, holdout: Sequence[int], num_bootstrap: int, seed: int) -> None:
        self.real, self.features, self.holdout = real, features, tuple(int(c) for c in holdout)
        self.num_bootstrap, self.seed = num_bootstrap, seed
        self._extractor: Any = None
        self._ref_feats: np.ndarray | None = None

    def _setup(self) -> None:
        if self._extractor is None:
            from diffaudit.metrics.features import get_extractor

            self._extractor = get_extractor(self.features, self.real)
            self._ref_feats = self._extractor(self.real.images)

    def describe(self) -> dict[str, Any]:
        if self.features == "none":
            return {"name": "none"}
        self._setup()
        return self._extractor.describe()

    def __call__(self, samples: ImageSet) -> dict[str, Any]:
        if self.features == "none":
            return {}
        from diffaudit.metrics.distribution import compute_metrics

        self._setup()
        gen = self._extractor(samples.images)
        ref = self._ref_feats
        groups = {GROUP_ALL: (np.ones(len(samples), bool), np.ones(len(self.real), bool))}
        if self.holdout:
            h = np.asarray(self.holdout)
            groups[GROUP_RETRAINED] = (~np.isin(samples.labels, h), ~np.isin(self.real.labels, h))
            groups[GROUP_HELDOUT] = (np.isin(samples.labels, h), np.isin(self.real.labels, h))
        row: dict[str, Any] = {}
        for group, (gm, rm) in groups.items():
            if gm.sum() < 6 or rm.sum() < 6:  # compute_metrics needs k+1 rows
                continue
            boot = self.num_bootstrap if group == GROUP_ALL else 0
            res = compute_metrics(gen[gm], ref[rm], num_bootstrap=boot, seed=self.seed)
            for key in ROW_METRICS:
                row[f"{group}/{key}"] = res[key]
            for key, (lo, hi) in res.get("ci", {}).items():
                if key in ROW_METRICS:
                    row[f"{group}/{key}_ci"] = [lo, hi]
        return row


# ---- healing ratio ----------------------------------------------------------------------------------------
def healing_ratio(base: float, poisoned: float, healed: float, noise: float = 0.0) -> dict[str, Any]:
    """``(poisoned - healed) / (poisoned - base)``: 1 = full recovery, 0 = none, < 0 = worse after healing.

    Works for metrics where lower is better (FID) and higher is better (recall, coverage) alike. Undefined
    (``ratio`` None, with a ``reason``) when the poisoning moved the metric by no more than ``noise`` (or not
    at all): dividing by noise would report a meaningless number.
    """
    values = [base, poisoned, healed]
    if any(v is None or not math.isfinite(v) for v in values):
        return {"ratio": None, "reason": "a metric value is missing or not finite", "shift": None, "noise": noise}
    shift = poisoned - base
    floor = max(float(noise), 1e-9 * (1.0 + abs(base)))
    if abs(shift) <= floor:
        return {
            "ratio": None,
            "reason": f"poisoning moved the metric by {shift:.4g}, within the noise {floor:.4g}: nothing to heal",
            "shift": shift,
            "noise": float(noise),
        }
    return {"ratio": (poisoned - healed) / shift, "reason": None, "shift": shift, "noise": float(noise)}


# ---- one repeat of one arm --------------------------------------------------------------------------------
def extra_samples(cfg: LoopConfig, real: ImageSet, num_samples: int, generation: int) -> int:
    """Samples that model ``generation`` makes beyond the evaluation set, for later mixes of this arm.

    The evaluation set (``num_samples`` images, labels cycling over every class, the same seeds in every arm)
    is what the metrics see. Only retrained classes are eligible for mixing, so an arm that mixes ``n_syn``
    synthetic images into the next generation may need more retrained-class samples than the evaluation set
    holds; those extra images (labels cycling over the retrained classes only) are made only by generations
    whose samples a later poisoning generation uses (``generation < poison_generations``).
    """
    if generation >= cfg.poison_generations:
        return 0
    n_syn = cfg.mix_spec().num_synthetic
    if n_syn == 0:
        return 0
    retrained = retrained_classes(cfg, real)
    labels = _labels(real, num_samples)
    in_eval = num_samples if retrained is None else int(np.isin(labels, retrained).sum())
    return max(0, n_syn - in_eval)


def retrained_classes(cfg: LoopConfig, real: ImageSet) -> np.ndarray | None:
    """Labels that receive synthetic images (all but the held-out ones); None for unlabelled data."""
    if not real.is_labelled:
        return None
    held = set(int(c) for c in cfg.holdout_classes)
    classes = np.asarray([c for c in range(real.num_classes) if c not in held], dtype=np.int64)
    if classes.size == 0:
        raise ConfigError(f"holdout_classes={list(cfg.holdout_classes)} leave no class to retrain")
    return classes


def _labels(real: ImageSet, n: int) -> np.ndarray:
    if not real.is_labelled:
        return np.full(n, -1, dtype=np.int64)
    return (np.arange(n) % real.num_classes).astype(np.int64)


def _sample_labels(cfg: LoopConfig, real: ImageSet, num_samples: int, num_extra: int) -> np.ndarray:
    """Evaluation labels (cycling over all classes) followed by ``num_extra`` retrained-class labels."""
    labels = _labels(real, num_samples)
    if num_extra == 0:
        return labels
    retrained = retrained_classes(cfg, real)
    extra = np.full(num_extra, -1, np.int64) if retrained is None else retrained[np.arange(num_extra) % retrained.size]
    return np.concatenate([labels, extra])


def _seeds(seed: int, generation: int, n: int) -> range:
    # Arms share the seeds of a generation (common random numbers make arm-to-arm differences less noisy).
    start = (int(seed) * 1_000 + int(generation)) * 1_000_000
    return range(start, start + n)


def _generation(
    cfg: LoopConfig,
    backend: bk.Backend,
    real: ImageSet,
    pools: list[ImageSet],
    prev_model: Any,
    generation: int,
    seed: int,
    num_samples: int,
    num_extra: int,
    evaluator: Evaluator,
    hooks: LoopHooks,
    workdir: Path | None,
) -> tuple[Any, ImageSet, dict[str, Any], ImageSet]:
    """Mix, train, sample, evaluate one generation; writes its artefacts under ``workdir`` when given.

    Samples ``num_samples`` evaluation images then ``num_extra`` retrained-class images for later mixes
    (:func:`extra_samples`); only the evaluation images are scored.
    """
    phase = cfg.phase(generation)
    mixed = mix_generation(
        real,
        pools,
        cfg.mix_spec(),
        generation,
        seed,
        cfg.holdout_classes,
        synthetic=phase == PHASE_POISON,
        heldout_real=cfg.heldout_real,
    )
    filter_report = None
    if hooks.filter_fn is not None and phase == PHASE_POISON:
        mixed, filter_report = hooks.filter_fn(mixed, generation)
    init = prev_model if (cfg.retrain == "finetune" and generation > 0) else None
    model = backend.fit(mixed, init, workdir, generation, seed * 1_000 + generation)
    # The evaluation seeds come first, so every arm scores the same seeds whatever its extra samples.
    seeds = _seeds(seed, generation, num_samples + num_extra)
    samples = backend.sample(model, _sample_labels(cfg, real, num_samples, num_extra), seeds, generation)
    if hooks.tag_fn is not None:
        samples = hooks.tag_fn(samples, generation)
    evaluated = samples if num_extra == 0 else samples.subset(np.arange(num_samples))
    row: dict[str, Any] = {
        KEY_GENERATION: generation,
        KEY_PHASE: phase,
        KEY_MODEL_ID: getattr(model, "model_id", ""),
        KEY_SEEDS: [seeds.start, seeds.stop - 1],
        "samples_evaluated": num_samples,
        "samples_extra": num_extra,
        **mix_summary(mixed, cfg.holdout_classes),
        **backend.stats(model),
        **evaluator(evaluated),
    }
    if filter_report is not None:
        row[KEY_FILTER] = filter_report
    if workdir is not None:
        backend.save(model, workdir / MODEL_DIR)
        mixed.save(workdir / TRAIN_FILE)
        samples.save(workdir / SAMPLES_FILE)
        ncols = real.num_classes if real.is_labelled else None
        if min(real.shape[1:]) >= 4:
            save_grid(samples.images, workdir / GRID_FILE, ncols=ncols, max_images=(ncols or 10) * 10)
        atomic_write_json(workdir / ROW_FILE, row)
    return model, samples, row, mixed


def _run_generation_persisted(root: Path, generation: int, backend: bk.Backend, compute: Callable[[Path], Any]):
    """Load generation ``generation`` from ``root/gen-<g>`` if complete, else (re)build it and rename it in."""
    final = root / f"gen-{generation:03d}"
    if (final / ROW_FILE).exists():
        row = json.loads((final / ROW_FILE).read_text())
        return backend.load(final / MODEL_DIR), ImageSet.load(final / SAMPLES_FILE), row
    partial = root / f"gen-{generation:03d}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted generation is redone from its start
    if final.exists():
        shutil.rmtree(final)  # complete directories always hold row.json; anything else is debris
    partial.mkdir(parents=True)
    _, samples, row, _ = compute(partial)
    os.replace(partial, final)
    return backend.load(final / MODEL_DIR), samples, row


def run_repeat(
    cfg: LoopConfig,
    real: ImageSet,
    repeat: int = 0,
    root: Path | None = None,
    arm: str = BASE_ARM,
    backend: bk.Backend | None = None,
    evaluator: Evaluator | None = None,
    hooks: LoopHooks = LoopHooks(),
    num_samples: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    base: tuple[Any, ImageSet, dict[str, Any]] | None = None,
    base_extra: int | None = None,
) -> list[dict[str, Any]]:
    """Run every generation of one arm for one repeat; returns its rows (generation 0 first).

    Args:
        cfg: the arm's settings; the repeat's seed is ``cfg.seed + repeat``.
        real: the real pool, ``uint8 (N, C, H, W)``.
        root: the repeat's directory (``RUN/repeat-<r>``); None keeps everything in memory (analytic backends).
        num_samples: evaluation samples per generation (default ``cfg.num_samples``).
        base: generation 0 already computed (model, samples, row), shared between arms.
        base_extra: extra samples of generation 0 when it is shared (the most any arm needs); default: this arm's.
        on_row: called with each row (the experiment appends it to metrics.jsonl).
    """
    cfg.validate()
    backend = backend or make_backend(cfg)
    seed = cfg.seed + repeat
    n = num_samples or cfg.num_samples
    extras = [extra_samples(cfg, real, n, g) for g in range(cfg.num_generations)]
    if base_extra is not None:
        extras[0] = base_extra
    evaluator = evaluator or Evaluator(real, cfg.features, cfg.holdout_classes, cfg.num_bootstrap, seed)
    tmp = None
    if root is None and cfg.backend == bk.DIFFUSION:
        tmp = tempfile.TemporaryDirectory(prefix="diffaudit-loop-")
        root = Path(tmp.name)
    try:
        rows: list[dict[str, Any]] = []
        pools: list[ImageSet] = []
        model: Any = None
        for g in range(cfg.num_generations):
            if g == 0 and base is not None:
                model, samples, row = base
            else:

                def compute(workdir: Path | None, g: int = g, prev: Any = model) -> Any:
                    return _generation(
                        cfg, backend, real, pools, prev, g, seed, n, extras[g], evaluator, hooks, workdir
                    )

                if root is None:
                    model, samples, row, _ = compute(None)
                else:
                    where = root if g == 0 else root / arm
                    model, samples, row = _run_generation_persisted(where, g, backend, compute)
            row = {KEY_ARM: arm, KEY_REPEAT: repeat, **row}
            pools.append(samples)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---- summaries --------------------------------------------------------------------------------------------
def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a 95% Student-t interval over repeats (the interval collapses to the mean for one repeat)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, mean, mean
    from scipy import stats

    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return mean, mean - half, mean + half


def metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric metric keys present in the rows (group metrics and backend stats)."""
    keys = []
    for row in rows:
        for k, v in row.items():
            numeric = isinstance(v, int | float) and not isinstance(v, bool)
            if numeric and ("/" in k or k.startswith("fitted_")) and k not in keys:
                keys.append(k)
    return keys


def summarize(rows: Sequence[dict[str, Any]], arms: dict[str, LoopConfig]) -> dict[str, Any]:
    """Curves (mean and 95% interval over repeats per generation) and healing ratios, per arm.

    Rows are merged by ``(arm, repeat, generation)``: a row logged twice counts once.
    """
    unique = {(r[KEY_ARM], r[KEY_REPEAT], r[KEY_GENERATION]): r for r in rows}
    out: dict[str, Any] = {}
    for name, cfg in arms.items():
        arm_rows = [r for (a, _, _), r in unique.items() if a == name]
        keys = metric_keys(arm_rows)
        gens = list(range(cfg.num_generations))
        repeats = sorted({r[KEY_REPEAT] for r in arm_rows})
        by = {(r[KEY_REPEAT], r[KEY_GENERATION]): r for r in arm_rows}
        curves: dict[str, dict[str, list[float]]] = {}
        for key in keys:
            stats = [_interval([by[(rep, g)].get(key) for rep in repeats if (rep, g) in by]) for g in gens]
            curves[key] = {"mean": [s[0] for s in stats], "low": [s[1] for s in stats], "high": [s[2] for s in stats]}
        healing: dict[str, Any] = {}
        g_p, g_h = cfg.poison_generations, cfg.num_generations - 1
        if cfg.heal_generations > 0 and cfg.poison_generations > 0:
            for key in keys:
                if key.split("/")[-1] not in HEALING_METRICS:
                    continue
                triples = [
                    (by[(r, 0)].get(key), by[(r, g_p)].get(key), by[(r, g_h)].get(key))
                    for r in repeats
                    if all((r, g) in by for g in (0, g_p, g_h))
                ]
                triples = [t for t in triples if all(v is not None for v in t)]
                if not triples:
                    continue
                b, p, h = (float(np.mean([t[i] for t in triples])) for i in range(3))
                # Noise of the denominator: the 95% half-width of (poisoned - base) over repeats.
                noise, note = 0.0, "one repeat: no noise estimate, the ratio is indicative"
                if len(triples) >= 2:
                    _, lo, hi = _interval([t[1] - t[0] for t in triples])
                    noise, note = (hi - lo) / 2, "noise = 95% half-width of (poisoned - base) over repeats"
                res = healing_ratio(b, p, h, noise)
                res.update(base=b, poisoned=p, healed=h, repeats=len(triples), noise_note=note)
                res["per_repeat"] = [healing_ratio(*t)["ratio"] for t in triples]
                healing[key] = res
        out[name] = {
            "generations": gens,
            "phases": [cfg.phase(g) for g in gens],
            "repeats": repeats,
            "curves": curves,
            "healing": healing,
            "config": cfg.to_dict(),
        }
    return out


# ---- the experiment ---------------------------------------------------------------------------------------
@dataclass
class Experiment:
    """A set of arms (named LoopConfigs differing in mode / share / ...) run over the same repeats."""

    arms: dict[str, LoopConfig]
    name: str = "custom"
    hooks: LoopHooks = field(default_factory=LoopHooks)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("an experiment needs at least one arm")
        base_fields = (
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
        )
        first = next(iter(self.arms.values()))
        for name, cfg in self.arms.items():
            cfg.validate()
            if name == BASE_ARM or "/" in name or not name:
                raise ConfigError(f"arm name {name!r} is reserved or invalid")
            # Arms share generation 0, so everything that determines it must agree.
            diff = [f for f in base_fields if getattr(cfg, f) != getattr(first, f)]
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


def run_experiment(
    exp: Experiment,
    out: str | os.PathLike[str],
    resume: bool = False,
    real: ImageSet | None = None,
    show_progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every arm and repeat into the run directory ``out``; returns the summary (also ``summary.json``).

    ``real`` defaults to the first arm's data (:func:`load_real`). With ``resume`` the complete generations
    already on disk are reused and the incomplete ones redone.
    """
    from diffaudit.runs import RunDir

    first = exp.first
    data_info: dict[str, Any] = {"source": "given"}
    if real is None:
        real, data_info = load_real(first)
    num_samples = first.num_samples
    extras = {
        name: [extra_samples(cfg, real, num_samples, g) for g in range(cfg.num_generations)]
        for name, cfg in exp.arms.items()
    }
    base_extra = max(e[0] for e in extras.values())  # generation 0 is shared: it samples for the neediest arm
    backend = make_backend(first)
    backends = {name: make_backend(cfg) for name, cfg in exp.arms.items()}
    total = first.repeats * sum(cfg.num_generations for cfg in exp.arms.values())
    with RunDir(out, kind="loop", resume=resume) as run:
        evaluator0 = Evaluator(real, first.features, (), first.num_bootstrap, first.seed)
        run.write_config(
            exp.to_dict()
            | {
                "data_info": data_info,
                "real_images": len(real),
                "samples_per_generation": num_samples,
                "extra_samples": extras | {"generation-0 (shared)": base_extra},
                "backend": backend.describe(),
                "choices": {
                    "samples_per_generation": "num_samples evaluation samples (labels cycling over all classes, the "
                    "same seeds in every arm) are scored; a generation whose samples feed a later poisoning "
                    "generation also samples the retrained-class images the arm's mix needs beyond those",
                    "sample_seeds": "(seed + repeat, generation) -> a range shared by all arms (common random "
                    "numbers); generation 0 is shared by all arms of a repeat",
                    "features": "one extractor trained on the whole real set, reused for every generation",
                    "healing_noise": "95% half-width of (poisoned - base) over repeats; single repeat: none",
                },
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
                    evaluator = Evaluator(real, cfg.features, cfg.holdout_classes, cfg.num_bootstrap, seed)
                    # One extractor for the whole experiment (built on first use, then shared).
                    evaluator._extractor, evaluator._ref_feats = evaluator0._extractor, evaluator0._ref_feats

                    def on_row(row: dict[str, Any], name: str = name) -> None:
                        nonlocal done
                        log(row)
                        done += 1
                        bar.update(completed=min(done, total), info=f"{name} gen {row[KEY_GENERATION]}")

                    rows = run_repeat(
                        cfg,
                        real,
                        rep,
                        root,
                        name,
                        backends[name],
                        evaluator,
                        exp.hooks,
                        num_samples,
                        on_row,
                        base=base,
                        base_extra=base_extra,
                    )
                    evaluator0._extractor, evaluator0._ref_feats = evaluator._extractor, evaluator._ref_feats
                    if base is None:
                        g0 = root / "gen-000"
                        base_model = backends[name].load(g0 / MODEL_DIR)
                        base_row = {k: v for k, v in rows[0].items() if k not in (KEY_ARM, KEY_REPEAT)}
                        base = (base_model, ImageSet.load(g0 / SAMPLES_FILE), base_row)
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
