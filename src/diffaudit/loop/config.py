"""The loop's settings (:class:`LoopConfig`), row keys, and the hooks the safeguards plug into.

Every field of :class:`LoopConfig` is recorded in ``config.json``; arms of one experiment are LoopConfigs that
differ in mixing settings only (they share generation 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.loop.mixing import MODES, MixSpec

# ---- row keys ---------------------------------------------------------------------------------------------
KEY_ARM = "arm"
KEY_REPEAT = "repeat"
KEY_GENERATION = "generation"
KEY_PHASE = "phase"
KEY_SEEDS = "sample_seeds"  # [first, last] sampling seed of the generation
KEY_MODEL_ID = "model_id"
KEY_FILTER = "filter"
KEY_MIX_SOURCE = "mix_source"
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
IMG2IMG_FILE = "train-set-img2img.json"
MODEL_DIR = "model"
MODEL_REF_FILE = "model-ref.json"
GRID_FILE = "grid.png"
SUMMARY_FILE = "summary.json"

# ---- backends (generator families the loop retrains) ------------------------------------------------------
DIFFUSION = "diffusion"
GAUSSIAN = "gaussian"
GMM = "gmm"
PIPELINE = "pipeline"
BACKENDS = (DIFFUSION, GAUSSIAN, GMM, PIPELINE)
#: Where a poisoning generation's synthetic images come from: earlier generations' samples, or image-to-image
#: re-renderings (by the current model, from their own conditions) of the real images they replace.
MIX_POOL, MIX_IMG2IMG = "pool", "img2img"
MIX_SOURCES = (MIX_POOL, MIX_IMG2IMG)
#: Guidance over the sampling steps: the same scale at every step, or rising linearly (see generators.denoising).
GUIDANCE_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class LoopConfig:
    """One loop arm's settings (all recorded in config.json).

    ``backend`` ``pipeline`` loops a user's diffusers text-to-image pipeline: ``model`` is its directory
    (generation 0 = that model as given, not trained), ``data`` the captioned data source it is fine-tuned on
    (``captioned:DIR``), ``prompts`` an optional file of extra prompts with no fine-tuning data (held out).
    """

    backend: str = DIFFUSION
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
    mix_source: str = MIX_POOL
    strength: float = 0.5  # image-to-image strength of mix_source="img2img" (1 = from pure noise)
    drift_samples: int = 0  # > 0: that many fixed-seed images per condition, compared with generation 0's
    model: str = ""  # pipeline backend: the pipeline directory (sd:PATH accepted)
    data: str = ""  # data source replacing the preset's (pipeline backend: required, e.g. captioned:DIR)
    prompts: str = ""  # pipeline backend: extra prompts file (no fine-tuning data: held-out conditions)
    dtype: str = "auto"  # pipeline backend: auto | fp32 | fp16 | bf16
    lora_rank: int = 0  # pipeline backend: 0 = full U-Net fine-tuning, > 0 = LoRA of that rank
    learning_rate: float = 1e-5  # pipeline backend fine-tuning rate
    batch_size: int = 4  # pipeline backend fine-tuning batch
    # ---- Bohacek & Farid's protocol (bohacek-farid preset) and the mitigations (loop/mitigations.py) ----
    pretrain_steps: int = 0  # > 0: generation 0 pre-trains on the real images outside its fine-tuning set first
    heldout_finetune: bool = True  # False: held-out conditions get no images in any fine-tuning set (the paper)
    finetune_budget: float = 0.0  # > 0: steps per generation = budget x (pretrain_steps or base_steps)
    finetune_warmup: int | None = None  # warm-up steps of generations >= 1 (None: the trainer's own)
    finetune_cond_drop: float | None = None  # condition dropout of generations >= 1 (ReDiFine; None: trainer's)
    guidance_schedule: str = "constant"  # or "linear": guidance rising from 1 to 2w-1 over the steps (mean w)
    self_correct_strength: float = 0.0  # > 0: generation 0's model re-renders each synthetic image at this strength
    clip_model: str = ""  # a local CLIP directory: text alignment (CLIP score) of pipeline samples

    def mix_spec(self) -> MixSpec:
        return MixSpec(self.mode, self.train_size, self.synthetic_share, self.synthetic_count)

    def validate(self) -> None:
        """Raise ConfigError naming the bad setting (called before any run directory is made)."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {list(MODES)}")
        self.mix_spec().validate()
        if not isinstance(self.heldout_real, bool):
            raise ConfigError(f"heldout_real={self.heldout_real!r} must be true or false")
        for name in ("poison_generations", "heal_generations", "drift_samples", "lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} must be a non-negative integer")
        for name in ("num_samples", "repeats", "base_steps", "steps_per_generation", "sample_steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        if self.retrain not in ("finetune", "scratch"):
            raise ConfigError(f"retrain={self.retrain!r} must be 'finetune' or 'scratch'")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature!r} must be >= 0")
        if self.mix_source not in MIX_SOURCES:
            raise ConfigError(f"mix_source={self.mix_source!r} is not one of {list(MIX_SOURCES)}")
        if self.mix_source == MIX_IMG2IMG and not 0.0 < float(self.strength) <= 1.0:
            raise ConfigError(f"strength={self.strength!r} must be in (0, 1]")
        if not isinstance(self.heldout_finetune, bool):
            raise ConfigError(f"heldout_finetune={self.heldout_finetune!r} must be true or false")
        if not self.heldout_finetune and not self.holdout_classes:
            raise ConfigError("heldout_finetune=False needs holdout_classes (the conditions without fine-tuning data)")
        if not isinstance(self.pretrain_steps, int) or self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps={self.pretrain_steps!r} must be a non-negative integer")
        if self.pretrain_steps and (self.backend == PIPELINE or self.retrain != "finetune"):
            raise ConfigError("pretrain_steps applies to fine-tuned class or analytic models (not pipelines/scratch)")
        if not 0.0 <= float(self.finetune_budget) <= 10.0:
            raise ConfigError(f"finetune_budget={self.finetune_budget!r} must be in [0, 10] (a share of base training)")
        if self.finetune_warmup is not None and (not isinstance(self.finetune_warmup, int) or self.finetune_warmup < 0):
            raise ConfigError(f"finetune_warmup={self.finetune_warmup!r} must be a non-negative integer or null")
        if self.finetune_cond_drop is not None and not 0.0 <= float(self.finetune_cond_drop) <= 1.0:
            raise ConfigError(f"finetune_cond_drop={self.finetune_cond_drop!r} must be in [0, 1] or null")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ConfigError(f"guidance_schedule={self.guidance_schedule!r} is not one of {list(GUIDANCE_SCHEDULES)}")
        if self.guidance_schedule != "constant" and self.backend in (GAUSSIAN, GMM):
            raise ConfigError("guidance_schedule applies to diffusion models (analytic samples are exact draws)")
        if not 0.0 <= float(self.self_correct_strength) <= 1.0:
            raise ConfigError(f"self_correct_strength={self.self_correct_strength!r} must be in [0, 1]")
        if self.backend == PIPELINE:
            if not self.model:
                raise ConfigError("the pipeline backend needs model=PIPELINE_DIR (--model)")
            if not self.data:
                raise ConfigError("the pipeline backend needs data=captioned:DIR (--data): the fine-tuning images")
            if self.retrain != "finetune":
                raise ConfigError("a pipeline is always fine-tuned (retrain='scratch' does not apply)")
            if not self.learning_rate > 0:
                raise ConfigError(f"learning_rate={self.learning_rate!r} must be > 0")
        elif self.model:
            raise ConfigError(f"model={self.model!r} is for the pipeline backend (got backend {self.backend!r})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def finetune_steps(self) -> int:
        """Fine-tuning steps of generations >= 1: ``finetune_budget`` x the base training, else the fixed count."""
        if self.finetune_budget > 0:
            return max(1, round(float(self.finetune_budget) * (self.pretrain_steps or self.base_steps)))
        return self.steps_per_generation

    @property
    def num_generations(self) -> int:
        """Models per arm and repeat, generation 0 included."""
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
