"""Sharded membership inference (unit: a trained model) merged equals the one-process run.

An analytic Gaussian trainer on 120 digits: the target and 4 shadows are 5 models, so 3 shards hold ``1 + 2 + 2``
of them. results.json equals the one-process one except the wall-clock seconds; scores.json, membership.npz and
wen.json byte for byte. Shards run in this process through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffaudit.cli import app, main

runner = CliRunner()
CLI = ["mia", "--data", "digits", "--pool-size", "120", "--num-shadows", "4", "--trainer", "gaussian"]
CLI += ["--timesteps", "50,200", "--noise-draws", "2", "--wen-seeds", "2", "--attacks", "pia,secmi-stat"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mia1") / "run"
    res = runner.invoke(app, [*CLI, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mia3") / "run"
    for i in range(3):
        res = runner.invoke(app, [*CLI, "--out", str(out), "--shard", f"{i}/3"])
        assert res.exit_code == 0, res.output
    return out


def _main_exit(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code), capsys.readouterr().err


def _without_seconds(results: dict) -> dict:
    costs = {k: {f: v for f, v in c.items() if f != "seconds_per_image"} for k, c in results["costs"].items()}
    return {k: v for k, v in results.items() if k != "seconds"} | {"costs": costs}


def test_three_shards_merge_to_the_one_process_run(three, single, capsys):
    works = [json.loads(p.read_text())["work"] for p in sorted((three / "shards").glob("*/manifest.json"))]
    assert [(w["unit"], w["start"], w["stop"], w["first"], w["last"]) for w in works] == [
        ("models", 0, 1, "target", "target"),
        ("models", 1, 3, "shadow-00", "shadow-01"),
        ("models", 3, 5, "shadow-02", "shadow-03"),
    ]
    code, text = _main_exit(["merge", str(three)], capsys)
    assert code == 0, text
    a, b = (json.loads((p / "results.json").read_text()) for p in (three, single))
    assert _without_seconds(a) == _without_seconds(b)
    assert a["shadows"]["trained_now"] == dict.fromkeys(["target", *(f"shadow-0{k}" for k in range(4))], True)
    assert a["costs"]["loss"]["seconds_per_image"] is not None  # the shards' fitting time, not None
    for name in ("scores.json", "membership.npz", "wen.json", "config.json", "metrics.jsonl", "roc.png"):
        assert (three / name).read_bytes() == (single / name).read_bytes(), name
    for name in ("target", "shadow-03"):
        rel = Path("models") / name / "mia-losses.npz"
        assert (three / rel).read_bytes() == (single / rel).read_bytes()


def test_missing_shard_is_named(three, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(three / "shards", run / "shards")
    shutil.copy(three / "manifest.json", run / "manifest.json")
    shutil.rmtree(run / "shards" / "shard-00002-of-00003")
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "missing shard 2/3 (models items 3..4)" in text
    assert not (run / "results.json").exists()
