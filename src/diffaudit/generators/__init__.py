"""Generators: the one abstraction every audit runs over (see :mod:`.base` for the contract).

``load_generator(PATH)`` recognises the three families from what is on disk:

* a diffusers pipeline directory (``model_index.json``, or ``sd:PATH``) -> :class:`PipelineGenerator`;
* a diffaudit model or run directory (``config.json`` of kind ``diffaudit.DiffusionModel``) ->
  :class:`ClassCondGenerator`;
* an analytic model directory (``config.json`` with ``backend`` gaussian/gmm) -> :class:`AnalyticGenerator`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from diffaudit.errors import CheckpointError
from diffaudit.generators.base import NULL_CONDITION, Generator, Trainer, seeded_noise

__all__ = ["NULL_CONDITION", "Generator", "Trainer", "family_of", "load_generator", "seeded_noise"]

CLASSCOND = "classcond"
PIPELINE = "pipeline"
ANALYTIC = "analytic"


def family_of(path: str | os.PathLike[str]) -> str:
    """Which generator family the directory ``path`` holds (``classcond``, ``pipeline`` or ``analytic``).

    Raises :class:`CheckpointError` naming the path when it is none of them (pickles are refused by the loaders).
    """
    from diffaudit.generators.pipeline_dir import is_pipeline_dir
    from diffaudit.safeload import refuse_pickle_file

    refuse_pickle_file(path, "model")
    if is_pipeline_dir(path):
        return PIPELINE
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such model directory")
    for cand in (p / "config.json", p / "model" / "config.json"):
        if cand.is_file():
            try:
                meta = json.loads(cand.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{cand}: unreadable model config ({exc})") from exc
            if not isinstance(meta, dict):
                raise CheckpointError(f"{cand}: a model config must be a JSON object, not {type(meta).__name__}")
            if meta.get("backend") in ("gaussian", "gmm"):
                return ANALYTIC
            if meta.get("kind") == "diffaudit.DiffusionModel":
                return CLASSCOND
    raise CheckpointError(
        f"{p}: not a model directory: expected a diffaudit model/run directory (model.safetensors + config.json), "
        "an analytic model, or a diffusers pipeline directory (model_index.json)"
    )


def load_generator(
    path: str | os.PathLike[str],
    conditions: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> Generator:
    """Load any generator from a local directory (see the module docstring).

    ``conditions``: the prompts a pipeline samples from (class models and analytic models have theirs fixed
    by training and only accept the same names). ``device``/``dtype`` follow :mod:`diffaudit.device`.
    """
    family = family_of(path)
    if family == PIPELINE:
        from diffaudit.generators.pipeline import PipelineGenerator

        return PipelineGenerator.load(path, conditions or (), device=device, dtype=dtype)
    if family == ANALYTIC:
        from diffaudit.generators.analytic import load_analytic

        p = Path(path)
        gen: Generator = load_analytic(p if (p / "config.json").is_file() else p / "model")
    else:
        from diffaudit.generators.classcond import ClassCondGenerator

        gen = ClassCondGenerator.load(path, device=device)
    if conditions is not None and tuple(conditions) != gen.conditions:
        gen = gen.with_conditions(conditions)
    return gen
