"""The self-consuming loop engine: G poisoning generations, then H healing generations, for one arm and repeat.

Generation 0 trains on real data (a pipeline's generation 0 is the user's model as given); generations
``1..G`` train on a mix of real data and synthetic images (:mod:`diffaudit.loop.mixing`): earlier generations'
samples, or image-to-image re-renderings of the real images they replace (``mix_source="img2img"``);
generations ``G+1..G+H`` train on real data only ("healing", Bohacek & Farid). Every generation trains
(fine-tuning the previous model by default) with the arm's :class:`~diffaudit.generators.base.Trainer`, samples
``num_samples`` images whose provenance records generation and seed, evaluates them against the real set
(:mod:`diffaudit.loop.evaluate`), saves a grid and returns a row.

Layout of a repeat's directory (the experiment, :mod:`diffaudit.loop.experiment`, owns the run directory)::

    RUN/repeat-<r>/gen-000/                  generation 0, shared by every arm of repeat r
    RUN/repeat-<r>/<arm>/gen-<g>/            model/, train-set.npz, samples.npz, grid.png, row.json
                                             (+ train-set-img2img.json, drift.npz when used)

A generation is built in ``gen-<g>.partial/`` and renamed into place when complete, so a killed run leaves
either a complete generation or a partial directory that ``resume`` deletes and redoes. Everything is seeded
by ``(seed + repeat, generation)``, so a resumed run ends with exactly the results of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.data.grid import save_grid
from diffaudit.data.imageset import ImageSet
from diffaudit.io import atomic_write_json, crash_point
from diffaudit.loop.config import (
    BASE_ARM,
    GAUSSIAN,
    GMM,
    GRID_FILE,
    IMG2IMG_FILE,
    KEY_ARM,
    KEY_FILTER,
    KEY_GENERATION,
    KEY_MIX_SOURCE,
    KEY_MODEL_ID,
    KEY_PHASE,
    KEY_REPEAT,
    KEY_SEEDS,
    MIX_IMG2IMG,
    PHASE_POISON,
    ROW_FILE,
    SAMPLES_FILE,
    TRAIN_FILE,
    LoopConfig,
    LoopHooks,
)
from diffaudit.loop.evaluate import Evaluator
from diffaudit.loop.mixing import ACCUMULATE, eligible, img2img_split, mix_generation, mix_summary
from diffaudit.loop.models import LoopModels, make_models
from diffaudit.loop.plan import (
    IMG2IMG_SEED_START,
    SELF_CORRECT_SEED_START,
    drift_requests,
    extra_samples,
    heldout_conditions,
    sample_labels,
    seeds_for,
)

DRIFT_FILE = "drift.npz"
#: What a generation returns: its model, its samples, its row, and its drift images (or None).
Result = tuple[Any, ImageSet, dict[str, Any], ImageSet | None]


@dataclass
class GenerationInputs:
    """Everything one generation reads besides its number (shared by the generations of a repeat)."""

    cfg: LoopConfig
    models: LoopModels
    real: ImageSet
    seed: int
    num_samples: int
    evaluator: Evaluator
    hooks: LoopHooks
    #: The real images fine-tuning sets are drawn from (``real`` minus the held-out conditions when
    #: ``heldout_finetune`` is False); None: ``real``.
    finetune_real: ImageSet | None = None
    #: Generation 0's model (the self-correction projector), set once generation 0 exists.
    base_model: Any = None
    #: Accumulate + img2img: the synthetic images of the previous poisoning generation's training set.
    accumulated: ImageSet | None = None
    #: The training set of the generation just computed (None when it was loaded from disk).
    last_train: ImageSet | None = None

    @property
    def pool(self) -> ImageSet:
        return self.real if self.finetune_real is None else self.finetune_real


def self_correct(x: GenerationInputs, syn: ImageSet, generation: int) -> ImageSet:
    """``syn`` projected towards the data manifold: re-rendered by generation 0's model at low strength.

    After Gillman et al. (2024): each synthetic image is corrected by a model of the real data before it is
    retrained on; an image-to-image pass of the base model is the correction here (seeds of their own range).
    Provenance keeps the generation that made the content.
    """
    if len(syn) == 0:
        return syn
    seeds = seeds_for(x.seed, generation, len(syn), SELF_CORRECT_SEED_START)
    s = float(x.cfg.self_correct_strength)
    return x.models.sample(x.base_model, syn.labels, seeds, generation - 1, init=syn.images, strength=s)


def _img2img_mix(
    x: GenerationInputs, prev: Any, generation: int, holdout: tuple[int, ...]
) -> tuple[ImageSet, dict[str, Any]]:
    """The training set of an image-to-image poisoning generation and its provenance map.

    ``prev`` (the current model) re-renders each replaced real image from its own condition at ``strength``;
    the map links every synthetic image id to the id of the real image it replaces.
    """
    cfg = x.cfg
    kept, originals = img2img_split(x.pool, cfg.mix_spec(), generation, x.seed, holdout, heldout_real=cfg.heldout_real)
    seeds = seeds_for(x.seed, generation, len(originals), IMG2IMG_SEED_START)
    syn = x.models.sample(
        prev, originals.labels, seeds, generation - 1, init=originals.images, strength=float(cfg.strength)
    )
    info: dict[str, Any] = {"strength": float(cfg.strength), "made_by": prev.model_id, "generation": generation - 1}
    if cfg.self_correct_strength > 0:
        syn = self_correct(x, syn, generation)
        info["corrected_by"] = {"model_id": x.base_model.model_id, "strength": float(cfg.self_correct_strength)}
    if x.hooks.tag_fn is not None:
        syn = x.hooks.tag_fn(syn, generation - 1)
    info["pairs"] = [
        {"id": str(s), "init_id": str(r), "seed": int(sd), "label": int(lab)}
        for s, r, sd, lab in zip(syn.ids, originals.ids, seeds, originals.labels, strict=True)
    ]
    parts = [kept, syn]
    if cfg.mode == ACCUMULATE and x.accumulated is not None:
        parts = [kept, x.accumulated, syn]  # every earlier re-rendering stays (Gerstgrasser's accumulate)
    return ImageSet.concat(parts), info


def run_generation(
    x: GenerationInputs,
    pools: list[ImageSet],
    prev_model: Any,
    generation: int,
    num_extra: int,
    drift_ref: ImageSet | None,
    workdir: Path | None,
) -> Result:
    """Mix, train, sample, evaluate one generation; writes its artefacts under ``workdir`` when given.

    Samples ``num_samples`` evaluation images then ``num_extra`` retrained-class images for later mixes
    (:func:`~diffaudit.loop.plan.extra_samples`); only the evaluation images are scored.
    """
    cfg, real, seed = x.cfg, x.real, x.seed
    phase = cfg.phase(generation)
    holdout = heldout_conditions(cfg, real)
    img2img = None
    if phase == PHASE_POISON and cfg.mix_source == MIX_IMG2IMG:
        mixed, img2img = _img2img_mix(x, prev_model, generation, holdout)
    else:
        mixed = mix_generation(
            x.pool, pools, cfg.mix_spec(), generation, seed, holdout,
            synthetic=phase == PHASE_POISON, heldout_real=cfg.heldout_real,
        )  # fmt: skip
        if phase == PHASE_POISON and cfg.self_correct_strength > 0:
            syn = mixed.provenance["synthetic"]
            corrected = self_correct(x, mixed.subset(np.flatnonzero(syn)), generation)
            mixed = ImageSet.concat([mixed.subset(np.flatnonzero(~syn)), corrected])
    pretrain = None
    if generation == 0 and cfg.pretrain_steps > 0:
        # The base model's pre-training data: every real image outside generation 0's fine-tuning set.
        pretrain = real.subset(np.flatnonzero(~np.isin(real.ids, mixed.ids)))
    filter_report = None
    if x.hooks.filter_fn is not None and phase == PHASE_POISON:
        mixed, filter_report = x.hooks.filter_fn(mixed, generation)
    x.last_train = mixed
    model = x.models.fit(mixed, prev_model, generation, seed * 1_000 + generation, workdir, pretrain=pretrain)
    # The evaluation seeds come first, so every arm scores the same seeds whatever its extra samples.
    seeds = seeds_for(seed, generation, x.num_samples + num_extra)
    labels = sample_labels(cfg, real, x.num_samples, num_extra)
    samples = x.models.sample(model, labels, seeds, generation)
    # Scored before any tag: the map measures the model, and a tag strong enough to survive 8x8 images (48
    # grey levels) moved FID by tens of units on its own. What is saved and re-used carries the tag.
    evaluated = samples if num_extra == 0 else samples.subset(np.arange(x.num_samples))
    if x.hooks.tag_fn is not None:
        samples = x.hooks.tag_fn(samples, generation)
    row: dict[str, Any] = {
        KEY_GENERATION: generation,
        KEY_PHASE: phase,
        KEY_MODEL_ID: getattr(model, "model_id", ""),
        KEY_SEEDS: [seeds.start, seeds.stop - 1],
        "samples_evaluated": x.num_samples,
        "samples_extra": num_extra,
        **mix_summary(mixed, holdout),
        "train_steps": cfg.base_steps if generation == 0 else cfg.finetune_steps,
        **x.models.stats(model),
        **x.evaluator(evaluated),
    }
    if pretrain is not None:
        row |= {"pretrain_images": len(pretrain), "pretrain_steps": cfg.pretrain_steps}
    if cfg.mix_source == MIX_IMG2IMG:
        row |= {KEY_MIX_SOURCE: MIX_IMG2IMG, "img2img_strength": float(cfg.strength)}
    drift = None
    if cfg.drift_samples > 0:
        d_labels, d_seeds = drift_requests(cfg, real, seed)
        drift = x.models.sample(model, d_labels, d_seeds, generation)
        row |= x.evaluator.drift(drift, drift_ref if drift_ref is not None else drift)
    if filter_report is not None:
        row[KEY_FILTER] = filter_report
    if workdir is not None:
        x.models.save(model, workdir)
        mixed.save(workdir / TRAIN_FILE)
        samples.save(workdir / SAMPLES_FILE)
        if img2img is not None:
            kept_ids = set(mixed.ids.tolist())  # the filter hook may have dropped some re-renderings
            img2img["pairs"] = [p for p in img2img["pairs"] if p["id"] in kept_ids]
            atomic_write_json(workdir / IMG2IMG_FILE, img2img)
        if drift is not None:
            drift.save(workdir / DRIFT_FILE)
        ncols = min(real.num_classes, 10) if real.is_labelled else None
        if min(real.shape[1:]) >= 4:
            save_grid(samples.images, workdir / GRID_FILE, ncols=ncols, max_images=(ncols or 10) * 10)
        atomic_write_json(workdir / ROW_FILE, row)
    return model, samples, row, drift


def load_generation(final: Path, models: LoopModels, conditions: tuple[str, ...]) -> Result:
    """A complete generation directory's model, samples, row and drift images."""
    row = json.loads((final / ROW_FILE).read_text())
    drift = ImageSet.load(final / DRIFT_FILE) if (final / DRIFT_FILE).exists() else None
    return models.load(final, conditions), ImageSet.load(final / SAMPLES_FILE), row, drift


