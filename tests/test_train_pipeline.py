"""``diffaudit train --init PIPELINE_DIR``: fine-tuning a user's pipeline (LoRA or full) into a loadable directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffaudit.cli import main
from diffaudit.generators import load_generator
from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline


def _captioned(root, n=4):
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i % 2}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_lora_finetune_writes_a_loadable_pipeline(tmp_path, capsys):
    pipe = save_tiny_pipeline(tmp_path / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    data = _captioned(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--init", str(pipe), "--data", f"captioned:{data}", "--steps", "2", "--out", str(out)]
    code, text = _cli([*args, "--set", "lora_rank=2", "--set", "learning_rate=1e-2"], capsys)
    assert code == 0, text
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "pipeline" and config["trainer"]["lora_rank"] == 2 and config["num_captions"] == 2
    tuned = load_generator(out / "model", conditions=["caption 0"], device="cpu")
    base = load_generator(pipe, conditions=["caption 0"], device="cpu")
    assert json.loads((out / "manifest.json").read_text())["model_id"] == tuned.model_id != base.model_id
    a = tuned.sample(np.array([0]), [3], num_steps=3).images
    b = base.sample(np.array([0]), [3], num_steps=3).images
    assert not np.array_equal(a, b)  # the merged LoRA weights changed what the model makes


def test_pipeline_finetune_refuses_bad_settings(tmp_path, capsys):
    pipe = save_tiny_pipeline(tmp_path / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    data = _captioned(tmp_path / "data")
    base = ["train", "--init", str(pipe), "--data", f"captioned:{data}", "--out", str(tmp_path / "run")]
    code, text = _cli([*base, "--steps", "2", "--set", "train.lr=1"], capsys)
    assert code == 2 and "lora_rank" in text
    code, text = _cli(base, capsys)
    assert code == 2 and "--steps" in text
    code, text = _cli([*base, "--steps", "2", "--set", "learning_rate=-1"], capsys)
    assert code == 2 and "learning_rate" in text
    assert not (tmp_path / "run").exists()
