"""The bohacek-farid protocol pieces and the mitigation settings: pre-training, no data for held-out classes,
budget, ReDiFine's trainer and guidance schedule, self-correction, accumulate with img2img."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.generators.denoising import guidance_scales
from diffaudit.loop.config import LoopConfig, replace_config
from diffaudit.loop.experiment import Experiment, run_experiment
from diffaudit.loop.presets import build_experiment

K = 4


def _real(n: int = 160) -> ImageSet:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % K
    images = (rng.integers(0, 60, size=(n, 1, 4, 4)) + 40 * labels[:, None, None, None]).astype(np.uint8)
    return ImageSet(images, labels, tuple("abcd"), {"source": "toy"})


def test_guidance_schedule_keeps_the_mean_and_starts_unguided():
    assert guidance_scales(7.5, 3) == [7.5, 7.5, 7.5]
    lin = guidance_scales(7.5, 5, "linear")
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(14.0) and np.mean(lin) == pytest.approx(7.5)
    assert np.all(np.diff(lin) > 0)
    with pytest.raises(ConfigError, match="guidance schedule"):
        guidance_scales(2.0, 5, "cosine")


def test_bohacek_farid_preset_records_the_papers_protocol():
    exp = build_experiment("bohacek-farid")
    cfg = exp.first
    assert list(exp.arms) == ["share-0", "share-3.3", "share-10", "share-25", "share-50", "share-100"]
    assert (cfg.guidance_scale, cfg.strength, cfg.mix_source) == (7.5, 0.8, "img2img")
    assert cfg.finetune_steps == 60 == round(0.1 * cfg.pretrain_steps)  # budget: 10% of the pre-training
    assert cfg.holdout_classes == (7, 8, 9) and cfg.heldout_finetune is False
    assert round(exp.arms["share-3.3"].synthetic_share * 900) == 30
    two = build_experiment("bohacek-farid", arms=["share-100"], with_control=True)
    assert list(two.arms) == ["control", "share-100"] and two.arms["control"].synthetic_share == 0.0
    custom = build_experiment(
        "nepotism-digits", arm_override={"synthetic_share": None, "synthetic_count": 30}, with_control=True
    )
    assert custom.arms["control"].synthetic_count is None and custom.arms["custom"].synthetic_count == 30
    with pytest.raises(ConfigError, match="no arm"):
        build_experiment("bohacek-farid", arms=["share-7"])


def test_redifine_settings_reach_the_fine_tuning_trainer_only():
    from diffaudit.loop.mitigations import REDIFINE, apply, not_applicable
    from diffaudit.loop.models import make_models

    cfg = apply(REDIFINE, build_experiment("bohacek-farid", quick=True).first)
    models = make_models(cfg)
    assert models.finetune_trainer.preset.train.cond_drop_prob == 0.3
    assert models.trainer.preset.train.cond_drop_prob == 0.1  # generation 0 keeps the preset's dropout
    assert models.options["guidance_schedule"] == "linear"
    assert not_applicable(REDIFINE, replace_config(cfg, backend="gmm", guidance_schedule="constant"))


def test_tiny_bohacek_farid_run_pretrains_and_gives_heldout_classes_no_data(tmp_path):
    exp = build_experiment(
        "bohacek-farid",
        quick=True,
        arms=["share-0", "share-25"],
        settings={
            "train_size": 40,
            "num_samples": 20,
            "pretrain_steps": 2,
            "base_steps": 1,
            "finetune_budget": 1.0,
            "poison_generations": 1,
            "heal_generations": 1,
            "sample_steps": 2,
            "features": "pixels",
        },
    )
    run_experiment(exp, tmp_path / "r", show_progress=False, plots=False)
    rows = {(r["arm"], r["generation"]): r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open())}
    assert rows[("share-0", 0)]["pretrain_images"] == 1797 - 40 and rows[("share-25", 1)]["train_steps"] == 2
    assert rows[("share-25", 1)]["train_synthetic"] == 10
    root = tmp_path / "r" / "repeat-0"
    gen0 = ImageSet.load(root / "gen-000" / "train-set.npz")
    pre_model = json.loads((root / "gen-000" / "pretrain" / "model" / "config.json").read_text())
    assert (
        json.loads((root / "gen-000" / "model" / "config.json").read_text())["init_model_id"] == pre_model["model_id"]
    )
    for path in [root / "gen-000"] + [root / a / f"gen-{g:03d}" for a in exp.arms for g in (1, 2)]:
        train = ImageSet.load(path / "train-set.npz")
        assert not np.isin(train.labels, [7, 8, 9]).any(), path  # held-out classes: no fine-tuning data
    assert len(gen0) == 40
    # The held-out classes are still sampled and scored (their drift is what the paper reports).
    assert "heldout/fid" in rows[("share-25", 1)] or rows[("share-25", 1)]["samples_evaluated"] == 20


def test_accumulate_img2img_and_self_correction(tmp_path):
    base = LoopConfig(
        backend="gaussian",
        train_size=40,
        synthetic_share=0.25,
        poison_generations=2,
        heal_generations=0,
        num_samples=24,
        features="none",
        mix_source="img2img",
        strength=0.8,
    )
    arms = {"acc": replace_config(base, mode="accumulate"), "sc": replace_config(base, self_correct_strength=0.3)}
    run_experiment(Experiment(arms), tmp_path / "r", real=_real(), show_progress=False, plots=False)
    rows = {(r["arm"], r["generation"]): r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open())}
    assert [rows[("acc", g)]["train_images"] for g in range(3)] == [40, 50, 60]  # every real image kept
    t1, t2 = (ImageSet.load(tmp_path / "r" / "repeat-0" / "acc" / f"gen-{g:03d}" / "train-set.npz") for g in (1, 2))
    assert set(t1.ids[t1.provenance["synthetic"]]) < set(t2.ids[t2.provenance["synthetic"]])
    info = json.loads((tmp_path / "r" / "repeat-0" / "sc" / "gen-001" / "train-set-img2img.json").read_text())
    assert info["corrected_by"] == {"model_id": rows[("sc", 0)]["model_id"], "strength": 0.3}
    assert rows[("sc", 1)]["train_synthetic"] == 10 and len(info["pairs"]) == 10
