"""The loop over a user's text-to-image pipeline (tiny random-weight pipeline, tiny captioned folder), via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet

CAPTIONS = ("a red square", "a blue circle", "a green line")
HELDOUT_PROMPT = "a yellow star"
#: Row keys a class-model loop writes that a pipeline loop must write too.
CLASS_LOOP_KEYS = {
    "arm", "repeat", "generation", "phase", "model_id", "sample_seeds", "samples_evaluated", "samples_extra",
    "train_images", "train_synthetic", "train_synthetic_share", "train_synthetic_by_generation",
    "train_synthetic_heldout", "all/fid", "all/kid_mean", "all/precision", "all/recall", "all/density",
    "all/coverage", "all/vendi",
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

    root = tmp_path_factory.mktemp("loop-pipe")
    pipe = save_tiny_pipeline(root / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    data = root / "captioned"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": CAPTIONS[i % 3]}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    prompts = root / "prompts.txt"
    prompts.write_text(HELDOUT_PROMPT + "\n")
    return pipe, data, prompts


def _args(pipe: Path, data: Path, prompts: Path, out: Path) -> list[str]:
    sets = ["steps_per_generation=2", "sample_steps=2", "num_samples=12", "drift_samples=1", "batch_size=2"]
    return [
        "loop", "--model", str(pipe), "--data", f"captioned:{data}", "--prompts", str(prompts), "--out", str(out),
        "--poison-generations", "1", "--heal-generations", "1", "--synthetic-share", "0.25", "--strength", "0.6",
        *[a for s in sets for a in ("--set", s)],
    ]  # fmt: skip


def test_cli_pipeline_loop_end_to_end(setup, tmp_path):
    from diffaudit.generators import load_generator
    from diffaudit.loop.config import LoopConfig
    from diffaudit.loop.plan import load_real

    pipe, data, prompts = setup
    out = tmp_path / "run"
    res = CliRunner().invoke(app, _args(pipe, data, prompts, out))
    assert res.exit_code == 0, res.output
    for name in ("manifest.json", "config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["base", "poison", "heal"]
    for row in rows:
        assert set(row) >= CLASS_LOOP_KEYS, CLASS_LOOP_KEYS - set(row)
    # Generation 0 is the user's pipeline as given (not trained, referenced not copied); later ones fine-tune.
    given = load_generator(pipe, CAPTIONS, device="cpu").model_id
    g0 = out / "repeat-0" / "gen-000"
    assert rows[0]["model_id"] == given and json.loads((g0 / "model-ref.json").read_text())["trained"] is False
    assert not (g0 / "model").exists()
    assert len({r["model_id"] for r in rows}) == 3
    g1 = out / "repeat-0" / "custom" / "gen-001"
    assert (g1 / "model" / "model_index.json").exists() and (g1 / "grid.png").exists()
    # Exact share: 25% of the 12 real images are re-rendered by generation 0, each linked to its real image.
    assert [r["train_synthetic"] for r in rows] == [0, 3, 0] and rows[1]["train_synthetic_share"] == 0.25
    train = ImageSet.load(g1 / "train-set.npz")
    info = json.loads((g1 / "train-set-img2img.json").read_text())
    assert info["made_by"] == given and info["strength"] == 0.6 and len(info["pairs"]) == 3
    syn = train.provenance["synthetic"]
    assert sorted(p["id"] for p in info["pairs"]) == sorted(train.ids[syn].tolist())
    assert (train.provenance["model_id"][syn] == given).all()
    real, _ = load_real(LoopConfig(backend="pipeline", model=str(pipe), data=f"captioned:{data}"))
    real_ids = set(real.ids.tolist())
    assert all(p["init_id"] in real_ids for p in info["pairs"]) and not set(train.ids[syn]) & real_ids
    # The extra prompt has no fine-tuning data: held out, measured by drift from generation 0's images.
    config = json.loads((out / "config.json").read_text())
    assert config["conditions"] == [*CAPTIONS, HELDOUT_PROMPT] and config["heldout_conditions"] == [3]
    assert config["backend"]["trainer"]["lora_rank"] == 0 and config["backend"]["trainer"]["learning_rate"] == 1e-5
    assert rows[0]["heldout/drift_l2"] == 0.0 and rows[1]["retrained/drift_l2"] > 0
    assert rows[1]["heldout/drift_l2"] > 0  # fine-tuning changed what never-retrained prompts produce
    samples = ImageSet.load(g1 / "samples.npz")
    assert samples.labels.tolist() == [i % 4 for i in range(12)] and samples.shape == (3, 16, 16)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["features"]["name"] == "random-cnn"
    assert "all/fid" in summary["arms"]["custom"]["healing"]


def _fails(args: list[str], capsys) -> str:
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_pipeline_loop_errors_before_the_run_directory(setup, tmp_path, capsys):
    pipe, data, prompts = setup
    out = tmp_path / "run"
    assert "--data" in _fails(["loop", "--model", str(pipe), "--out", str(out)], capsys)
    bad = ["loop", "--model", str(tmp_path), "--data", f"captioned:{data}", "--out", str(out)]
    assert "model_index.json" in _fails(bad, capsys)
    assert "guidance_schedule" in _fails(
        [*_args(pipe, data, prompts, out), "--set", "guidance_schedule=cosine"], capsys
    )
    assert not out.exists()
