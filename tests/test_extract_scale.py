"""Sharded extraction (unit: a condition) merged equals the one-process run: results.json byte for byte.

An analytic Gaussian model with 4 conditions, one of them memorized, inside a (fake) train run whose data config
plants canaries, so the untargeted pass, the canary report and calibration all go through the merge. Shards run
in this process (CliRunner or the library): tests/test_scale.py already proves that shards written by separate
processes merge, and the Ray test runs its shards in Ray worker processes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.attacks import extraction as ex
from diffaudit.attacks import extraction_run as er
from diffaudit.cli import app, main
from diffaudit.config import SampleConfig
from diffaudit.data.imageset import ImageSet

runner = CliRunner()
FAST = SampleConfig(sampler="ddim", num_steps=2, guidance_scale=2.0, temperature=1.0, batch_size=8)
PER_LABEL = 12
CLI = ["--per-label", str(PER_LABEL), "--grid", "2", "--num-steps", "2", "--batch-size", "8", "--untargeted"]
CLI += ["--calibrate", "--calibration-pairs", "100", "--seed", "5", "--no-progress"]
MEM = 3  # the memorized condition


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """RUN/model: a Gaussian per condition ("mem" fit to copies of one image) in a train run planting canaries."""
    from diffaudit.generators.analytic import AnalyticTrainer

    run = tmp_path_factory.mktemp("exscale") / "train"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 1, 8, 8), dtype=np.uint8)
    labels = np.repeat([0, 1, 2, MEM], [15, 15, 15, 5])
    images[labels == MEM] = images[45]
    data = ImageSet(images, labels, ("a", "b", "c", "mem"))
    data.save(run.parent / "train.npz")
    trainer = AnalyticTrainer("gaussian")
    trainer.save(trainer.fit(data, None, 0, 0), run / "model")
    (run / "manifest.json").write_text(json.dumps({"kind": "train", "status": "finished"}))
    source = {"source": f"npz:{run.parent / 'train.npz'}", "resolution": 8, "channels": 1, "canaries": [1, 3]}
    (run / "config.json").write_text(json.dumps({"data": source}))
    return run / "model"


def _config(model: Path, **kw) -> er.ExtractConfig:
    return er.ExtractConfig(
        model=str(model), per_label=PER_LABEL, grid=2, sample=FAST, untargeted=True, seed=5,
        calibration=er.CalibrationConfig(pairs=100), show_progress=False, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    er.run_extract(_config(model), out)
    return out


@pytest.fixture(scope="module")
def four(model, tmp_path_factory) -> Path:
    """Four shards through the CLI (``--shard i/4``), not yet merged."""
    out = tmp_path_factory.mktemp("four") / "run"
    for i in range(4):
        res = runner.invoke(app, ["extract", "--model", str(model), "--out", str(out), *CLI, "--shard", f"{i}/4"])
        assert res.exit_code == 0, res.output
    return out


def _main_exit(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code), capsys.readouterr().err


def _same_results(merged: Path, single: Path) -> dict:
    a, b = (p / "results.json" for p in (merged, single))
    assert a.read_bytes() == b.read_bytes()
    return json.loads(a.read_text())


def assert_same_extract_run(merged: Path, single: Path) -> None:
    """results.json, metrics.jsonl, config.json, every generation (ids, seeds) and the figures, byte for byte."""
    res = _same_results(merged, single)
    assert res["summary"][ex.NUM_FLAGGED] == 1 and res["untargeted"]["pairs"] and "canaries" in res
    for name in ("metrics.jsonl", "config.json"):
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    a, b = ImageSet.load(merged / "generations.npz"), ImageSet.load(single / "generations.npz")
    assert len(a) == 4 * PER_LABEL
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.provenance["seed"], b.provenance["seed"])
    for name in ("extracted_pairs.png", "roc.png", "extraction_vs_duplication.png"):
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (merged, single))
    for key in ("kind", "status", "edge_threshold", "canaries"):
        assert ma[key] == mb[key], key


def test_four_shards_merge_to_the_one_process_run(four, single, capsys):
    works = [json.loads((four / "shards" / f"shard-0000{i}-of-00004" / "manifest.json").read_text())["work"]
             for i in range(4)]  # fmt: skip
    assert [(w["unit"], w["start"], w["stop"], w["first_label"]) for w in works] == [
        ("conditions", i, i + 1, i) for i in range(4)
    ]
    code, text = _main_exit(["merge", str(four)], capsys)
    assert code == 0, text
    assert_same_extract_run(four, single)
    manifest = json.loads((four / "manifest.json").read_text())
    assert manifest["sharded"] == manifest["sharded"] | {"shards": 4, "unit": "conditions"}
    code, text = _main_exit(["merge", str(four)], capsys)  # merging again rewrites the same files
    assert code == 0, text
    assert_same_extract_run(four, single)


def test_three_shards_keeping_only_cliques_give_the_same_results(model, single, tmp_path):
    from diffaudit.scale.engines import extract_stage, run_stage

    out = tmp_path / "run"
    summary = run_stage(extract_stage(), _config(model, keep_generations="cliques"), out, 3, show_progress=False)
    assert summary["ran"] == 3 and summary["num_conditions"] == 4
    works = [json.loads(p.read_text())["work"] for p in sorted((out / "shards").glob("*/manifest.json"))]
    assert [(w["start"], w["stop"]) for w in works] == [(0, 1), (1, 2), (2, 4)]  # 4 conditions, 3 shards
    res = _same_results(out, single)
    assert not (out / "generations.npz").exists()
    mem = next(r for r in res["labels"] if r[ex.LABEL] == MEM)
    kept = ImageSet.load(out / "generations" / f"label_{MEM}.npz")
    assert mem[ex.FLAGGED] and kept.ids.tolist() == mem[ex.MEMBER_IDS]  # the clique's members, nothing else
    assert [len(ImageSet.load(out / "generations" / f"label_{i}.npz")) for i in range(3)] == [0, 0, 0]
    assert (out / "extracted_pairs.png").read_bytes() == (single / "extracted_pairs.png").read_bytes()


def test_one_process_run_keeping_only_cliques_gives_the_same_results(model, single, tmp_path):
    er.run_extract(_config(model, keep_generations="cliques"), tmp_path / "run")
    _same_results(tmp_path / "run", single)


def _copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "shards", dst / "shards")
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def test_missing_shard_is_named(four, tmp_path, capsys):
    run = _copy_shards(four, tmp_path / "run")
    shutil.rmtree(run / "shards" / "shard-00002-of-00004")
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "missing shard 2/4 (conditions item 2)" in text
    assert not (run / "results.json").exists()


def test_doubled_shard_is_named(four, model, tmp_path, capsys):
    run = _copy_shards(four, tmp_path / "run")
    res = runner.invoke(app, ["extract", "--model", str(model), "--out", str(run), *CLI, "--shard", "1/2"])
    assert res.exit_code == 0, res.output
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "doubled: shards 2/4 and 1/2 both hold conditions item 2" in text
    assert not (run / "results.json").exists()


def test_rerun_skips_a_finished_shard(four, model):
    folder = four / "shards" / "shard-00003-of-00004"
    before = (folder / "records.jsonl").stat().st_mtime_ns
    t0 = time.perf_counter()
    res = runner.invoke(app, ["extract", "--model", str(model), "--out", str(four), *CLI, "--shard", "3/4"])
    assert res.exit_code == 0, res.output
    assert (folder / "records.jsonl").stat().st_mtime_ns == before and time.perf_counter() - t0 < 5
    other = [a if a != "--seed" else "--per-label" for a in CLI]  # a changed setting: refused by name
    res = runner.invoke(app, ["extract", "--model", str(model), "--out", str(four), *other, "--shard", "3/4"])
    assert res.exit_code != 0 and "shard 3/4 was written" in str(res.exception)


def test_sharding_a_canary_training_run_is_refused(tmp_path, capsys):
    code, text = _main_exit(["extract", "--canaries", "1,2", "--out", str(tmp_path / "r"), "--shard", "0/2"], capsys)
    assert code == 2 and "sharded extraction needs --model" in text and not (tmp_path / "r").exists()


def test_ray_engine_equals_one_process(model, single, tmp_path):
    ray = pytest.importorskip("ray")
    from diffaudit.scale.engines import extract_stage, run_stage

    env = {"env_vars": {"OMP_NUM_THREADS": "1"}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        out = tmp_path / "ray"
        summary = run_stage(extract_stage(), _config(model), out, 2, engine="ray", num_cpus=1, show_progress=False)
        assert summary["ran"] == 2
        assert_same_extract_run(out, single)
    finally:
        ray.shutdown()
