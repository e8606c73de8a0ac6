"""Opening what an extraction audit needs: the generator with its conditions, and the training set to match.

Any ``--model`` (class model or train run, analytic model, diffusers pipeline directory) opens through
:mod:`diffaudit.generators`. The training set is loaded at the generator's image shape (channels and side: a
pipeline's RGB resolution), from ``data`` or, for a model inside a diffaudit train run, from that run's own data
config with its canaries re-planted (so duplicates and canary ids are the model's). A text-to-image pipeline
takes its conditions from a prompts file or, failing that, from the unique captions of a ``captioned:`` source.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffaudit.config import DataConfig
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError, DataError
from diffaudit.generators.base import Generator

if TYPE_CHECKING:
    from diffaudit.attacks.extraction_run import ExtractConfig

CAPTIONED = "captioned:"


@dataclass
class TrainingData:
    """An opened audit: generator (conditions set), training set at its image shape, canaries, seeds."""

    generator: Generator
    train: ImageSet
    model_path: str
    canaries: list[dict[str, object]] | None = None
    first_seeds: dict[int, int] = field(default_factory=dict)
    display_names: tuple[str, ...] = ()

    def label_name(self, label: int) -> str:
        """The name of condition ``label`` as reports show it ("(none)" for the null condition)."""
        if label < 0:
            return "(none)"
        names = self.display_names or self.generator.conditions
        return str(names[label])


def _model_path(model: str) -> Path:
    return Path(model[3:] if model.startswith("sd:") else model)


def _train_run(model: Path) -> Path | None:
    """The diffaudit train run holding ``model`` (RUN, RUN/model or RUN/checkpoints/step-N/model), if any."""
    for cand in (model, *list(model.parents)[:3]):
        manifest, config = cand / "manifest.json", cand / "config.json"
        if manifest.is_file() and config.is_file():
            try:
                kind = json.loads(manifest.read_text()).get("kind")
                data = json.loads(config.read_text()).get("data")
            except (OSError, ValueError, AttributeError):
                continue
            if kind == "train" and isinstance(data, dict):
                return cand
    return None


def _data_config(source: str | None, run: Path | None, shape: tuple[int, int, int]) -> DataConfig:
    run_data: dict[str, Any] = {}
    if run is not None:
        run_data = json.loads((run / "config.json").read_text()).get("data") or {}
    if source is None:
        if not run_data:
            raise ConfigError(
                "--data is required: the model is not inside a diffaudit train run, so its training set is unknown"
            )
        names = {f.name for f in dataclasses.fields(DataConfig)}
        return DataConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in run_data.items() if k in names})
    return DataConfig(
        source=source,
        resolution=int(shape[1]),
        channels=int(shape[0]),
        canaries=tuple(run_data.get("canaries") or ()),
        canaries_per_count=int(run_data.get("canaries_per_count", 1)),
        seed=int(run_data.get("seed", 0)),
    )


def open_audit(config: ExtractConfig) -> TrainingData:
    """Open ``config.model`` with its conditions and load the training set at its image shape.

    Raises ConfigError (a pipeline with neither prompts nor a captioned data source; no training data known),
    CheckpointError (not a model directory) or DataError (training images of another shape than generations).
    """
    from diffaudit.config import validate_data
    from diffaudit.data.loading import load_data
    from diffaudit.generators import PIPELINE, family_of, load_generator
    from diffaudit.generators.select import open_generator

    assert config.model is not None
    model = str(config.model)
    captioned = (config.data or "").startswith(CAPTIONED)
    # A pipeline whose prompts come from the captions is opened without conditions, then given the captions
    # once the data is loaded at its resolution (the captions are only known after reading the folder).
    from_captions = config.prompts is None and captioned and family_of(model) == PIPELINE
    if from_captions:
        gen = load_generator(model, conditions=None, device=config.device, dtype=config.dtype)
        first_seeds: dict[int, int] = {}
    else:
        gen, first_seeds = open_generator(model, config.prompts, None, config.device, config.dtype)
    path = _model_path(model)
    data_cfg = validate_data(_data_config(config.data, _train_run(path), gen.image_shape), where="data")
    train, info = load_data(data_cfg)
    if train.images.shape[1:] != tuple(gen.image_shape):
        raise DataError(
            f"{data_cfg.source}: training images have shape {tuple(train.images.shape[1:])} but the model generates "
            f"{tuple(gen.image_shape)}; load the training data at the model's resolution and channels"
        )
    if from_captions:
        gen = gen.with_conditions(train.class_names)
    display: tuple[str, ...] = ()
    indices = tuple(str(i) for i in range(len(gen.conditions)))
    if gen.conditions and gen.conditions == indices and len(train.class_names) == len(indices):
        display = tuple(train.class_names)  # checkpoints saved without class names: the data has them
    canaries = info.get("canaries")
    resolved = str(gen.describe().get("path") or path)  # e.g. RUN/model for a train run, as config.json had it
    return TrainingData(gen, train, resolved, canaries if canaries else None, first_seeds, display)  # type: ignore[arg-type]


def train_with_canaries(train_dir: Path, config: ExtractConfig) -> Path:
    """Train a class model on ``config.preset``'s data with planted canaries into ``train_dir`` (a train run).

    Reused when its model already exists (a resumed extraction). Returns the train run directory.
    """
    from diffaudit.config import apply_overrides, get_preset
    from diffaudit.data.loading import load_data
    from diffaudit.models.checkpoint import WEIGHTS_FILE
    from diffaudit.runs import RunDir
    from diffaudit.train import train as train_model

    extra = [f"data.canaries={list(config.canaries)}"]
    if config.steps is not None:
        extra.append(f"train.steps={config.steps}")
    cfg = apply_overrides(get_preset(config.preset), extra + list(config.overrides))
    if (train_dir / "model" / WEIGHTS_FILE).exists():
        return train_dir
    images, info = load_data(cfg.data)
    if not info.get("canaries"):
        raise DataError(f"preset {config.preset!r}: no canaries were planted")
    with RunDir(train_dir, kind="train", resume=train_dir.exists()) as trun:
        trun.write_config(cfg.to_dict() | {"init": None, "data_info": info})
        trun.update_manifest(canaries=info["canaries"])
        train_model(cfg, images, trun, show_progress=config.show_progress, device=config.device)
    return train_dir
