"""Building a membership-inference setup from what the user gives: a model (or none), data, member sources.

Three settings, one code path (:func:`diffaudit.attacks.mia_run.run_mia`):

* **no ``model``**: diffaudit's own setting (Carlini et al. Sec. 5). The target is model 0, trained here on a
  random half of the pool; K shadows train on other halves. The trainer is the class U-Net of the preset (from
  scratch) or, with ``trainer="gaussian"|"gmm"``, an analytic model.
* **``model`` without members** ("online" audit of a fine-tuning recipe): target and shadows are all fitted here,
  each starting from the user's model (a LoRA fine-tune for a text-to-image pipeline) on a random half of the
  (captioned) pool. Every attack, online LiRA included, runs with exactly known membership.
* **``model`` with members**: the user's model is the target and ``members`` names its training images (a JSON
  list of content ids, or an image source). The pool is ``data`` plus the member and non-member sources.
  Shadows are fitted on random halves of the pool by the trainer of the model's family, starting from
  ``shadow_base`` when given (e.g. the pretrained model the user fine-tuned from) and otherwise from scratch,
  except for a pipeline, which cannot be trained from scratch on a small set and so starts from the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffaudit.attacks.shadow import MiaConfig, MiaSetup, prepare_pool
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator, Trainer

AUTO = "auto"
TRAINERS = (AUTO, "classcond", "gaussian", "gmm")
#: Default U-Net fine-tuning steps of a pipeline's LoRA shadows (see :class:`ShadowTraining`).
PIPELINE_STEPS = 300


@dataclass(frozen=True)
class ShadowTraining:
    """How pipeline shadows are fine-tuned (class models use the preset; analytic models need nothing).

    Defaults: LoRA rank 4 on the attention projections (the diffusers LoRA recipe's smallest common rank: cheap
    to train K times, and a fine-tune of the user's weights rather than a new model), learning rate 1e-4 (LoRA
    recipes use about 1e-4; 1e-5 is for full fine-tuning), batch 4, :data:`PIPELINE_STEPS` steps (about 40 epochs
    of a 30-image half: enough for a small LoRA to fit its half, the regime where membership leaks).
    """

    lora_rank: int = 4
    learning_rate: float = 1e-4
    batch_size: int = 4


def read_member_ids(path: Path) -> set[str]:
    """Member ids from a JSON list of ids, or an object with a ``members`` list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read member ids ({exc})") from exc
    ids = data.get("members") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{path}: expected a non-empty JSON list of image ids (or {{'members': [...]}})")
    return set(ids)


def merge_sets(sets: list[ImageSet]) -> ImageSet:
    """Concatenate image sets whose conditions differ (e.g. two captioned folders): labels index the union of
    their ``class_names`` in first-seen order; unlabelled images stay unlabelled."""
    names: dict[str, int] = {}
    for s in sets:
        for c in s.class_names:
            names.setdefault(c, len(names))
    parts = []
    for s in sets:
        remap = np.array([names[c] for c in s.class_names] + [-1], dtype=np.int64)
        parts.append(ImageSet(s.images, remap[s.labels], tuple(names), s.provenance))
    return ImageSet.concat(parts)


def trainer_for(
    kind: str, preset: Any, model: Generator | None, training: ShadowTraining, show_progress: bool, device: str | None
) -> Trainer:
    """The trainer of the audited family: ``kind`` names it, or ``auto`` takes the model's (class U-Net without)."""
    if kind not in TRAINERS:
        raise ConfigError(f"trainer {kind!r} must be one of {TRAINERS}")
    if kind == AUTO:
        kind = str(model.describe().get("family", "classcond")) if model is not None else "classcond"
    if kind == "pipeline":
        from diffaudit.generators.pipeline_train import PipelineTrainConfig, PipelineTrainer

        cfg = PipelineTrainConfig(
            learning_rate=training.learning_rate, batch_size=training.batch_size, lora_rank=training.lora_rank
        )
        return PipelineTrainer(cfg, show_progress=show_progress)
    if kind in ("gaussian", "gmm"):
        from diffaudit.generators.analytic import AnalyticTrainer

        return AnalyticTrainer(kind)
    from diffaudit.generators.classcond import ClassCondTrainer

    return ClassCondTrainer(preset, show_progress=show_progress, device=device)


