import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffaudit.config import PRESETS, apply_overrides, get_preset
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError
from diffaudit.runs import RunDir
from diffaudit.train import batch_indices, train

TINY_OVERRIDES = [
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "train.steps=6",
    "train.batch_size=8",
    "train.checkpoint_every=3",
    "train.log_every=2",
]


@pytest.fixture(scope="module")
def tiny_preset():
    return apply_overrides(get_preset("digits-8"), TINY_OVERRIDES)


@pytest.fixture(scope="module")
def digits_small():
    return load_source("digits", subset=40)


def _weights(run_path):
    return load_file(str(run_path / "model" / "ema.safetensors"))


def test_batch_indices_cover_each_epoch():
    seen = np.concatenate([batch_indices(10, 3, s, seed=1) for s in range(10)])  # 30 = 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))


def test_resume_equals_uninterrupted(tmp_path, tiny_preset, digits_small):
    with RunDir(tmp_path / "full", "train") as run:
        train(tiny_preset, digits_small, run, show_progress=False)

    class Crash(Exception):
        pass

    def crash_after_4(step, loss):
        if step == 4:  # one step after the checkpoint at 3: that step's work is lost and redone
            raise Crash

    with pytest.raises(Crash), RunDir(tmp_path / "cut", "train") as run:
        train(tiny_preset, digits_small, run, callback=crash_after_4, show_progress=False)
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["status"] == "failed"
    with RunDir(tmp_path / "cut", "train", resume=True) as run:
        train(tiny_preset, digits_small, run, show_progress=False)

    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0)
    steps = [r["step"] for r in RunDir(tmp_path / "cut", "train").rows()]
    assert steps[-1] == 6


def test_run_dir_refuses_overwrite_and_concurrent_writers(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "something").write_text("keep me")
    with pytest.raises(ConfigError, match="--resume"):
        RunDir(tmp_path / "r", "train").__enter__()
    with RunDir(tmp_path / "s", "train"), pytest.raises(ConfigError, match="another"):
        RunDir(tmp_path / "s", "train", resume=True).__enter__()


def test_resume_with_changed_config_refused(tmp_path):
    with RunDir(tmp_path / "r", "train") as run:
        run.write_config({"a": 1})
    with (
        pytest.raises(ConfigError, match="different configuration"),
        RunDir(tmp_path / "r", "train", resume=True) as run,
    ):
        run.write_config({"a": 2})


def test_fine_tune_from_init(tmp_path, tiny_preset, digits_small):
    with RunDir(tmp_path / "base", "train") as run:
        base_id = train(tiny_preset, digits_small, run, show_progress=False)
    short = dataclasses.replace(tiny_preset, train=dataclasses.replace(tiny_preset.train, steps=2))
    with RunDir(tmp_path / "ft", "train") as run:
        ft_id = train(short, digits_small, run, init=tmp_path / "base" / "model", show_progress=False)
    meta = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert meta["init_model_id"] == base_id and ft_id != base_id


def test_incompatible_data_rejected(tmp_path, tiny_preset):
    faces = load_source("faces")
    with pytest.raises(ConfigError, match="expects"), RunDir(tmp_path / "r", "train") as run:
        train(tiny_preset, faces, run, show_progress=False)


def test_overrides():
    p = apply_overrides(PRESETS["digits-8"], ["train.lr=0.5", "sample.sampler=ddpm", "data.canaries=[1,2]"])
    assert p.train.lr == 0.5 and p.sample.sampler == "ddpm" and p.data.canaries == (1, 2)
    with pytest.raises(ConfigError, match="no field"):
        apply_overrides(PRESETS["digits-8"], ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides(PRESETS["digits-8"], ["foo.x=1"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(PRESETS["digits-8"], ["train.steps=abc"])


def test_overrides_validated_together():
    p = apply_overrides(
        PRESETS["digits-8"], ["model.block_out_channels=[8,16,32]", "model.attention_levels=[false,false,true]"]
    )
    assert p.model.block_out_channels == (8, 16, 32) and p.model.attention_levels == (False, False, True)
    with pytest.raises(ConfigError, match="attention_levels"):
        apply_overrides(PRESETS["digits-8"], ["model.block_out_channels=[8,16,32]"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_its_model(name):
    from diffaudit.models.diffusion import DiffusionModel

    preset = PRESETS[name]
    model = DiffusionModel(preset.model)
    x = torch.zeros(1, preset.model.channels, preset.model.resolution, preset.model.resolution)
    with torch.no_grad():
        out = model.predict_noise(x, torch.tensor([10]), torch.tensor([0]))
    assert out.shape == x.shape
