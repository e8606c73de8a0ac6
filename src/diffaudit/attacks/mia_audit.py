"""What ``diffaudit mia`` asks for, as a library call: :class:`MiaRequest` and :func:`run_mia_audit`.

Three settings (docs/mia.md): no ``model`` trains a target and shadows from a preset; ``model`` without
``members`` fine-tunes the target and shadows from the user's model on random halves (online LiRA with known
membership); ``model`` with ``members`` attacks the user's model itself. :func:`resolve_mia` turns a request into
the attack configuration, the opened inputs and the record of every choice the papers leave open;
:func:`run_mia_audit` runs it into a run directory (with Wen et al.'s detector). :func:`run_dataset_inference_audit`
answers "was this collection used to train the model?".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffaudit.errors import ConfigError

# Sources whose images keep their meaning under a horizontal flip (digits and letters do not: flips change
# the class), used when ``flip`` is not given.
FLIP_SAFE_SOURCES = ("faces",)

COMMON_CHOICES: dict[str, dict[str, object]] = {
    "timestep_selection": {
        "value": "per attack, the largest AUC on the selection split",
        "reason": "the paper's Goldilocks zone t in [50, 300] is model dependent; AUC is the only "
        "stable criterion on a small selection split (TPR at low FPR is too coarse there)",
    },
    "lira_statistic": {
        "value": "log of the loss averaged over noise draws (and flip)",
        "reason": "losses are positive and skewed; the log makes per-sample Gaussians fit",
    },
    "lira_fallback": {
        "value": "a sample without IN (OUT) shadows uses the OUT (IN) mean shifted by the mean gap",
        "reason": "with K random halves about 2^-K of the samples lack one side",
    },
    "tpr_at_fpr_rule": {
        "value": "largest TPR at FPR <= target, no interpolation; below 1/num_nonmembers flagged",
        "reason": "never overstates the attack; the resolution is explicit",
    },
    "training_seeds": {"value": "train seed (preset's for class models, else 0) + 1000 * seed + model index"},
}


@dataclass(frozen=True)
class MiaRequest:
    """One membership-inference audit; ``None`` fields take the defaults recorded in ``choices``."""

    model: str | None = None
    data: str | None = None
    members: str | None = None
    nonmembers: str | None = None
    prompts: str | None = None
    dtype: str = "auto"
    trainer: str = "auto"
    shadow_base: str | None = None
    lora_rank: int = 4
    learning_rate: float = 1e-4
    preset: str = "digits-8"
    steps: int | None = None
    overrides: tuple[str, ...] = ()
    num_shadows: int | None = None
    timesteps: tuple[int, ...] = (10, 25, 50, 100, 200, 300, 500)
    noise_draws: int = 20
    flip: bool | None = None
    pool_size: int | None = None
    selection_fraction: float = 0.3
    fix_variance: bool = True
    seed: int = 0
    batch_size: int = 512
    keep_models: bool | None = None
    wen: bool = True
    wen_seeds: int = 16
    extract_run: str | None = None
    attacks: tuple[str, ...] = ("pia", "pian", "secmi-stat", "secmi-nn", "gsa")
    pia_t: int = 200
    secmi_t: int = 100
    secmi_k: int = 10

    def validate(self) -> None:
        if self.nonmembers is not None and self.members is None:
            raise ConfigError("--nonmembers goes with --members (the model's training images)")
        if self.shadow_base is not None and self.members is None:
            raise ConfigError("--shadow-base goes with --members (shadows of a user's target)")


def resolve_mia(request: MiaRequest, show_progress: bool = True) -> tuple[Any, Any, dict[str, Any], Any]:
    """``(MiaConfig, MiaSetup, resolved config, preset)``: inputs opened, every default choice recorded."""
    from diffaudit.attacks.mia_setup import ShadowTraining, build_setup, load_inputs
    from diffaudit.attacks.shadow import MiaConfig
    from diffaudit.config import resolve_preset

    request.validate()
    cfg = resolve_preset(request.preset, request.data if request.model is None else None, list(request.overrides),
                         request.steps)  # fmt: skip
    choices: dict[str, dict[str, object]] = {}
    num_shadows = request.num_shadows
    if num_shadows is None:
        num_shadows = 0 if request.members is not None else 8
        choices["num_shadows"] = {
            "value": num_shadows,
            "reason": "user target: loss threshold only unless shadows are asked for"
            if request.members is not None
            else "default K=8 (Carlini et al. use 16 on CIFAR-10; CPU budget)",
        }
    flip = request.flip
    if flip is None:
        spec = request.data or request.members or cfg.data.source
        base = spec.split(":", 1)[0]
        flip = base in FLIP_SAFE_SOURCES
        choices["flip"] = {
            "value": flip,
            "reason": f"source {base!r} {'keeps' if flip else 'may not keep'} its meaning under a horizontal flip",
        }
    inputs = load_inputs(cfg, request.model, request.data, request.members, request.nonmembers, request.prompts,
                         request.shadow_base, None, request.dtype)  # fmt: skip
    keep_models = request.keep_models
    if keep_models is None:
        is_pipeline = inputs.model is not None and inputs.model.describe().get("family") == "pipeline"
        keep_models = not is_pipeline
        choices["keep_models"] = {
            "value": keep_models,
            "reason": "a fine-tuned pipeline copy is large; a shard's output is its losses"
            if is_pipeline
            else "small models: kept for inspection",
        }
    mcfg = MiaConfig(
        num_shadows=num_shadows,
        timesteps=tuple(request.timesteps),
        noise_draws=request.noise_draws,
        flip=flip,
        pool_size=request.pool_size,
        selection_fraction=request.selection_fraction,
        fix_variance=request.fix_variance,
        seed=request.seed,
        batch_size=request.batch_size,
        steps=request.steps,
        keep_models=keep_models,
        query_attacks=tuple(request.attacks),
        pia_t=request.pia_t,
        secmi_t=request.secmi_t,
        secmi_k=request.secmi_k,
    )
    setup, made = build_setup(
        mcfg,
        cfg,
        inputs.data,
        inputs.model,
        inputs.members,
        inputs.nonmembers,
        request.trainer,
        inputs.shadow_base,
        ShadowTraining(lora_rank=request.lora_rank, learning_rate=request.learning_rate),
        inputs.wen_conditions,
        show_progress=show_progress,
    )
    resolved = {
        "preset": cfg.to_dict(),
        "mia": {k: list(v) if isinstance(v, tuple) else v for k, v in mcfg.__dict__.items()},
        "choices": choices | made | COMMON_CHOICES,
        "model": request.model,
        "members": request.members,
        "nonmembers": request.nonmembers,
        "setup": setup.describe,
        "wen": {"enabled": request.wen, "num_seeds": request.wen_seeds, "prompts": request.prompts},
        "extract_run": request.extract_run,
        "data_info": inputs.data_info,
    }
    return mcfg, setup, resolved, cfg


def run_mia_audit(
    request: MiaRequest, out: str | os.PathLike[str], resume: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Run the audit into the run directory ``out`` (kind ``mia``); returns ``results.json``'s content."""
    from diffaudit.runs import RunDir

    mcfg, setup, resolved, cfg = resolve_mia(request, show_progress)
    with RunDir(out, kind="mia", resume=resume) as run:
        return audit_run(request, (mcfg, setup, resolved, cfg), run, show_progress)


