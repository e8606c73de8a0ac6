"""Configuration: frozen dataclasses per component, named presets, and dotted overrides.

A preset bundles data options, a model architecture, training and sampling settings sized for a machine
(``-cpu`` presets train in minutes on 2 cores; ``-gpu`` presets are larger). Any field can be overridden with
``section.field=value`` strings (values parsed as JSON when possible, e.g. ``model.block_out_channels=[32,64]``).
Every value is checked at this boundary (types and ranges: steps >= 1, lr > 0, seeds in [0, 2**63), ...), so a
bad one is a one-line ConfigError naming the field before any work starts. This module imports nothing heavy:
the CLI imports it to answer ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffaudit.errors import ConfigError
from diffaudit.models.config import ModelConfig


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how to load them (see :mod:`diffaudit.data.sources`)."""

    source: str = "digits"
    resolution: int | None = None
    channels: int | None = None
    resize_policy: str = "resize"
    subset: int | None = None
    classes: tuple[str, ...] | None = None
    seed: int = 0
    canaries: tuple[int, ...] = ()  # copy counts of planted duplicates, e.g. (1, 2, 4, 8, 16, 32)
    canaries_per_count: int = 1
    skip_bad: bool = False
    # Remove near-duplicates (normalized L2 <= dedup) AFTER planting canaries: a mitigation of memorization
    # (diffaudit.data.dedup, docs/mitigations.md). None: keep the set as loaded.
    dedup: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Every step's randomness derives from ``(seed, step)``, so resume is exact."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    cond_drop_prob: float = 0.1  # label dropout for classifier-free guidance
    # Condition randomisation (Somepalli et al. 2023, a memorization mitigation): each training label is replaced
    # by a uniformly random class with this probability, drawn from the step's (seed, step) stream.
    cond_random_prob: float = 0.0
    # DP-SGD (per-sample clipping + Gaussian noise, diffaudit.dp): target epsilon at dp_delta over the whole run;
    # None: ordinary training. dp_clip is the per-sample gradient norm bound.
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0


@dataclass(frozen=True)
class SampleConfig:
    """Sampling defaults: sampler kind, number of steps, guidance and temperature."""

    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 2.0
    temperature: float = 1.0
    batch_size: int = 256


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.name,
            "data": dataclasses.asdict(self.data),
            "model": self.model.to_dict(),
            "train": dataclasses.asdict(self.train),
            "sample": dataclasses.asdict(self.sample),
        }


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "digits-8",
            "scikit-learn digits at 8x8 on CPU; recognisable digits in about 3 minutes on 2 cores",
            DataConfig(source="digits"),
            ModelConfig(
                resolution=8,
                channels=1,
                num_classes=10,
                block_out_channels=(32, 64),
                attention_levels=(False, False),
            ),
            TrainConfig(steps=800, batch_size=128, lr=2e-3),
        ),
        Preset(
            "faces-32",
            "the 100 LFW faces of scikit-image resized to 32x32, CPU (about 3 minutes on 2 cores)",
            DataConfig(source="faces", resolution=32),
            ModelConfig(
                resolution=32,
                channels=1,
                num_classes=1,
                block_out_channels=(16, 32, 64),
                attention_levels=(False, False, False),
            ),
            TrainConfig(steps=700, batch_size=32, lr=2e-3),
            # After 3 minutes of training, deterministic samplers (DDIM, DPM-Solver++) leave about a third of the
            # 32x32 samples speckled; ancestral DDPM gives clean ones (measured on glyphs-32, seeds 0-19).
            SampleConfig(sampler="ddpm", num_steps=250, guidance_scale=2.0, batch_size=100),
        ),
        Preset(
            "glyphs-32",
            "capital letters A-J rendered from matplotlib's fonts at 32x32, CPU (about 3 minutes on 2 cores)",
            DataConfig(source="glyphs", resolution=32),
            ModelConfig(
                resolution=32,
                channels=1,
                num_classes=10,
                block_out_channels=(16, 32, 64),
                attention_levels=(False, False, False),
            ),
            TrainConfig(steps=700, batch_size=32, lr=2e-3),
            # After 3 minutes of training, deterministic samplers (DDIM, DPM-Solver++) leave about a third of the
            # 32x32 samples speckled; ancestral DDPM gives clean ones (measured on glyphs-32, seeds 0-19).
            SampleConfig(sampler="ddpm", num_steps=250, guidance_scale=2.0, batch_size=100),
        ),
        Preset(
            "digits-32-gpu",
            "digits upsampled to 32x32 with a larger U-Net, for a GPU",
            DataConfig(source="digits", resolution=32),
            ModelConfig(
                resolution=32,
                channels=1,
                num_classes=10,
                block_out_channels=(64, 128, 256),
                layers_per_block=2,
                attention_levels=(False, True, True),
                norm_num_groups=32,
            ),
            TrainConfig(steps=20000, batch_size=256, lr=2e-4, ema_decay=0.9995, checkpoint_every=2000),
        ),
        Preset(
            "faces-64-gpu",
            "LFW faces at 64x64 with a larger U-Net, for a GPU",
            DataConfig(source="faces", resolution=64),
            ModelConfig(
                resolution=64,
                channels=1,
                num_classes=1,
                block_out_channels=(64, 128, 256, 256),
                layers_per_block=2,
                attention_levels=(False, False, True, True),
                norm_num_groups=32,
            ),
            TrainConfig(steps=20000, batch_size=64, lr=2e-4, ema_decay=0.9995, checkpoint_every=2000),
        ),
        Preset(
            "glyphs-64-gpu",
            "the glyphs at 64x64 with a larger U-Net, for a GPU",
            DataConfig(source="glyphs", resolution=64),
            ModelConfig(
                resolution=64,
                channels=1,
                num_classes=10,
                block_out_channels=(64, 128, 256, 256),
                layers_per_block=2,
                attention_levels=(False, False, True, True),
                norm_num_groups=32,
            ),
            TrainConfig(steps=20000, batch_size=128, lr=2e-4, ema_decay=0.9995, checkpoint_every=2000),
        ),
    ]
}


