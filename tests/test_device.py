"""Device selection for diffaudit's own models: names, errors, and (where a GPU exists) CPU/GPU agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.config import apply_overrides, get_preset
from diffaudit.data.sources import load_source
from diffaudit.device import ENV_VAR, resolve_device
from diffaudit.errors import ConfigError
from diffaudit.generators.classcond import ClassCondGenerator
from diffaudit.models.checkpoint import load_model
from diffaudit.runs import RunDir
from diffaudit.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def test_names_and_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")  # argument wins


def test_bad_names_are_clear_errors():
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_cli_rejects_a_bad_device_before_running():
    res = CliRunner().invoke(app, ["--device", "gpu-please", "data", "--help"])
    assert res.exit_code != 0
    assert "not a torch device" in str(res.exception) + res.output


def _tiny(tmp_path, device: str) -> tuple[str, torch.nn.Module]:
    preset = apply_overrides(
        get_preset("digits-8"),
        ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "train.steps=20", "train.batch_size=16"],
    )
    data = load_source("digits", subset=64)
    with RunDir(tmp_path / device, "train") as run:
        train(preset, data, run, show_progress=False, device=device)
    return str(run.file("model"))


def test_cpu_training_and_sampling_land_on_cpu(tmp_path):
    model_dir = _tiny(tmp_path, "cpu")
    net, meta = load_model(model_dir, device="cpu")
    assert net.device == torch.device("cpu")
    gen = ClassCondGenerator.load(model_dir, device="cpu")
    out = gen.sample(np.zeros(4, np.int64), range(4), num_steps=3)
    assert out.images.shape == (4, 1, 8, 8) and gen.device == torch.device("cpu")


@needs_cuda
def test_gpu_matches_cpu_within_float_error(tmp_path):
    """The same seeds train and sample to nearly the same model and images on CPU and GPU."""
    cpu_dir, gpu_dir = _tiny(tmp_path, "cpu"), _tiny(tmp_path, "cuda")
    cpu_net, _ = load_model(cpu_dir, device="cpu")
    gpu_net, meta = load_model(gpu_dir, device="cuda")
    assert gpu_net.device.type == "cuda"
    for (name, a), (_, b) in zip(cpu_net.unet.state_dict().items(), gpu_net.unet.state_dict().items(), strict=True):
        assert torch.allclose(a, b.cpu(), atol=2e-3, rtol=1e-2), name
    labels = np.arange(8) % 10
    a = ClassCondGenerator(cpu_net.cpu(), "x", []).sample(labels, range(8), sampler="ddpm", num_steps=10)
    b = ClassCondGenerator(gpu_net.cuda(), "x", []).sample(labels, range(8), sampler="ddpm", num_steps=10)
    a, b = a.images.astype(int), b.images.astype(int)
    assert np.abs(a - b).mean() < 3.0  # uint8 levels; kernels differ in the last bits, seeds do not
