"""Data-parallel training: ``torchrun --nproc_per_node 2 -m diffaudit train`` equals one process.

Tolerance: weights after 10 AdamW steps within 1e-4 (float summation order differs: each rank sums its slice,
then the ranks' gradients are summed). The two-rank run is killed at step 7 (SIGKILL on every rank) and resumed
from its step-5 checkpoint, so one test covers resume too. The global batch of 9 splits 4 + 5 over the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.scale.ddp import DistContext, global_batch_loss

runner = CliRunner()
TINY = ["--steps", "10", "--grid-images", "0",
        "--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=4", "--set", "data.subset=40",
        "--set", "train.batch_size=9", "--set", "train.checkpoint_every=5", "--set", "train.log_every=5"]  # fmt: skip
TOL = 1e-4


def _tiny_model():
    from diffaudit.config import ModelConfig
    from diffaudit.models.diffusion import DiffusionModel

    torch.manual_seed(0)
    cfg = ModelConfig(resolution=8, channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    return DiffusionModel(cfg)


def test_rank_slices_sum_to_the_one_process_loss():
    model = _tiny_model()
    x0 = torch.rand(7, 1, 8, 8) * 2 - 1
    labels = torch.arange(7) % 3
    expected = model.loss(x0, labels, torch.Generator().manual_seed(3), 0.5)
    alone, _ = global_batch_loss(model, x0, labels, torch.Generator().manual_seed(3), 0.5, DistContext(0, 1, 0))
    torch.testing.assert_close(alone, expected, rtol=1e-6, atol=0)
    parts = [
        global_batch_loss(model, x0, labels, torch.Generator().manual_seed(3), 0.5, DistContext(r, 2, r))
        for r in (0, 1)
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], expected, rtol=1e-6, atol=0)
    assert DistContext(0, 2, 0).slice(9) == slice(0, 4) and DistContext(1, 2, 1).slice(9) == slice(4, 9)


def _torchrun(out: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "diffaudit", "train", "--out", str(out), *TINY]
    return subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_ranks_equal_one_process_and_resume(tmp_path):
    single = tmp_path / "single"
    result = runner.invoke(app, ["train", "--out", str(single), *TINY])
    assert result.exit_code == 0, result.output

    env = os.environ | {"OMP_NUM_THREADS": "1", "DIFFAUDIT_DEVICE": "cpu", "DIFFAUDIT_TEST_CRASH_AT": "train:step-7"}
    ddp = tmp_path / "ddp"
    killed = _torchrun(ddp, env=env)
    assert killed.returncode != 0
    assert sorted(p.name for p in (ddp / "checkpoints").glob("step-*")) == ["step-0000005"]
    env.pop("DIFFAUDIT_TEST_CRASH_AT")
    resumed = _torchrun(ddp, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(ddp / "model" / name)), load_file(str(single / "model" / name))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < TOL, (name, worst)
    # one writer: one manifest, one metrics row per logged step, the checkpoints one process would keep
    manifest = json.loads((ddp / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["data_parallel"]["world_size"] == 2
    assert manifest["resumed"] == 1
    rows = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [5, 10]
    for r, s in zip(rows, ref, strict=True):
        assert abs(r["loss"] - s["loss"]) < 1e-4
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["latest.json", "step-0000005", "step-0000010"]