# ---- validation ---------------------------------------------------------------------------------------------
#: Seeds are used as numpy / torch seeds and combined into 63-bit step seeds.
SEED_LIMIT = 2**63
#: Largest image side accepted anywhere (a 4096x4096 image is 16 M pixels; larger sizes mean a typo).
MAX_RESOLUTION = 4096


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(where: str, value: Any, lo: int | None = None, hi: int | None = None, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not _is_int(value):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(f"{where} must be >= {lo}, got {value}")
    if hi is not None and value >= hi:
        raise ConfigError(f"{where} must be < {hi}, got {value}")


def _check_float(
    where: str, value: Any, lo: float | None = None, hi: float | None = None, open_lo: bool = False
) -> None:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (open_lo and value == lo)):
        raise ConfigError(f"{where} must be {'>' if open_lo else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {hi}, got {value}")


def _check_str(where: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")


def _check_seq(where: str, value: Any, item: type, lo: int | None = None) -> None:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where} must be a non-empty list, got {value!r}")
    for v in value:
        if (item is int and not _is_int(v)) or (item is bool and not isinstance(v, bool)):
            raise ConfigError(f"{where} must be a list of {item.__name__}s, got {value!r}")
        if lo is not None and v < lo:
            raise ConfigError(f"{where} entries must be >= {lo}, got {value!r}")


def check_model_fields(fields: Mapping[str, Any], where: str = "model") -> None:
    """Check the type and range of every ModelConfig field present in ``fields`` (a dict from JSON or overrides).

    Runs before ``ModelConfig(**fields)``, whose own checks assume numbers (``norm_num_groups=0`` would divide by
    zero there). Messages name ``where.field``.
    """
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown model config keys {unknown}; known: {sorted(known)}")
    checks: dict[str, Any] = {
        "resolution": lambda w, v: _check_int(w, v, 1, MAX_RESOLUTION + 1),
        "channels": lambda w, v: _check_int(w, v, 1, 4),
        "num_classes": lambda w, v: _check_int(w, v, 0, 1_000_001),
        "block_out_channels": lambda w, v: _check_seq(w, v, int, 1),
        "layers_per_block": lambda w, v: _check_int(w, v, 1, 65),
        "attention_levels": lambda w, v: _check_seq(w, v, bool),
        "norm_num_groups": lambda w, v: _check_int(w, v, 1),
        "num_train_timesteps": lambda w, v: _check_int(w, v, 1, 1_000_001),
        "beta_schedule": _check_str,
        "prediction_type": _check_str,
    }
    for name, value in fields.items():
        checks[name](f"{where}.{name}", value)


def validate_data(cfg: DataConfig, where: str = "data") -> DataConfig:
    """Raise a ConfigError naming the field when a DataConfig value is out of range; returns ``cfg``."""
    _check_str(f"{where}.source", cfg.source)
    _check_int(f"{where}.resolution", cfg.resolution, 1, MAX_RESOLUTION + 1, none_ok=True)
    if cfg.channels is not None and cfg.channels not in (1, 3) or isinstance(cfg.channels, bool):
        raise ConfigError(f"{where}.channels must be 1 or 3, got {cfg.channels!r}")
    _check_str(f"{where}.resize_policy", cfg.resize_policy)
    _check_int(f"{where}.subset", cfg.subset, 1, none_ok=True)
    if cfg.classes is not None and (
        not isinstance(cfg.classes, tuple | list) or not all(isinstance(c, str) for c in cfg.classes)
    ):
        raise ConfigError(f"{where}.classes must be a list of class names, got {cfg.classes!r}")
    _check_int(f"{where}.seed", cfg.seed, 0, SEED_LIMIT)
    if not isinstance(cfg.canaries, tuple | list) or not all(_is_int(c) and c >= 1 for c in cfg.canaries):
        raise ConfigError(f"{where}.canaries must be a list of copy counts >= 1, got {cfg.canaries!r}")
    _check_int(f"{where}.canaries_per_count", cfg.canaries_per_count, 1)
    if not isinstance(cfg.skip_bad, bool):
        raise ConfigError(f"{where}.skip_bad must be true or false, got {cfg.skip_bad!r}")
    if cfg.dedup is not None:
        _check_float(f"{where}.dedup", cfg.dedup, 0.0)
    return cfg


