"""A loop killed with SIGKILL at named points (inside a generation, between its rename and its log row, inside a
model's training checkpoint) and resumed ends with the files of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

GAUSSIAN = ["--preset", "gaussian-digits", "--quick", "--backend", "gaussian", "--synthetic-count", "30",
            "--poison-generations", "2", "--heal-generations", "1", "--set", "train_size=100",
            "--set", "num_samples=60"]  # fmt: skip
DIFFUSION = ["--preset", "nepotism-digits", "--quick", "--synthetic-count", "3", "--poison-generations", "1",
             "--heal-generations", "0", "--set", "train_size=40", "--set", "num_samples=20", "--set", "base_steps=4",
             "--set", "steps_per_generation=2", "--set", "sample_steps=2", "--set", "features=pixels"]  # fmt: skip


def _loop(out: Path, args: list[str], crash_at: str | None = None, resume: bool = False) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DIFFAUDIT_TEST_CRASH_AT", None)
    if crash_at:
        env["DIFFAUDIT_TEST_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "diffaudit", "--device", "cpu", "loop", *args, "--out", str(out)]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True).returncode


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(out: Path) -> tuple[list[dict], dict]:
    summary = json.loads((out / "summary.json").read_text())
    return _rows(out), summary


@pytest.mark.parametrize(
    ("args", "crash_at"),
    [
        (GAUSSIAN, "loop:generation-built#2"),
        (GAUSSIAN, "loop:generation-renamed#3"),
        (DIFFUSION, "checkpoint:tmp-written#1"),
    ],
    ids=["gaussian-inside-generation", "gaussian-after-rename", "diffusion-inside-checkpoint"],
)
def test_killed_loop_resumes_to_the_uninterrupted_result(tmp_path, args, crash_at):
    if crash_at.startswith("checkpoint"):
        args = [*args, "--set", "train.checkpoint_every=2"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    assert _loop(reference, args) == 0
    assert _loop(crashed, args, crash_at) == -signal.SIGKILL  # it really died at that point
    assert _loop(crashed, args, resume=True) == 0
    assert _comparable(crashed) == _comparable(reference)
    assert not list(crashed.rglob("*.partial")) and not list(crashed.rglob(".tmp-*"))
    keys = [(r["arm"], r["repeat"], r["generation"]) for r in _rows(crashed)]
    assert len(keys) == len(set(keys))  # no generation logged twice
