"""Training killed with SIGKILL at named points (between steps, inside checkpoint and model writes), then resumed,
must leave exactly the files of an uninterrupted run: weights bit for bit, metrics.jsonl rows (apart from the
measured images_per_s), configs, and no temporary files.

Each run is a forked child of the test process (torch is imported once), which kills itself with SIGKILL when
``$DIFFAUDIT_TEST_CRASH_AT`` names the point it reaches (:func:`diffaudit.io.crash_point`): no ``finally``
block or ``__exit__`` runs, exactly as under ``kill -9``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from diffaudit.config import apply_overrides, get_preset
from diffaudit.data.loading import load_data
from diffaudit.io import CRASH_ENV
from diffaudit.models.checkpoint import load_model
from diffaudit.runs import RunDir
from diffaudit.train import train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

TINY = [
    "data.subset=40",
    "model.block_out_channels=[8,16]",
    "model.norm_num_groups=4",
    "train.steps=6",
    "train.batch_size=8",
    "train.checkpoint_every=3",
    "train.log_every=2",  # a checkpoint (3) inside a logging window (3-4): the partial loss must survive
]
IGNORED = {"manifest.json", ".lock"}


def _train_in_child(out: Path, resume: bool, crash_at: str | None, timeout: float = 120.0) -> int:
    """Run one training in a forked child; returns the signal that killed it (0 when it finished normally)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            if crash_at:
                os.environ[CRASH_ENV] = crash_at
            else:
                os.environ.pop(CRASH_ENV, None)
            preset = apply_overrides(get_preset("digits-8"), TINY)
            images, info = load_data(preset.data)
            with RunDir(out, "train", resume=resume) as run:  # what `diffaudit train` does, minus the grids
                run.write_config(preset.to_dict() | {"data_info": info})
                train(preset, images, run, show_progress=False, device="cpu")
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return os.WTERMSIG(status)
            assert os.WEXITSTATUS(status) == 0, f"training child failed (exit {os.WEXITSTATUS(status)})"
            return 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"training child for {out} did not finish in {timeout} s")


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in IGNORED}


def _assert_same_run(expected: Path, actual: Path) -> None:
    want, got = _files(expected), _files(actual)
    assert sorted(got) == sorted(want), "file lists differ (stray temporary files or missing outputs)"
    for name, path in want.items():
        if name.endswith(".jsonl"):
            strip = [
                {k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                for line in path.read_text().splitlines()
            ]
            again = [
                {k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                for line in got[name].read_text().splitlines()
            ]
            assert again == strip, f"{name}: rows differ"
        else:
            assert got[name].read_bytes() == path.read_bytes(), f"{name} differs"
    assert json.loads((actual / "manifest.json").read_text())["status"] == "finished"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "full"
    assert _train_in_child(out, resume=False, crash_at=None) == 0
    return out


@pytest.mark.parametrize(
    "crash_at",
    [
        "train:step-2",  # before any checkpoint: restarts from 0 with an empty metrics file
        "train:step-4",  # one step after the checkpoint at 3: rows 4 is logged again, not twice
        "checkpoint:tmp-written",  # checkpoints/.tmp-* left behind
        "checkpoint:moved",  # step-0000003 in place, latest.json not yet pointing at it
        "model:new-written",  # final model complete in .model.new, model/ not yet there
        "checkpoint:tmp-written#2",  # the final checkpoint, after the final model was written
    ],
)
def test_killed_then_resumed_equals_uninterrupted(tmp_path, uninterrupted, crash_at):
    out = tmp_path / "run"
    assert _train_in_child(out, resume=False, crash_at=crash_at) == signal.SIGKILL
    assert _train_in_child(out, resume=True, crash_at=None) == 0
    _assert_same_run(uninterrupted, out)


@pytest.mark.parametrize("crash_at", ["model:old-moved", "model:new-moved"])
def test_model_replacement_killed_is_recovered(tmp_path, uninterrupted, crash_at):
    """Resuming a finished run rewrites its model; a kill mid-swap leaves a loadable model and a resumable run."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert _train_in_child(out, resume=True, crash_at=crash_at) == signal.SIGKILL
    _, meta = load_model(out, device="cpu")  # read-only lookup finds the complete copy
    assert meta["model_id"] == json.loads((uninterrupted / "model" / "config.json").read_text())["model_id"]
    assert _train_in_child(out, resume=True, crash_at=None) == 0
    _assert_same_run(uninterrupted, out)