def validate_train(cfg: TrainConfig, where: str = "train") -> TrainConfig:
    """Raise a ConfigError naming the field when a TrainConfig value is out of range; returns ``cfg``."""
    _check_int(f"{where}.steps", cfg.steps, 1)
    _check_int(f"{where}.batch_size", cfg.batch_size, 1)
    _check_float(f"{where}.lr", cfg.lr, 0.0, open_lo=True)
    _check_float(f"{where}.weight_decay", cfg.weight_decay, 0.0)
    _check_int(f"{where}.warmup_steps", cfg.warmup_steps, 0)
    _check_float(f"{where}.grad_clip", cfg.grad_clip, 0.0)
    _check_float(f"{where}.ema_decay", cfg.ema_decay, 0.0, 1.0)
    _check_float(f"{where}.cond_drop_prob", cfg.cond_drop_prob, 0.0, 1.0)
    _check_float(f"{where}.cond_random_prob", cfg.cond_random_prob, 0.0, 1.0)
    if cfg.dp_epsilon is not None:
        _check_float(f"{where}.dp_epsilon", cfg.dp_epsilon, 0.0, open_lo=True)
    _check_float(f"{where}.dp_delta", cfg.dp_delta, 0.0, 1.0, open_lo=True)
    _check_float(f"{where}.dp_clip", cfg.dp_clip, 0.0, open_lo=True)
    _check_int(f"{where}.checkpoint_every", cfg.checkpoint_every, 1)
    _check_int(f"{where}.log_every", cfg.log_every, 1)
    _check_int(f"{where}.seed", cfg.seed, 0, SEED_LIMIT)
    return cfg


def validate_sample(cfg: SampleConfig, where: str = "sample") -> SampleConfig:
    """Raise a ConfigError naming the field when a SampleConfig value is out of range; returns ``cfg``."""
    _check_str(f"{where}.sampler", cfg.sampler)
    _check_int(f"{where}.num_steps", cfg.num_steps, 1)
    _check_float(f"{where}.guidance_scale", cfg.guidance_scale)
    _check_float(f"{where}.temperature", cfg.temperature, 0.0)
    _check_int(f"{where}.batch_size", cfg.batch_size, 1)
    return cfg


def validate_preset(preset: Preset) -> Preset:
    """Check every section of ``preset``; returns it unchanged."""
    check_model_fields(preset.model.to_dict())
    validate_data(preset.data)
    validate_train(preset.train)
    validate_sample(preset.sample)
    return preset


def get_preset(name: str) -> Preset:
    """The preset called ``name``; unknown names raise a ConfigError listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as ddim or folder:/data


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"override {key}: expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if current is not None and value is not None and not isinstance(value, type(current)):
        raise ConfigError(f"override {key}: expected {type(current).__name__}, got {value!r}")
    return value


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """Apply ``section.field=value`` overrides to ``preset``; unknown sections or fields are errors.

    All overrides of a section are applied together and validated once, so fields that must agree (e.g.
    ``model.block_out_channels`` and ``model.attention_levels``) can be changed in either order.
    """
    sections = {"data": preset.data, "model": preset.model, "train": preset.train, "sample": preset.sample}
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; known: {sorted(sections)}")
        obj = sections[section]
        names = {f.name for f in dataclasses.fields(obj)}
        if name not in names:
            raise ConfigError(f"override {item!r}: {section} has no field {name!r}; known: {sorted(names)}")
        changes[section][name] = _coerce(_parse_value(raw), getattr(obj, name), key)
    if changes["model"]:
        # Before ModelConfig's own checks, which assume well-typed positive numbers.
        check_model_fields({**preset.model.to_dict(), **changes["model"]})
    updated = {
        name: dataclasses.replace(obj, **changes[name]) if changes[name] else obj for name, obj in sections.items()
    }
    return validate_preset(dataclasses.replace(preset, **updated))  # type: ignore[arg-type]


def resolve_preset(name: str, data: str | None, overrides: list[str] | None, steps: int | None = None) -> Preset:
    """A preset with a data source, a step count and ``--set`` overrides applied (in that order), validated."""
    import json

    extra: list[str] = []
    if data is not None:
        extra.append(f"data.source={json.dumps(data)}")
    if steps is not None:
        extra.append(f"train.steps={steps}")
    return apply_overrides(get_preset(name), extra + list(overrides or []))
