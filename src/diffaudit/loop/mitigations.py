"""Mitigation arms of the damage map: what keeps self-generated data from collapsing a model.

Each mitigation is loop settings (and, for tag-and-scrub, hooks) applied to *every* arm of a sweep cell, so its
synthetic arm is paired with a control that had the same treatment; the sweep also pairs it with the
unmitigated control of the same seed (:mod:`diffaudit.loop.sweep`).

* ``none``: no mitigation.
* ``scrub``: tag-and-scrub (:mod:`diffaudit.loop.safeguards`): every sample carries a keyed spread-spectrum
  tag; images detected as tagged are removed from the next training set.
* ``accumulate``: Gerstgrasser et al. (2024): keep every real image and add the synthetic ones on top, keeping
  earlier generations' synthetic images too, instead of replacing real images.
* ``redifine``: Yoon et al. (2024), ReDiFine: condition dropout during fine-tuning (``finetune_cond_drop``) plus
  guidance scheduling at sampling (``guidance_schedule="linear"``, mean guidance unchanged). The dropout rate
  0.3 is this project's choice (ReDiFine's own value was not checked here); diffusion backends only.
* ``self-correct``: after Gillman et al. (2024): each synthetic image is projected towards the data manifold
  before it is retrained on, here by an image-to-image pass of generation 0's model at strength 0.3.
"""

from __future__ import annotations

from typing import Any

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.loop.config import GAUSSIAN, GMM, LoopConfig, LoopHooks

NONE = "none"
SCRUB = "scrub"
ACCUMULATE = "accumulate"
REDIFINE = "redifine"
SELF_CORRECT = "self-correct"
MITIGATIONS = (NONE, SCRUB, ACCUMULATE, REDIFINE, SELF_CORRECT)

#: Loop settings of each mitigation (applied to every arm of its cell).
SETTINGS: dict[str, dict[str, Any]] = {
    NONE: {},
    SCRUB: {},
    ACCUMULATE: {"mode": "accumulate"},
    REDIFINE: {"finetune_cond_drop": 0.3, "guidance_schedule": "linear"},
    SELF_CORRECT: {"self_correct_strength": 0.3},
}
#: Tag strength of ``scrub`` in uint8 levels: 8x8 images need ~48 to be detectable (docs/tagging.md).
SCRUB_AMPLITUDE = 48.0


def check_mitigations(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The names, validated (ConfigError naming the unknown one)."""
    for name in names:
        if name not in MITIGATIONS:
            raise ConfigError(f"mitigation {name!r} is not one of {list(MITIGATIONS)}")
    return tuple(names)


def not_applicable(name: str, cfg: LoopConfig, share: float = 0.0) -> str | None:
    """Why mitigation ``name`` does not apply to ``cfg`` at synthetic ``share`` (None when it does)."""
    if name == SCRUB and share >= 1.0 and cfg.mode != "accumulate":
        return "at a 100% share scrubbing would leave no training image"
    if name == REDIFINE and cfg.backend in (GAUSSIAN, GMM):
        return "ReDiFine changes training dropout and guidance; analytic models have neither"
    if name == ACCUMULATE and cfg.mode == "fully-synthetic":
        return "a fully synthetic loop keeps no real images to accumulate on"
    return None


def apply(name: str, cfg: LoopConfig) -> LoopConfig:
    """``cfg`` with mitigation ``name``'s settings."""
    from diffaudit.loop.config import replace_config

    return replace_config(cfg, **SETTINGS[name])


def hooks_for(name: str, real: ImageSet, amplitude: float = SCRUB_AMPLITUDE) -> tuple[LoopHooks, dict[str, Any]]:
    """The hooks of mitigation ``name`` (tag-and-scrub only) and a JSON-ready description."""
    if name != SCRUB:
        return LoopHooks(), {}
    from diffaudit.loop.safeguards import tag_and_scrub_hooks

    hooks, _, info = tag_and_scrub_hooks(real, amplitude=amplitude, target_fpr=0.01)
    return hooks, info
