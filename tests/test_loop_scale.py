"""Sharded loop experiments (unit: an (arm, repeat) pair) merged equal the one-process run, byte for byte.

The analytic Gaussian backend on digits (quick preset, 2 arms x 2 repeats, shortened): 4 pairs in 3 shards are
``1 + 1 + 2``, so shard 1/3 starts mid-repeat (arm ``accumulate`` of repeat 0) and must recompute generation 0
as the first arm makes it. Shards run in this process through the CLI (tests/test_scale.py shows that separate
processes merge).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app, main
from diffaudit.data.imageset import ImageSet
from diffaudit.loop.request import LoopRequest

runner = CliRunner()
SETTINGS = {"poison_generations": 2, "heal_generations": 1, "num_samples": 60}
CLI = ["loop", "--preset", "gaussian-digits", "--quick", "--repeats", "2"]
CLI += [arg for k, v in SETTINGS.items() for arg in ("--set", f"{k}={v}")]
ARMS = ("replace", "accumulate")
GENERATIONS = 4  # 1 + 2 poisoning + 1 healing


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    from diffaudit.loop.request import run_loop

    out = tmp_path_factory.mktemp("loop1") / "run"
    run_loop(LoopRequest(preset="gaussian-digits", quick=True, repeats=2, settings=dict(SETTINGS)), out)
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    """Three shards through the CLI (``--shard i/3``), not yet merged."""
    out = tmp_path_factory.mktemp("loop3") / "run"
    for i in range(3):
        res = runner.invoke(app, [*CLI, "--out", str(out), "--shard", f"{i}/3"])
        assert res.exit_code == 0, res.output
    return out


def _main_exit(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code), capsys.readouterr().err


def assert_same_loop_run(merged: Path, single: Path) -> None:
    """metrics.jsonl, summary.json, config.json, the figures and every generation's row and samples."""
    for name in ("metrics.jsonl", "summary.json", "config.json", "curves.png", *(f"grids-{a}.png" for a in ARMS)):
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    rows = [json.loads(line) for line in (merged / "metrics.jsonl").read_text().splitlines()]
    assert [(r["repeat"], r["arm"], r["generation"]) for r in rows] == [
        (rep, arm, g) for rep in range(2) for arm in ARMS for g in range(GENERATIONS)
    ]
    gens = sorted(p.relative_to(single) for p in single.glob("repeat-*/**/row.json"))
    assert len(gens) == 2 * (1 + 2 * (GENERATIONS - 1))
    assert gens == sorted(p.relative_to(merged) for p in merged.glob("repeat-*/**/row.json"))
    for rel in gens:
        assert (merged / rel).read_bytes() == (single / rel).read_bytes(), rel
        a, b = (ImageSet.load(p / rel.parent / "samples.npz") for p in (merged, single))
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.ids, b.ids)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (merged, single))
    assert ma["kind"] == mb["kind"] == "loop" and ma["status"] == "finished" and ma["arms"] == mb["arms"]


def test_three_shards_merge_to_the_one_process_run(three, single, capsys):
    works = [json.loads(p.read_text())["work"] for p in sorted((three / "shards").glob("*/manifest.json"))]
    assert [(w["unit"], w["start"], w["stop"], w["first"], w["last"]) for w in works] == [
        ("arm-repeat pairs", 0, 1, {"arm": "replace", "repeat": 0}, {"arm": "replace", "repeat": 0}),
        ("arm-repeat pairs", 1, 2, {"arm": "accumulate", "repeat": 0}, {"arm": "accumulate", "repeat": 0}),
        ("arm-repeat pairs", 2, 4, {"arm": "replace", "repeat": 1}, {"arm": "accumulate", "repeat": 1}),
    ]
    # Shard 1/3 holds no "replace" arm: it made generation 0 itself, as the first arm does.
    assert not (three / "shards" / "shard-00001-of-00003" / "repeat-0" / "replace").exists()
    code, text = _main_exit(["merge", str(three)], capsys)
    assert code == 0, text
    assert_same_loop_run(three, single)
    sharded = json.loads((three / "manifest.json").read_text())["sharded"]
    assert sharded["shards"] == 3 and sharded["unit"] == "arm-repeat pairs"
    code, text = _main_exit(["merge", str(three)], capsys)  # merging again rewrites the same files
    assert code == 0, text
    assert_same_loop_run(three, single)


def _copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "shards", dst / "shards")
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def test_missing_shard_is_named(three, tmp_path, capsys):
    run = _copy_shards(three, tmp_path / "run")
    shutil.rmtree(run / "shards" / "shard-00001-of-00003")
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "missing shard 1/3 (arm-repeat pairs item 1)" in text
    assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()


def test_doubled_shard_is_named(three, tmp_path, capsys):
    run = _copy_shards(three, tmp_path / "run")
    res = runner.invoke(app, [*CLI, "--out", str(run), "--shard", "1/4"])  # pair 1 again
    assert res.exit_code == 0, res.output
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "doubled: shards 1/3 and 1/4 both hold arm-repeat pairs item 1" in text
    assert not (run / "metrics.jsonl").exists()


def test_shards_with_different_generation_0_are_refused(three, tmp_path, capsys):
    run = _copy_shards(three, tmp_path / "run")
    row = run / "shards" / "shard-00001-of-00003" / "repeat-0" / "gen-000" / "row.json"
    data = json.loads(row.read_text())
    row.write_text(json.dumps(data | {"all/fid": data["all/fid"] + 1e-9}))  # another device's rounding
    code, text = _main_exit(["merge", str(run)], capsys)
    assert code == 2 and "generation 0 of repeat 0 differs between shards 0/3 and 1/3" in text
    assert not (run / "metrics.jsonl").exists()


def test_sharding_options_are_checked(tmp_path, capsys):
    out = tmp_path / "run"
    code, text = _main_exit([*CLI, "--out", str(out), "--shard", "0/3", "--tag-and-scrub"], capsys)
    assert code == 2 and "--tag-and-scrub cannot be sharded" in text
    code, text = _main_exit([*CLI, "--out", str(out), "--shard", "3/3"], capsys)
    assert code == 2 and "shard 3/3: need 0 <= i < n" in text
    code, text = _main_exit([*CLI, "--out", str(out), "--shard", "0/5"], capsys)
    assert code == 2 and "shard 0/5 is empty: 4 (arm, repeat) pairs in 5 shards" in text
    code, text = _main_exit([*CLI, "--out", str(out), "--shards", "2", "--engine", "spark"], capsys)
    assert code == 2 and "--engine 'spark'" in text
    assert not out.exists()
