"""What each generation samples: seeds, labels, extra samples for later mixes, and the real data.

Everything here is a pure function of the config, the real set and ``(seed, generation)``, so a resumed run
makes exactly the requests an uninterrupted one does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.loop.config import MIX_IMG2IMG, PIPELINE, LoopConfig

#: Offset (inside a generation's seed range) of the image-to-image re-renderings' seeds.
IMG2IMG_SEED_START = 500_000
#: Offset of the self-correction re-renderings' seeds (generation 0's model re-rendering synthetic images).
SELF_CORRECT_SEED_START = 700_000
#: Generation index of the drift seeds (fixed for all generations, so images are comparable across them).
DRIFT_GENERATION = 999


def seeds_for(seed: int, generation: int, n: int, offset: int = 0) -> range:
    """``n`` sampling seeds of ``generation``: arms share them (common random numbers lower arm-to-arm noise)."""
    start = (int(seed) * 1_000 + int(generation)) * 1_000_000 + offset
    return range(start, start + n)


def retrained_classes(cfg: LoopConfig, real: ImageSet) -> np.ndarray | None:
    """Labels that receive synthetic images (all but the held-out ones); None for unlabelled data."""
    if not real.is_labelled:
        return None
    held = set(heldout_conditions(cfg, real))
    classes = np.asarray([c for c in range(real.num_classes) if c not in held], dtype=np.int64)
    if classes.size == 0:
        raise ConfigError(f"holdout_classes={list(cfg.holdout_classes)} leave no class to retrain")
    return classes


def eval_labels(real: ImageSet, n: int) -> np.ndarray:
    """``int64 (n,)`` evaluation labels cycling over every class (-1 for unlabelled data)."""
    if not real.is_labelled:
        return np.full(n, -1, dtype=np.int64)
    return (np.arange(n) % real.num_classes).astype(np.int64)


def extra_samples(cfg: LoopConfig, real: ImageSet, num_samples: int, generation: int) -> int:
    """Samples that model ``generation`` makes beyond the evaluation set, for later mixes of this arm.

    The evaluation set (``num_samples`` images, labels cycling over every class, the same seeds in every arm)
    is what the metrics see. Only retrained classes are eligible for mixing, so an arm that mixes ``n_syn``
    synthetic images into the next generation may need more retrained-class samples than the evaluation set
    holds; those extra images (labels cycling over the retrained classes only) are made only by generations
    whose samples a later poisoning generation uses (``generation < poison_generations``). Image-to-image
    mixing renders its synthetic images when they are needed, so it needs no extra samples.
    """
    if generation >= cfg.poison_generations or cfg.mix_source == MIX_IMG2IMG:
        return 0
    n_syn = cfg.mix_spec().num_synthetic
    if n_syn == 0:
        return 0
    retrained = retrained_classes(cfg, real)
    labels = eval_labels(real, num_samples)
    in_eval = num_samples if retrained is None else int(np.isin(labels, retrained).sum())
    return max(0, n_syn - in_eval)


def sample_labels(cfg: LoopConfig, real: ImageSet, num_samples: int, num_extra: int) -> np.ndarray:
    """Evaluation labels (cycling over all classes) followed by ``num_extra`` retrained-class labels."""
    labels = eval_labels(real, num_samples)
    if num_extra == 0:
        return labels
    retrained = retrained_classes(cfg, real)
    extra = np.full(num_extra, -1, np.int64) if retrained is None else retrained[np.arange(num_extra) % retrained.size]
    return np.concatenate([labels, extra])


def drift_requests(cfg: LoopConfig, real: ImageSet, seed: int) -> tuple[np.ndarray, range]:
    """Labels and seeds of the drift images: ``drift_samples`` per condition, the same in every generation."""
    k = real.num_classes if real.is_labelled else 1
    labels = np.repeat(
        np.arange(k, dtype=np.int64) if real.is_labelled else np.full(1, -1, np.int64), cfg.drift_samples
    )
    return labels, seeds_for(seed, DRIFT_GENERATION, len(labels))


# ---- data ---------------------------------------------------------------------------------------------------
def diffusion_preset(cfg: LoopConfig):
    """The diffusion preset of ``cfg`` with its overrides (and ``data`` replacing the data source when set)."""
    from diffaudit.config import apply_overrides, get_preset

    overrides = list(cfg.overrides) + ([f"data.source={cfg.data}"] if cfg.data else [])
    return apply_overrides(get_preset(cfg.diffusion_preset), overrides)


def load_real(cfg: LoopConfig) -> tuple[ImageSet, dict[str, Any]]:
    """The real image pool.

    Class models: the diffusion preset's data section (with ``data.*`` overrides). Pipelines: ``cfg.data``
    resized to the pipeline's resolution, with the extra prompts of ``cfg.prompts`` appended to the captions
    as conditions without images (held out: :func:`heldout_conditions`).
    """
    from diffaudit.data.loading import load_data

    if cfg.backend != PIPELINE:
        return load_data(diffusion_preset(cfg).data)
    from diffaudit.config import DataConfig

    side = pipeline_resolution(cfg.model)
    real, info = load_data(DataConfig(source=cfg.data, resolution=side, channels=3))
    if not real.is_labelled:
        raise ConfigError(f"{cfg.data}: a pipeline loop needs captions (captioned:DIR with metadata.jsonl or .txt)")
    extra = [p for p in read_extra_prompts(cfg.prompts) if p not in real.class_names]
    if extra:
        names = tuple(real.class_names) + tuple(extra)
        real = ImageSet(real.images, real.labels, names, dict(real.provenance), ids=real.ids)
    info = dict(info) | {"extra_prompts": extra, "resolution": side}
    return real, info


def read_extra_prompts(path: str) -> list[str]:
    """Prompts of ``path`` (one a line or JSONL), or none when ``path`` is empty."""
    if not path:
        return []
    from pathlib import Path

    from diffaudit.data.prompts import read_prompts

    return [e.prompt for e in read_prompts(Path(path))]


def heldout_conditions(cfg: LoopConfig, real: ImageSet) -> tuple[int, ...]:
    """Held-out labels: ``cfg.holdout_classes`` plus every condition without a real image (extra prompts)."""
    present = set(np.unique(real.labels).tolist()) if real.is_labelled else set()
    missing = [c for c in range(real.num_classes) if c not in present] if real.is_labelled else []
    return tuple(sorted(set(int(c) for c in cfg.holdout_classes) | set(missing)))


def pipeline_resolution(model: str) -> int:
    """Image side of the pipeline directory ``model`` (U-Net sample size x VAE downsampling), read from JSON."""
    import json
    from pathlib import Path

    from diffaudit.errors import CheckpointError
    from diffaudit.generators.pipeline_dir import check_pipeline_dir

    root = Path(str(model).removeprefix("sd:"))
    check_pipeline_dir(root)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{root}: cannot read the U-Net/VAE config ({exc})") from exc
