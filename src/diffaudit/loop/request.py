"""What ``diffaudit loop`` asks for, as a library call: :class:`LoopRequest` and :func:`run_loop`.

A request names a preset (diffaudit's own models or the analytic backends) or a user's pipeline directory with
its captioned data, optional one-arm overrides (mode, share or count, mix source), loop settings, model overrides,
the tag-and-scrub safeguard, and a control arm. The CLI only turns options into a request; the demo and scripts
build one directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError

SAFEGUARD_FILE = "safeguard.json"


@dataclass(frozen=True)
class LoopRequest:
    """One loop experiment. ``settings``: LoopConfig fields (``base_steps=300``); ``overrides``: model/data/train/
    sample overrides of the diffusion preset (``train.lr=1e-3``). ``None`` fields keep the preset's value."""

    preset: str = "nepotism-digits"
    quick: bool = False
    model: str | None = None  # a diffusers pipeline directory: loop the user's model (preset ignored)
    data: str | None = None  # with ``model``: the captioned fine-tuning data
    prompts: str | None = None  # with ``model``: extra prompts without data (held out)
    dtype: str = "auto"
    backend: str | None = None
    mode: str | None = None
    mix_source: str | None = None
    strength: float | None = None
    synthetic_share: float | None = None
    synthetic_count: int | None = None
    poison_generations: int | None = None
    heal_generations: int | None = None
    holdout_classes: tuple[int, ...] | None = None
    repeats: int | None = None
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    arms: tuple[str, ...] | None = None
    with_control: bool = False
    tag_and_scrub: bool = False
    tag_key: int = 1234
    tag_amplitude: float = 3.0
    tag_fpr: float = 0.01

    def validate(self) -> None:
        if self.synthetic_share is not None and self.synthetic_count is not None:
            raise ConfigError("give synthetic_share or synthetic_count, not both")
        if self.model is not None:
            if self.data is None:
                raise ConfigError("--model needs --data captioned:DIR (the images the pipeline is fine-tuned on)")
            if self.overrides:
                raise ConfigError(f"--set {self.overrides[0]!r}: model/data overrides do not apply to a pipeline loop")
        elif self.data is not None or self.prompts is not None:
            raise ConfigError("--data and --prompts go with --model PIPELINE_DIR (class models: --set data.source=...)")

    def loop_settings(self) -> dict[str, Any]:
        settings = dict(self.settings)
        for key in ("backend", "poison_generations", "heal_generations", "holdout_classes", "repeats", "seed"):
            if getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        if self.strength is not None:
            settings["strength"] = self.strength
        return settings

    def arm(self) -> dict[str, Any] | None:
        arm: dict[str, Any] = {}
        if self.mode is not None:
            arm["mode"] = self.mode
        if self.mix_source is not None:
            arm["mix_source"] = self.mix_source
        if self.synthetic_share is not None:
            arm.update(synthetic_share=self.synthetic_share, synthetic_count=None)
        if self.synthetic_count is not None:
            arm.update(synthetic_share=None, synthetic_count=self.synthetic_count)
        return arm or None


def build(request: LoopRequest) -> tuple[Any, Any, Any]:
    """The experiment a request describes, and the real data when it was loaded to build it (else None)."""
    from diffaudit.loop.presets import build_experiment, pipeline_experiment

    request.validate()
    if request.model is not None:
        exp, (real, data_info) = pipeline_experiment(
            request.model,
            request.data,
            request.loop_settings(),
            request.arm(),
            prompts=request.prompts or "",
            dtype=request.dtype,
        )
        return exp, real, data_info
    exp = build_experiment(
        request.preset,
        quick=request.quick,
        settings=request.loop_settings(),
        arm_override=request.arm(),
        overrides=list(request.overrides),
        arms=request.arms,
        with_control=request.with_control,
    )
    return exp, None, None


def run_loop(request: LoopRequest, out: str | os.PathLike[str], resume: bool = False) -> dict[str, Any]:
    """Run the experiment into ``out`` (resumable); returns its summary. Tag-and-scrub writes ``safeguard.json``."""
    from diffaudit.io import atomic_write_json
    from diffaudit.loop.experiment import run_experiment

    exp, real, data_info = build(request)
    tag_fn = tag_info = None
    if request.tag_and_scrub:
        from diffaudit.loop.plan import load_real
        from diffaudit.loop.safeguards import tag_and_scrub_hooks

        if real is None:
            real, data_info = load_real(exp.first)
        exp.hooks, tag_fn, tag_info = tag_and_scrub_hooks(real, request.tag_key, request.tag_amplitude, request.tag_fpr)
    summary = run_experiment(exp, Path(out), resume=resume, real=real, data_info=data_info)
    if tag_fn is not None:
        tag_info["inherited_tag_rate_by_generation"] = tag_fn.inherited
        atomic_write_json(Path(out) / SAFEGUARD_FILE, tag_info)
        summary = summary | {"safeguard": tag_info}
    return summary


def run_loop_sweep(request: LoopRequest, spec: Any, out: str | os.PathLike[str], resume: bool = False) -> dict:
    """The damage map of ``spec`` (a :class:`~diffaudit.loop.sweep.SweepSpec`) around the request's first arm."""
    from diffaudit.loop.sweep import run_sweep

    exp, real, data_info = build(request)
    spec.validate(exp.first)
    return run_sweep(exp.first, spec, Path(out), resume=resume, real=real, data_info=data_info)


def describe(request: LoopRequest) -> dict[str, Any]:
    """The resolved arms (what ``--dry-run`` prints)."""
    return build(request)[0].to_dict()
