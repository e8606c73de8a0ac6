"""Sharded sampling: shards run as separate processes and merged equal the one-process run bit for bit.

10 requests in 4 shards split at 0, 2, 5, 7, 10 while batches hold 4 images, so shard edges cut batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffaudit.cli import app, main
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.scale.shards import ShardSpec, parse_shard, split_even

runner = CliRunner()
ARGS = ["--num-images", "10", "--batch-size", "4", "--num-steps", "3", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from diffaudit.config import ModelConfig
    from diffaudit.models.checkpoint import save_model
    from diffaudit.models.diffusion import DiffusionModel

    torch.manual_seed(0)
    cfg = ModelConfig(resolution=8, channels=1, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    path = tmp_path_factory.mktemp("scale") / "cc"
    save_model(DiffusionModel(cfg), path, extra={"class_names": ["a", "b", "c"]})
    return path


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    result = runner.invoke(app, ["sample", "--model", str(model), "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return out


def _shard_cmd(model: Path, out: Path, shard: str) -> list[str]:
    return [sys.executable, "-m", "diffaudit", "sample", "--model", str(model), "--out", str(out), *ARGS,
            "--shard", shard]  # fmt: skip


@pytest.fixture(scope="module")
def sharded(model, tmp_path_factory) -> Path:
    """Four shards, each its own process (two at a time on a 2-core machine)."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "DIFFAUDIT_DEVICE": "cpu"}
    for pair in ((0, 1), (2, 3)):
        procs = [subprocess.Popen(_shard_cmd(model, out, f"{i}/4"), env=env, stderr=subprocess.PIPE) for i in pair]
        for p in procs:
            _, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr.decode()
    return out


def _main_exit(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code), capsys.readouterr().err


def assert_same_sample_run(merged: Path, single: Path) -> None:
    """Images, ids, labels, provenance, config, grid and manifest counts equal a one-process run's."""
    a, b = ImageSet.load(merged / "samples.npz"), ImageSet.load(single / "samples.npz")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.class_names == b.class_names
    assert set(a.provenance) == set(b.provenance)
    for key in b.provenance:
        np.testing.assert_array_equal(a.provenance[key], b.provenance[key], err_msg=key)
    assert json.loads((merged / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    assert (merged / "grid.png").read_bytes() == (single / "grid.png").read_bytes()
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (merged, single))
    for key in ("kind", "status", "model_id", "num_images"):
        assert ma[key] == mb[key], key


def test_split_even_edges_cut_batches():
    assert split_even(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert split_even(2, 3) == [(0, 0), (0, 1), (1, 2)]
    assert ShardSpec(2, 4).range(10) == (5, 7) and ShardSpec(2, 4).name == "shard-00002-of-00004"


def test_parse_shard_from_text_and_environment():
    assert parse_shard("3/8") == ShardSpec(3, 8)
    assert parse_shard(None) is None
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert parse_shard("auto", slurm) == ShardSpec(4, 8)  # --array=1-8 is shard 4/8 for task 5
    assert parse_shard("auto", {"JOB_COMPLETION_INDEX": "2", "DIFFAUDIT_SHARD_COUNT": "6"}) == ShardSpec(2, 6)
    assert parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "2"}) == ShardSpec(1, 2)
    with pytest.raises(ConfigError, match="DIFFAUDIT_SHARD_COUNT"):
        parse_shard("auto", {"JOB_COMPLETION_INDEX": "2"})
    with pytest.raises(ConfigError, match="0 <= i < n"):
        parse_shard("4/4")
    with pytest.raises(ConfigError, match="expected i/n"):
        parse_shard("2of4")


def test_four_shard_processes_merge_to_the_one_process_run(sharded, single, capsys):
    names = sorted(p.name for p in (sharded / "shards").iterdir())
    assert names == [f"shard-0000{i}-of-00004" for i in range(4)]
    works = [json.loads((sharded / "shards" / n / "manifest.json").read_text())["work"] for n in names]
    assert [(w["start"], w["stop"]) for w in works] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [(w["first_seed"], w["last_seed"]) for w in works] == [(7, 8), (9, 11), (12, 13), (14, 16)]
    code, text = _main_exit(["merge", str(sharded)], capsys)
    assert code == 0, text
    assert_same_sample_run(sharded, single)
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["sharded"]["shards"] == 4 and manifest["sharded"]["unit"] == "requests"
    # merging again rewrites the same files
    code, text = _main_exit(["merge", str(sharded)], capsys)
    assert code == 0, text
    assert_same_sample_run(sharded, single)


def test_rerun_skips_a_finished_shard(sharded, model):
    folder = sharded / "shards" / "shard-00001-of-00004"
    before = (folder / "samples.npz").stat().st_mtime_ns
    t0 = time.perf_counter()
    result = runner.invoke(app, ["sample", "--model", str(model), "--out", str(sharded), *ARGS, "--shard", "1/4"])
    assert result.exit_code == 0, result.output
    assert (folder / "samples.npz").stat().st_mtime_ns == before
    assert time.perf_counter() - t0 < 5


def test_shard_with_another_config_is_refused(sharded, model, capsys):
    args = ["sample", "--model", str(model), "--out", str(sharded), *ARGS[:-3], "--num-steps", "4", "--shard", "1/4"]
    code, text = _main_exit(args, capsys)
    assert code == 2 and "shard 1/4 was written" in text and "another configuration" in text


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "shards", dst / "shards")
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def test_missing_shard_is_named(sharded, tmp_path, capsys):
    import shutil

    run = _copy_run(sharded, tmp_path / "run")
    shutil.rmtree(run / "shards" / "shard-00002-of-00004")
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "missing shard 2/4 (requests items 5..6)" in text
    assert not (run / "samples.npz").exists()


def test_doubled_shard_is_named(sharded, model, tmp_path, capsys):
    run = _copy_run(sharded, tmp_path / "run")
    result = runner.invoke(app, ["sample", "--model", str(model), "--out", str(run), *ARGS, "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "doubled" in text and "shards 2/4 and 1/2 both hold requests items 5..6" in text


def test_shards_of_another_configuration_are_refused_at_merge(sharded, model, tmp_path, capsys):
    import shutil

    run = _copy_run(sharded, tmp_path / "run")
    shutil.rmtree(run / "shards" / "shard-00003-of-00004")
    other = ["--num-images", "10", "--batch-size", "4", "--num-steps", "2", "--seed", "7", "--no-progress"]
    result = runner.invoke(app, ["sample", "--model", str(model), "--out", str(run), *other, "--shard", "3/4"])
    assert result.exit_code == 0, result.output
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "shards differ in configuration" in text and "3/4" in text


def test_local_engine_runs_all_shards_then_merges(model, single, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample", "--model", str(model), "--out", str(out), *ARGS, "--shards", "3"])
    assert result.exit_code == 0, result.output
    assert_same_sample_run(out, single)


def test_merge_of_a_run_without_shards_is_a_clear_error(single, capsys):
    code, text = _main_exit(["merge", str(single)], capsys)
    assert code == 2 and "has no shards" in text
