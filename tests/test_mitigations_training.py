"""Training-time mitigations: dedup as a data option, condition randomisation, DP-SGD (diffaudit.dp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffaudit.config import DataConfig, apply_overrides, get_preset
from diffaudit.data.imageset import ImageSet
from diffaudit.data.loading import load_data
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError
from diffaudit.runs import RunDir
from diffaudit.train import randomize_labels, train

TINY = [
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "train.steps=6",
    "train.batch_size=8",
    "train.checkpoint_every=3",
    "train.log_every=2",
]


@pytest.fixture(scope="module")
def digits_small():
    return load_source("digits", subset=40)


def _ema(path):
    return load_file(str(path / "model" / "ema.safetensors"))


# ---- dedup ---------------------------------------------------------------------------------------------------
def test_dedup_removes_exactly_the_planted_canary_copies():
    plain, _ = load_data(DataConfig(source="digits", subset=60, dedup=0.05))
    assert len(plain) == 60  # no natural near-duplicates among these 60: anything removed below is planted
    planted, info0 = load_data(DataConfig(source="digits", subset=60, canaries=(1, 3, 5)))
    assert len(planted) == 60 + 2 + 4
    data, info = load_data(DataConfig(source="digits", subset=60, canaries=(1, 3, 5), dedup=0.05))
    assert len(data) == 60 and len(set(data.ids.tolist())) == 60
    assert info["dedup"]["num_removed"] == 6 and info["dedup"]["num_groups"] == 2
    assert [r["copies"] for r in info["canaries"]] == [1, 3, 5]  # the planted counts are kept as ground truth
    assert [r["copies_after_dedup"] for r in info["canaries"]] == [1, 1, 1]
    assert [r["id"] for r in info["canaries"]] == [r["id"] for r in info0["canaries"]]


def test_overrides_reach_the_new_fields_and_bad_values_name_them():
    p = apply_overrides(get_preset("digits-8"), ["data.dedup=0.05", "train.cond_random_prob=0.3", "train.dp_epsilon=8"])
    assert (p.data.dedup, p.train.cond_random_prob, p.train.dp_epsilon) == (0.05, 0.3, 8)
    for item, message in [
        ("data.dedup=-1", "data.dedup must be >= 0"),
        ("train.cond_random_prob=1.5", "train.cond_random_prob must be <= 1"),
        ("train.dp_epsilon=0", "train.dp_epsilon must be > 0"),
        ("train.dp_delta=0", "train.dp_delta must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(get_preset("digits-8"), [item])


# ---- condition randomisation ---------------------------------------------------------------------------------
def test_randomize_labels_rate_determinism_and_null():
    labels = torch.from_numpy(np.arange(4000) % 10)
    assert torch.equal(randomize_labels(labels, 10, 0.0, 1, 5), labels)
    out = randomize_labels(labels, 10, 0.5, 1, 5)
    changed = (out != labels).float().mean().item()
    assert abs(changed - 0.45) < 0.03  # replaced w.p. 0.5, by another class w.p. 0.9
    assert torch.equal(out, randomize_labels(labels, 10, 0.5, 1, 5))
    assert not torch.equal(out, randomize_labels(labels, 10, 0.5, 1, 6))
    assert int(out.min()) >= 0 and int(out.max()) <= 9
    null = torch.full((100,), -1)
    assert torch.equal(randomize_labels(null, 10, 1.0, 0, 0), null)


def test_cond_randomised_training_changes_the_model_and_resumes_exactly(tmp_path, digits_small):
    base = apply_overrides(get_preset("digits-8"), TINY)
    rand = apply_overrides(base, ["train.cond_random_prob=0.5"])
    with RunDir(tmp_path / "plain", "train") as run:
        train(base, digits_small, run, show_progress=False)
    with RunDir(tmp_path / "full", "train") as run:
        train(rand, digits_small, run, show_progress=False)

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 4:
            raise Crash

    with pytest.raises(Crash), RunDir(tmp_path / "cut", "train") as run:
        train(rand, digits_small, run, callback=crash, show_progress=False)
    with RunDir(tmp_path / "cut", "train", resume=True) as run:
        train(rand, digits_small, run, show_progress=False)
    plain, full, cut = _ema(tmp_path / "plain"), _ema(tmp_path / "full"), _ema(tmp_path / "cut")
    for key in full:
        torch.testing.assert_close(full[key], cut[key], rtol=0, atol=0)
    assert any(not torch.equal(plain[k], full[k]) for k in full)


def test_pipeline_caption_randomisation(tmp_path):
    from diffaudit.generators import load_generator
    from diffaudit.generators.pipeline_train import PipelineTrainConfig, PipelineTrainer
    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

    pipe = save_tiny_pipeline(tmp_path / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    base = load_generator(pipe, device="cpu")
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8), np.arange(4), ("a", "b", "c", "d"))

    def tuned(**kw):
        cfg = PipelineTrainConfig(learning_rate=1e-2, batch_size=4, cond_drop_prob=0.0, **kw)
        return PipelineTrainer(cfg).fit(data, base, 2, seed=0).unet.state_dict()

    plain, default, rand = tuned(), tuned(cond_random_prob=0.0), tuned(cond_random_prob=1.0)
    assert all(torch.equal(plain[k], default[k]) for k in plain)
    assert any(not torch.equal(plain[k], rand[k]) for k in plain)
    with pytest.raises(ConfigError, match="cond_random_prob must be in"):
        PipelineTrainer(PipelineTrainConfig(cond_random_prob=2.0))


# ---- DP-SGD --------------------------------------------------------------------------------------------------
def test_private_gradients_clip_and_average():
    from diffaudit.dp import private_gradients
    from diffaudit.models.config import ModelConfig
    from diffaudit.models.diffusion import DiffusionModel

    torch.manual_seed(0)
    cfg = ModelConfig(resolution=8, channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    model = DiffusionModel(cfg)
    x, lab = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, -1, 2])
    t, noise = torch.tensor([5, 100, 500, 900]), torch.randn(4, 1, 8, 8)
    model.unet.zero_grad()
    model.per_sample_loss(x, lab, t, noise).mean().backward()
    ref = {k: p.grad.clone() for k, p in model.unet.named_parameters()}
    private_gradients(model, x, lab, t, noise, clip=1e6, noise_multiplier=0.0, noise_gen=torch.Generator())
    for k, p in model.unet.named_parameters():  # nothing clipped, no noise: the ordinary mean gradient
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-4, atol=1e-6)
    _, clipped = private_gradients(model, x, lab, t, noise, 1e-3, 0.0, torch.Generator())
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.unet.parameters()))
    assert clipped == 1.0 and float(total) <= 1e-3 * (1 + 1e-4)


def test_dp_training_records_epsilon(tmp_path, digits_small):
    pytest.importorskip("opacus")
    preset = apply_overrides(get_preset("digits-8"), [*TINY, "train.dp_epsilon=10", "train.dp_delta=1e-3"])
    with RunDir(tmp_path / "dp", "train") as run:
        train(preset, digits_small, run, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"] for r in rows]
    assert [r["step"] for r in rows] == [2, 4, 6] and eps == sorted(eps) and eps[0] < eps[-1]
    assert 9.0 <= eps[-1] <= 10.0  # the noise multiplier was chosen to spend the target over the whole run
    dp = json.loads((tmp_path / "dp" / "manifest.json").read_text())["dp"]
    assert dp["epsilon_spent"] == pytest.approx(eps[-1]) and dp["noise_multiplier"] > 0 and dp["sample_rate"] == 0.2
    bad = apply_overrides(preset, ["train.dp_delta=0.1"])
    with pytest.raises(ConfigError, match="below 1/N"), RunDir(tmp_path / "bad", "train") as run:
        train(bad, digits_small, run, show_progress=False)


def test_train_cli_dedups_planted_canaries(tmp_path, capsys):
    from diffaudit.cli import main

    args = ["train", "--preset", "digits-8", "--steps", "2", "--out", str(tmp_path / "run")]
    args += ["--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=4"]
    args += ["--set", "train.batch_size=8", "--set", "data.subset=50", "--set", "data.canaries=[1,3]"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--set", "data.dedup=0.05"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["dedup"] == 0.05
    assert config["data_info"]["dedup"]["num_removed"] == 2 and config["data_info"]["dedup"]["num_kept"] == 50
    canaries = json.loads((tmp_path / "run" / "manifest.json").read_text())["canaries"]
    assert [(r["copies"], r["copies_after_dedup"]) for r in canaries] == [(1, 1), (3, 1)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--set", "data.dedup=-0.1"])
    assert exc.value.code == 2 and "data.dedup must be >= 0" in capsys.readouterr().err