def audit_run(
    request: MiaRequest,
    resolved_mia: tuple[Any, Any, dict[str, Any], Any],
    run: Any,
    show_progress: bool = True,
    shards_done: tuple[dict[str, bool], float] | None = None,
) -> dict[str, Any]:
    """The audit into the open run ``run`` (config.json, the attacks, Wen's detector); ``resolved_mia`` is
    :func:`resolve_mia`'s answer. A sharded run's merge calls it with the shards' losses installed."""
    from diffaudit.attacks.mia_run import run_mia, run_wen

    mcfg, setup, resolved, cfg = resolved_mia
    run.write_config(resolved)
    results = run_mia(mcfg, setup, run, show_progress=show_progress, shards_done=shards_done)
    if request.wen:
        wen = run_wen(setup, run, request.wen_seeds, cfg.sample.guidance_scale, mcfg.seed, request.extract_run,
                      show_progress=show_progress)  # fmt: skip
        results = results | {"wen": wen}
    return results


@dataclass(frozen=True)
class DatasetInferenceRequest:
    """``--suspect SOURCE --unseen SOURCE --model M``: was the suspect set used to train the model?"""

    model: str
    suspect: str
    unseen: str
    dtype: str = "auto"
    timesteps: tuple[int, ...] = (10, 25, 50, 100, 200, 300, 500)
    noise_draws: int = 20
    alpha: float = 0.01
    permutations: int = 499
    pia_t: int = 200
    secmi_t: int = 100
    secmi_k: int = 10
    seed: int = 0
    batch_size: int = 64


def resolve_dataset_inference(request: DatasetInferenceRequest) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``(config, (generator, suspect, unseen), resolved)`` with the sets opened and the test recorded."""
    from diffaudit.attacks.dataset_inference import DatasetInferenceConfig
    from diffaudit.attacks.mia_setup import load_suspect_sets

    cfg = DatasetInferenceConfig(
        timesteps=tuple(request.timesteps), noise_draws=request.noise_draws, pia_t=request.pia_t,
        secmi_t=request.secmi_t, secmi_k=request.secmi_k, alpha=request.alpha, permutations=request.permutations,
        seed=request.seed, batch_size=min(request.batch_size, 64),
    )  # fmt: skip
    cfg.validate()
    gen, sus, uns, info = load_suspect_sets(request.model, request.suspect, request.unseen, None, request.dtype)
    resolved = {
        "dataset_inference": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "model": request.model,
        "suspect": request.suspect,
        "unseen": request.unseen,
        "data_info": info,
        "choices": {
            "test": {
                "value": "permutation test of the cross-fitted AUC of a ridge combination of per-image signals",
                "reason": "exact under the null (suspect and unseen exchangeable) for any set sizes",
            }
        },
    }
    return cfg, (gen, sus, uns), resolved


def run_dataset_inference_audit(
    request: DatasetInferenceRequest, out: str | os.PathLike[str], resume: bool = False
) -> dict[str, Any]:
    """Run dataset inference into ``out`` (kind ``mia``); returns the ``dataset_inference`` result."""
    from diffaudit.attacks.dataset_inference import run_dataset_inference
    from diffaudit.runs import RunDir

    cfg, (gen, sus, uns), resolved = resolve_dataset_inference(request)
    with RunDir(Path(out), kind="mia", resume=resume) as run:
        run.write_config(resolved)
        return run_dataset_inference(cfg, gen, sus, uns, run)["dataset_inference"]
