"""Sharded sampling as Ray tasks on a local 2-CPU cluster equals the one-process run bit for bit.

Tasks take half a CPU each (four run at once on two CPUs) and finish in any order; results are merged by key.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffaudit.cli import app
from test_scale import ARGS, assert_same_sample_run, model, single  # noqa: F401 - fixtures

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    yield
    ray.shutdown()


def test_ray_engine_equals_one_process(local_ray, model, single, tmp_path):  # noqa: F811
    from diffaudit.config import SampleConfig
    from diffaudit.sampling import SampleRunConfig
    from diffaudit.scale.engines import run_stage, sample_stage

    cfg = SampleRunConfig(model=str(model), num_images=10, seed=7, sample=SampleConfig(num_steps=3, batch_size=4))
    out = tmp_path / "ray"
    summary = run_stage(sample_stage(), cfg, out, 4, engine="ray", num_cpus=0.5, show_progress=False)
    assert summary["ran"] == 4 and summary["num_images"] == 10
    assert_same_sample_run(out, single)
    # a rerun finds every shard finished and only merges
    assert run_stage(sample_stage(), cfg, out, 4, engine="ray", num_cpus=0.5, show_progress=False)["ran"] == 0


def test_ray_engine_from_the_cli(local_ray, model, single, tmp_path):  # noqa: F811
    out = tmp_path / "cli"
    args = ["sample", "--model", str(model), "--out", str(out), *ARGS, "--shards", "3", "--engine", "ray"]
    result = runner.invoke(app, [*args, "--cpus-per-task", "0.5"])
    assert result.exit_code == 0, result.output
    assert_same_sample_run(out, single)