def build_setup(
    config: MiaConfig,
    preset: Any,
    data: ImageSet | None,
    model: Generator | None = None,
    members: ImageSet | set[str] | None = None,
    nonmembers: ImageSet | None = None,
    trainer: str = AUTO,
    shadow_base: Generator | None = None,
    training: ShadowTraining = ShadowTraining(),
    wen_conditions: tuple[str, ...] | None = None,
    show_progress: bool = False,
    device: str | None = None,
) -> tuple[MiaSetup, dict[str, dict[str, object]]]:
    """A :class:`MiaSetup` for one of the three settings of the module docstring, and the choices made (each
    ``{value, reason}``, for config.json). Raises before anything is written when the input cannot work."""
    config.validate()
    choices: dict[str, dict[str, object]] = {}
    tr = trainer_for(trainer, preset, model, training, show_progress, device)
    sets = [s for s in (data,) if s is not None]
    member_ids: set[str] | None = None
    if isinstance(members, ImageSet):
        sets = [members, *([nonmembers] if nonmembers is not None else []), *sets]
        member_ids = set(members.ids.tolist())
    elif members is not None:
        member_ids = set(members)
        if nonmembers is not None:
            sets.append(nonmembers)
    if not sets:
        raise ConfigError("no candidate images: give --data (and/or --members/--nonmembers image sources)")
    if members is not None and model is None:
        raise ConfigError("--members names the training images of a given --model; pass the model too")
    pool, info = prepare_pool(merge_sets(sets) if len(sets) > 1 else sets[0], config.pool_size, config.seed)
    if model is not None and pool.shape != tuple(model.image_shape):
        raise DataError(f"candidate images are {pool.shape} but the model makes {tuple(model.image_shape)}")
    target_members = None
    if member_ids is not None:
        target_members = np.isin(pool.ids, sorted(member_ids))
        if not target_members.any():
            raise DataError("none of the member images are in the candidate pool")
        if target_members.all():
            raise DataError("every candidate is a member: give non-members (--nonmembers, or --data)")
    if members is None and model is not None:
        init, reason = model, "every model is fitted here, each a fine-tune of the given model on its half"
    elif tr.family == "pipeline":
        init = shadow_base or model
        reason = "LoRA fine-tunes of " + ("--shadow-base" if shadow_base else "the target (no --shadow-base given)")
    else:
        init = shadow_base
        reason = "fitted from scratch" if init is None else "fitted starting from --shadow-base"
    choices["shadow_init"] = {"value": None if init is None else init.model_id, "reason": reason}
    steps = config.steps
    if steps is None:
        if tr.family == "pipeline":
            steps = PIPELINE_STEPS
            reason = "default LoRA fine-tuning length (see ShadowTraining)"
        elif tr.family == "classcond":
            steps = int(preset.train.steps)
            reason = "the preset's training length"
        else:
            steps, reason = 1, "closed-form fit: steps do not apply"
        choices["steps"] = {"value": steps, "reason": reason}
    if tr.family == "pipeline":
        choices["lora"] = {
            "value": {"rank": training.lora_rank, "lr": training.learning_rate, "batch_size": training.batch_size},
            "reason": "see diffaudit.attacks.mia_setup.ShadowTraining",
        }
    setup = MiaSetup(
        pool=pool,
        trainer=tr,
        steps=steps,
        init=init,
        target=model if members is not None else None,
        target_members=target_members,
        train_seed=int(preset.train.seed) if tr.family == "classcond" else 0,
        pool_info=info,
        wen_conditions=wen_conditions,
        describe={
            "trainer": tr.describe(),
            "model": None if model is None else model.describe(),
            "init": None if init is None else init.model_id,
        },
    )
    return setup, choices


