"""Named loop experiments: Bohacek & Farid's nepotism sweep and the three MAD loops, on digits, plus theory.

Each preset is a base :class:`LoopConfig` and a set of arms (field overrides). ``quick`` variants shrink
sizes and steps so that an experiment finishes in about a minute on 2 CPU cores (tests, smoke runs); the
full variants are sized to finish in about 20 minutes on 2 uncontended cores (see docs/loop.md for
what was measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.loop.config import LoopConfig, replace_config
from diffaudit.loop.experiment import Experiment


@dataclass(frozen=True)
class LoopPreset:
    name: str
    description: str
    base: LoopConfig
    arms: dict[str, dict[str, Any]]
    quick: dict[str, Any] = field(default_factory=dict)


# Digits: 1797 8x8 images. 900 real training images match Bohacek & Farid's 900 (their 3.3% = 30 of 900).
_DIGITS = LoopConfig(
    backend="diffusion",
    diffusion_preset="digits-8",
    train_size=900,
    num_samples=500,
    base_steps=600,  # ~2.5 min on 2 free cores: recognisable digits, not converged (recorded as a shrink)
    steps_per_generation=60,  # fine-tuning per generation; Bohacek & Farid do not publish theirs
    sample_steps=25,
    guidance_scale=2.0,
)
_QUICK_DIGITS = {
    "train_size": 150,
    "num_samples": 100,
    "base_steps": 30,
    "steps_per_generation": 5,
    "sample_steps": 5,
    "poison_generations": 2,
    "heal_generations": 1,
    "overrides": (
        "model.block_out_channels=[8,16]",
        "model.norm_num_groups=4",
        "train.batch_size=16",
        "train.warmup_steps=5",
    ),
}

# Bohacek & Farid, faithfully (issue 15), on digits. Their SD 2.1 was pre-trained on LAION and never saw the
# ~900 FFHQ faces it was fine-tuned on; here the base model pre-trains on the ~900 real digits *outside* the
# fine-tuning set (every class, disjoint images), then generation 0 fine-tunes it on 900 real digits of classes
# 0-6. Classes 7-9 play the held-out prompts: no fine-tuning data in any generation. Sampling as SD's defaults:
# guidance 7.5, img2img strength 0.8 (diffusers' StableDiffusionImg2ImgPipeline). Hyper-parameters the paper
# does not publish: fine-tuning budget 10% of the pre-training per generation, warm-up 6 steps.
_SHARES = {"share-0": 0.0, "share-3.3": 0.033, "share-10": 0.10, "share-25": 0.25, "share-50": 0.5, "share-100": 1.0}
_BF = LoopConfig(
    backend="diffusion",
    diffusion_preset="digits-8",
    overrides=("train.warmup_steps=6",),
    train_size=900,
    num_samples=500,
    pretrain_steps=600,
    base_steps=60,
    finetune_budget=0.1,
    sample_steps=25,
    guidance_scale=7.5,
    mix_source="img2img",
    strength=0.8,
    holdout_classes=(7, 8, 9),
    heldout_finetune=False,
    poison_generations=5,
    heal_generations=3,
)
_QUICK_BF = {
    "train_size": 150,
    "num_samples": 100,
    "pretrain_steps": 40,
    "base_steps": 5,
    "sample_steps": 5,
    "poison_generations": 2,
    "heal_generations": 1,
    "overrides": (
        "model.block_out_channels=[8,16]",
        "model.norm_num_groups=4",
        "train.batch_size=16",
        "train.warmup_steps=2",
    ),
}

PRESETS: dict[str, LoopPreset] = {
    p.name: p
    for p in [
        LoopPreset(
            "nepotism-digits",
            "Bohacek & Farid at small scale: synthetic shares 0, 3.3%, 10%, 25%, 100% of 900; 5 poisoning + 3 "
            "healing generations, fine-tuning; synthetic data only of digits 0-4 (5-9 held out)",
            replace_config(_DIGITS, poison_generations=5, heal_generations=3, holdout_classes=(5, 6, 7, 8, 9)),
            {
                "share-0": {"synthetic_share": 0.0},
                "share-3.3": {"synthetic_share": None, "synthetic_count": 30},
                "share-10": {"synthetic_share": 0.10},
                "share-25": {"synthetic_share": 0.25},
                "share-100": {"synthetic_share": 1.0},
            },
            _QUICK_DIGITS,
        ),
        LoopPreset(
            "bohacek-farid",
            "Bohacek & Farid's protocol on digits: a base model pre-trained on other digits (all classes), "
            "fine-tuned on 900 real digits 0-6; each generation fine-tunes the previous one (10% of the "
            "pre-training, 6 warm-up steps) with a share of the real images replaced by img2img re-renderings "
            "(strength 0.8, guidance 7.5) from their own class; digits 7-9 get no fine-tuning data; 5 poisoning "
            "+ 3 healing generations; shares 0, 3.3, 10, 25, 50, 100%",
            _BF,
            {name: {"synthetic_share": share} for name, share in _SHARES.items()},
            _QUICK_BF,
        ),
        LoopPreset(
            "bohacek-farid-32",
            "bohacek-farid at 32x32 (digits upsampled, the digits-32-gpu U-Net): for a GPU",
            replace_config(_BF, diffusion_preset="digits-32-gpu", pretrain_steps=3000, base_steps=300),
            {name: {"synthetic_share": share} for name, share in _SHARES.items()},
            _QUICK_BF | {"overrides": ("data.resolution=16", "model.resolution=16", *_QUICK_BF["overrides"])},
        ),
        LoopPreset(
            "mad-digits",
            "Alemohammad et al.'s three loops (fully synthetic, synthetic augmentation, fresh data) on digits, "
            "5 generations, no healing; 50% synthetic in the mixed loops",
            replace_config(_DIGITS, poison_generations=5, heal_generations=0, train_size=600),
            {
                "fully-synthetic": {"mode": "fully-synthetic", "synthetic_share": 1.0},
                "synthetic-augmentation": {"mode": "replace", "synthetic_share": 0.5},
                "fresh-data": {"mode": "fresh", "synthetic_share": 0.5},
            },
            _QUICK_DIGITS | {"heal_generations": 0},
        ),
        LoopPreset(
            "gaussian-digits",
            "The analytic Gaussian backend on the digits pixels: replace vs accumulate, fully synthetic "
            "(Shumailov; Gerstgrasser), 10 generations",
            replace_config(
                _DIGITS,
                backend="gaussian",
                train_size=200,
                num_samples=400,
                poison_generations=10,
                heal_generations=3,
                features="pixels",
                synthetic_share=1.0,
            ),
            {"replace": {"mode": "fully-synthetic"}, "accumulate": {"mode": "accumulate"}},
            {"poison_generations": 4, "heal_generations": 1, "num_samples": 200},
        ),
    ]
}


def get_loop_preset(name: str) -> LoopPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown loop preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build_experiment(
    name: str,
    quick: bool = False,
    settings: dict[str, Any] | None = None,
    arm_override: dict[str, Any] | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    arms: tuple[str, ...] | list[str] | None = None,
    with_control: bool = False,
) -> Experiment:
    """The preset's experiment: ``quick`` shrinks it; ``settings`` override fields of every arm;
    ``arm_override`` (mode / share / count from the command line) replaces the arms with one arm ``custom``;
    ``overrides`` are diffusion preset overrides (``train.lr=1e-3``) appended to the preset's; ``arms`` keeps
    only the named preset arms (in that order); ``with_control`` puts an arm ``control`` (no synthetic data,
    otherwise the same) before the others, so a custom arm is shown beside its paired control."""
    preset = get_loop_preset(name)
    base = preset.base
    quick_fields = dict(preset.quick) if quick else {}
    base = replace_config(base, **quick_fields)
    if overrides:  # diffusion-model overrides from the command line come after the preset's (and quick's)
        base = replace_config(base, overrides=tuple(base.overrides) + tuple(overrides))
    arms_src = {"custom": dict(arm_override)} if arm_override else dict(preset.arms)
    if arms:
        unknown = [a for a in arms if a not in arms_src]
        if unknown:
            raise ConfigError(f"preset {name!r} has no arm(s) {unknown}; its arms: {list(arms_src)}")
        arms_src = {a: arms_src[a] for a in arms}
    if with_control and "control" not in arms_src:
        # The control mixes no synthetic data; everything else (mode, source, steps) as the other arms.
        first_fields = dict(next(iter(arms_src.values())))
        control = first_fields | {"synthetic_share": 0.0, "synthetic_count": None}
        if control.get("mode") == "fully-synthetic":
            control["mode"] = "replace"  # a fully synthetic loop has no share; its control is the real-only one
        arms_src = {"control": control, **arms_src}
    arms = {}
    for arm_name, fields in arms_src.items():
        fields = dict(fields)
        # 30 of 900 is Bohacek & Farid's count; a quick run with a smaller train_size keeps the share (3.3%).
        scale = quick and not arm_override and base.train_size != preset.base.train_size
        if scale and fields.get("synthetic_count") is not None:
            count = fields.pop("synthetic_count")
            fields["synthetic_count"] = max(1, round(count * base.train_size / preset.base.train_size))
        arm_cfg = replace_config(replace_config(base, **fields), **(settings or {}))
        if arm_name == "control":  # settings may carry a share or count: the control keeps none
            arm_cfg = replace_config(arm_cfg, synthetic_share=0.0, synthetic_count=None)
        arms[arm_name] = arm_cfg
    return Experiment(arms, name=name + ("-quick" if quick else ""))


#: Defaults of a loop over a user's text-to-image pipeline (``diffaudit loop --model PIPELINE_DIR``), sized for
#: a small captioned folder: Bohacek & Farid's protocol (image-to-image re-renderings of the replaced real
#: images, U-Net fine-tuning, healing on real data). ``random-cnn`` features: a seeded random conv trunk that
#: works on RGB images of any size >= 4 pixels without downloads (docs/loop.md).
PIPELINE_DEFAULTS: dict[str, Any] = {
    "backend": "pipeline",
    "mix_source": "img2img",
    "strength": 0.5,
    "synthetic_share": 0.25,
    "poison_generations": 2,
    "heal_generations": 1,
    "steps_per_generation": 20,
    "sample_steps": 25,
    "guidance_scale": 7.5,
    "features": "random-cnn",
    "drift_samples": 2,
}


def pipeline_experiment(
    model: str,
    data: str,
    settings: dict[str, Any] | None = None,
    arm_override: dict[str, Any] | None = None,
    prompts: str = "",
    dtype: str = "auto",
):
    """A one-arm experiment over the pipeline ``model`` fine-tuned on ``data``; returns ``(experiment, real)``.

    ``train_size`` defaults to every real image and ``num_samples`` to 4 per condition (at least 12); the real
    set is loaded here (errors name the folder before any run directory exists) and reused by the run.
    """
    from diffaudit.loop.plan import load_real

    fields = {
        **PIPELINE_DEFAULTS,
        "model": str(model),
        "data": str(data),
        "prompts": str(prompts or ""),
        "dtype": dtype,
    }
    fields |= dict(settings or {}) | dict(arm_override or {})
    base = LoopConfig(**{k: v for k, v in fields.items() if k not in ("train_size", "num_samples")})
    real, info = load_real(base)
    fields.setdefault("train_size", len(real))
    fields.setdefault("num_samples", max(12, 4 * real.num_classes))
    cfg = replace_config(LoopConfig(), **fields)
    return Experiment({"custom": cfg}, name="pipeline"), (real, info)