def run_persisted(
    root: Path, generation: int, models: LoopModels, conditions: tuple[str, ...], compute: Callable[[Path], Result]
) -> Result:
    """Load generation ``generation`` from ``root/gen-<g>`` if complete, else (re)build it and rename it in."""
    final = root / f"gen-{generation:03d}"
    if (final / ROW_FILE).exists():
        return load_generation(final, models, conditions)
    partial = root / f"gen-{generation:03d}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted generation is redone from its start
    if final.exists():
        shutil.rmtree(final)  # complete directories always hold row.json; anything else is debris
    partial.mkdir(parents=True)
    compute(partial)
    crash_point("loop:generation-built")  # crash tests: killed with a complete but unrenamed generation
    os.replace(partial, final)
    crash_point("loop:generation-renamed")  # ... or renamed but not yet logged
    return load_generation(final, models, conditions)


def run_repeat(
    cfg: LoopConfig,
    real: ImageSet,
    repeat: int = 0,
    root: Path | None = None,
    arm: str = BASE_ARM,
    models: LoopModels | None = None,
    evaluator: Evaluator | None = None,
    hooks: LoopHooks = LoopHooks(),
    num_samples: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    base: Result | None = None,
    base_extra: int | None = None,
    stop: int | None = None,
) -> list[dict[str, Any]]:
    """Run every generation of one arm for one repeat (a pure function of its arguments); returns its rows.

    Args:
        cfg: the arm's settings; the repeat's seed is ``cfg.seed + repeat``.
        real: the real pool, ``uint8 (N, C, H, W)``.
        root: the repeat's directory (``RUN/repeat-<r>``); None keeps everything in memory (analytic backends).
        num_samples: evaluation samples per generation (default ``cfg.num_samples``).
        base: generation 0 already computed (model, samples, row, drift images), shared between arms.
        base_extra: extra samples of generation 0 when it is shared (the most any arm needs); default: this arm's.
        on_row: called with each row (the experiment appends it to metrics.jsonl).
        stop: run only generations ``0..stop-1`` (a shard computes the shared generation 0 with ``stop=1``).
    """
    cfg.validate()
    models = models or make_models(cfg)
    seed = cfg.seed + repeat
    n = num_samples or cfg.num_samples
    extras = [extra_samples(cfg, real, n, g) for g in range(cfg.num_generations)]
    if base_extra is not None:
        extras[0] = base_extra
    evaluator = evaluator or Evaluator(
        real, cfg.features, heldout_conditions(cfg, real), cfg.num_bootstrap, seed, cfg.clip_model
    )
    x = GenerationInputs(cfg, models, real, seed, n, evaluator, hooks)
    if not cfg.heldout_finetune:
        x.finetune_real = eligible(real, heldout_conditions(cfg, real))
    accumulate_img2img = cfg.mode == ACCUMULATE and cfg.mix_source == MIX_IMG2IMG
    tmp = None
    if root is None and cfg.backend not in (GAUSSIAN, GMM):
        tmp = tempfile.TemporaryDirectory(prefix="diffaudit-loop-")
        root = Path(tmp.name)
    try:
        rows: list[dict[str, Any]] = []
        pools: list[ImageSet] = []
        model: Any = None
        drift_ref: ImageSet | None = None
        for g in range(cfg.num_generations if stop is None else min(stop, cfg.num_generations)):
            x.last_train = None
            if g == 0 and base is not None:
                model, samples, row, drift = base
            else:

                def compute(workdir: Path | None, g: int = g, prev: Any = model, ref: Any = drift_ref) -> Result:
                    return run_generation(x, pools, prev, g, extras[g], ref, workdir)

                if root is None:
                    model, samples, row, drift = compute(None)
                else:
                    where = root if g == 0 else root / arm
                    model, samples, row, drift = run_persisted(where, g, models, real.class_names, compute)
            if g == 0:
                drift_ref = drift
                x.base_model = model
            if accumulate_img2img and cfg.phase(g) == PHASE_POISON:
                train = x.last_train
                if train is None and root is not None:  # loaded from disk: its training set is there too
                    train = ImageSet.load(root / arm / f"gen-{g:03d}" / TRAIN_FILE)
                x.accumulated = train.subset(np.flatnonzero(train.provenance["synthetic"]))
            row = {KEY_ARM: arm, KEY_REPEAT: repeat, **row}
            pools.append(samples)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def __getattr__(name: str) -> Any:
    # Names that moved to their own modules stay importable from here (examples/ and older scripts use them).
    import importlib

    for module in ("config", "evaluate", "plan", "summary", "experiment"):
        mod = importlib.import_module(f"diffaudit.loop.{module}")
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