@dataclass
class MiaInputs:
    """What :func:`load_inputs` opened: the model (or None), candidate sets and the Wen conditions."""

    model: Generator | None
    data: ImageSet | None
    members: ImageSet | set[str] | None
    nonmembers: ImageSet | None
    shadow_base: Generator | None
    wen_conditions: tuple[str, ...] | None
    data_info: dict[str, Any]


def load_inputs(
    preset: Any,
    model: str | None = None,
    data: str | None = None,
    members: str | None = None,
    nonmembers: str | None = None,
    prompts: str | None = None,
    shadow_base: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> MiaInputs:
    """Open ``--model`` (any family), the candidate sources and the member list, before a run directory exists.

    Without ``model`` the candidates are the preset's data (``data`` overrides its source, as ``--data`` does for
    ``train``). With a model every source is read at the model's resolution and channels (center crop, as SD
    fine-tuning scripts do). ``members`` is a JSON list of content ids (``.json``) or an image source.
    """
    from diffaudit.data.sources import SourceOptions, load_source_with_info
    from diffaudit.generators import load_generator

    info: dict[str, Any] = {}
    gen = base = None
    if model is not None:
        gen = load_generator(model, device=device, dtype=dtype)
    if shadow_base is not None:
        base = load_generator(shadow_base, device=device, dtype=dtype)

    def source(spec: str) -> ImageSet:
        assert gen is not None
        c, h, _ = gen.image_shape
        opts = SourceOptions(resolution=h, channels=c, resize_policy="center-crop")
        images, src_info = load_source_with_info(spec, opts)
        info[spec] = {k: v for k, v in src_info.items() if k != "canaries"}
        return images

    if gen is None:
        from diffaudit.data.loading import load_data

        if nonmembers is not None:
            raise ConfigError("--nonmembers goes with --model and --members (the model's non-training images)")
        cand, src_info = load_data(preset.data)
        info[preset.data.source] = {k: v for k, v in src_info.items() if k != "canaries"}
    else:
        cand = source(data) if data is not None else None
    mem: ImageSet | set[str] | None = None
    if members is not None:
        if members.endswith(".json") and Path(members).is_file():
            mem = read_member_ids(Path(members))
        else:
            mem = source(members) if gen is not None else None
            if mem is None:
                raise ConfigError("--members as an image source needs --model (the model trained on them)")
    non = source(nonmembers) if nonmembers is not None and gen is not None else None
    wen_conditions = None
    if prompts is not None:
        from diffaudit.data.prompts import read_prompts

        wen_conditions = tuple(e.prompt for e in read_prompts(Path(prompts)))
    return MiaInputs(gen, cand, mem, non, base, wen_conditions, info)


def load_suspect_sets(
    model: str, suspect: str, unseen: str, device: str | None = None, dtype: str = "auto"
) -> tuple[Generator, ImageSet, ImageSet, dict[str, Any]]:
    """Open ``--model`` and the ``--suspect`` / ``--unseen`` sources of dataset inference (at the model's resolution
    and channels, center crop), before any run directory exists."""
    from diffaudit.data.sources import SourceOptions, load_source_with_info
    from diffaudit.generators import load_generator

    gen = load_generator(model, device=device, dtype=dtype)
    c, h, _ = gen.image_shape
    opts = SourceOptions(resolution=h, channels=c, resize_policy="center-crop")
    info: dict[str, Any] = {}
    sets = []
    for option, spec in (("--suspect", suspect), ("--unseen", unseen)):
        images, src_info = load_source_with_info(spec, opts)
        info[spec] = {k: v for k, v in src_info.items() if k != "canaries"}
        if len(images) < 4:
            raise DataError(f"{option} {spec}: dataset inference needs at least 4 images, got {len(images)}")
        sets.append(images)
    overlap = np.intersect1d(sets[0].ids, sets[1].ids)
    if overlap.size:
        raise DataError(f"--suspect and --unseen share {overlap.size} images; the unseen set must be disjoint")
    return gen, sets[0], sets[1], info
