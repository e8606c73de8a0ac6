import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet

runner = CliRunner()
TINY = [
    "--set",
    "model.block_out_channels=[8,16]",
    "--set",
    "model.norm_num_groups=4",
    "--set",
    "train.batch_size=8",
    "--set",
    "data.subset=40",
]


def test_train_then_sample_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(run), "--steps", "4", "--grid-images", "10", *TINY])
    assert result.exit_code == 0, result.output
    for name in (
        "manifest.json",
        "config.json",
        "metrics.jsonl",
        "model/model.safetensors",
        "model/ema.safetensors",
        "model/config.json",
        "samples-grid.png",
        "data-grid.png",
    ):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["kind"] == "train"
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4

    out = tmp_path / "s"
    result = runner.invoke(
        app,
        [
            "sample",
            "--model",
            str(run),
            "--num-images",
            "6",
            "--labels",
            "3,4",
            "--num-steps",
            "5",
            "--out",
            str(out),
            "--seed",
            "10",
        ],
    )
    assert result.exit_code == 0, result.output
    samples = ImageSet.load(out / "samples.npz")
    assert samples.images.shape == (6, 1, 8, 8)
    assert samples.labels.tolist() == [3, 4, 3, 4, 3, 4]
    assert samples.provenance["seed"].tolist() == list(range(10, 16))
    assert (samples.provenance["model_id"] == manifest["model_id"]).all()
    assert (out / "grid.png").exists()
    sample_manifest = json.loads((out / "manifest.json").read_text())
    assert sample_manifest["kind"] == "sample" and sample_manifest["model_id"] == manifest["model_id"]
    assert json.loads((out / "config.json").read_text())["generator"]["family"] == "classcond"


def test_dry_run_prints_resolved_config(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--dry-run", "--preset", "faces-32"])
    assert result.exit_code == 0
    assert json.loads(result.output)["data"]["resolution"] == 32
    assert not (tmp_path / "r").exists()


def test_data_show(tmp_path):
    grid = tmp_path / "g.png"
    result = runner.invoke(app, ["data", "show", "faces", "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["num_images"] == 100 and grid.exists()


def test_user_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffaudit",
            "sample",
            "--model",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_npz_source_through_cli(tmp_path):
    ImageSet(np.zeros((3, 1, 8, 8), np.uint8), [0, 1, 2], ("a", "b", "c")).save(tmp_path / "d.npz")
    result = runner.invoke(app, ["data", "show", f"npz:{tmp_path / 'd.npz'}", "--grid", str(tmp_path / "g.png")])
    assert result.exit_code == 0 and json.loads(result.output)["num_classes"] == 3


def test_sample_with_guard_records_blocked_outputs(tmp_path):
    """A guard index built from the model's own samples blocks them all: each is re-sampled and recorded."""
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--out", str(run), "--steps", "2", "--grid-images", "0", *TINY]).exit_code == 0
    first_run = tmp_path / "first"
    args = ["sample", "--model", str(run), "--num-images", "4", "--num-steps", "3"]
    assert runner.invoke(app, [*args, "--out", str(first_run)]).exit_code == 0
    first = first_run / "samples.npz"
    index = tmp_path / "index"
    result = runner.invoke(
        app,
        [
            "guard",
            "build",
            "--data",
            f"npz:{first}",
            "--out",
            str(index),
            "--holdout-fraction",
            "0.5",
            "--calibrate-fpr",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    guarded_run = tmp_path / "guarded"
    result = runner.invoke(app, [*args, "--out", str(guarded_run), "--guard", str(index), "--guard-retries", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads((guarded_run / "guard.json").read_text())
    guarded = guarded_run / "samples.npz"
    indexed_seeds = {int(s) for s in ImageSet.load(first).provenance["seed"]}
    blocked_seeds = {int(b["seed"]) for b in record["blocked"]}
    # the indexed outputs (the seeds that made the index's training half) must be among the blocked ones
    assert blocked_seeds & indexed_seeds
    assert all(int(s) not in blocked_seeds for s in ImageSet.load(guarded).provenance["seed"])
