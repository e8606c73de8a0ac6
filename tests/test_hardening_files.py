"""Files a user (or a killed process) may have damaged: run dirs, model dirs, image folders, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffaudit.data.folder import list_image_files, open_image, read_folder
from diffaudit.errors import CheckpointError, ConfigError, DataError, OutputError
from diffaudit.guards.tags_dwt import detect_known_tags
from diffaudit.io import atomic_write_text, read_json, remove_stale_temps
from diffaudit.models import checkpoint as ckpt
from diffaudit.models.config import ModelConfig
from diffaudit.models.diffusion import DiffusionModel
from diffaudit.runs import ERROR_LOG, RunDir, read_manifest

TINY = ModelConfig(resolution=8, channels=1, num_classes=2, block_out_channels=(8, 16), norm_num_groups=4)


# ---- io --------------------------------------------------------------------------------------------------------
def test_atomic_write_and_read_json_errors(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        atomic_write_text(tmp_path / "d", "x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        atomic_write_text(tmp_path / "f" / "g.txt", "x")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ConfigError, match="latin.json.*UTF-8"):
        read_json(tmp_path / "latin.json", "thing", ConfigError)
    (tmp_path / "torn.json").write_text('{"a": ')
    with pytest.raises(ConfigError, match="torn.json.*not valid JSON"):
        read_json(tmp_path / "torn.json", "thing", ConfigError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f", "latin.json", "torn.json"]  # no temp files
    assert list((tmp_path / "d").iterdir()) == []


def test_remove_stale_temps_keeps_real_files(tmp_path):
    keep = [tmp_path / "manifest.json", tmp_path / ".lock", tmp_path / "a.tmp", tmp_path / ".hidden.png"]
    stale = [tmp_path / ".manifest.json.abcd1234.tmp", tmp_path / ".grid.png.a_b12345.tmp.png"]
    for p in keep + stale:
        p.write_text("x")
    (tmp_path / "checkpoints" / ".tmp-xyz").mkdir(parents=True)
    remove_stale_temps(tmp_path)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert not (tmp_path / "checkpoints" / ".tmp-xyz").exists()


# ---- run directories -------------------------------------------------------------------------------------------
def test_failed_run_without_output_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ConfigError), RunDir(out, "train") as run:
        run.write_config({"a": 1})
        run.log({"step": 1})
        raise ConfigError("bad input")
    assert not (tmp_path / "new").exists()  # the parents it created went too
    with RunDir(out, "train"):  # a corrected rerun is not refused
        pass


def test_failed_run_with_output_kept_with_error_log(tmp_path):
    with pytest.raises(ZeroDivisionError), RunDir(tmp_path / "r", "train") as run:
        (run.path / "checkpoints").mkdir()
        1 / 0  # noqa: B018
    manifest = read_manifest(tmp_path / "r")
    assert manifest["status"] == "failed"
    assert "ZeroDivisionError" in (tmp_path / "r" / ERROR_LOG).read_text()


def test_existing_directory_never_removed(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(ConfigError), RunDir(tmp_path / "r", "train"):
        raise ConfigError("bad")
    assert (tmp_path / "r").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        RunDir(tmp_path / "file", "train").__enter__()
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe"])
def test_corrupt_manifest_is_a_config_error(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ConfigError, match="manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="manifest.json"):
        RunDir(tmp_path, "train", resume=True).__enter__()


def test_resume_truncates_metrics_and_removes_temps(tmp_path):
    with RunDir(tmp_path / "r", "train") as run:
        for step in (1, 2, 3, 4):
            run.log({"step": step})
    (tmp_path / "r" / "metrics.jsonl").open("a").write('{"step": 5, "lo')  # torn row of a killed append
    (tmp_path / "r" / ".manifest.json.zz99aa11.tmp").write_text("{")
    with RunDir(tmp_path / "r", "train", resume=True) as run:
        assert not (tmp_path / "r" / ".manifest.json.zz99aa11.tmp").exists()
        run.truncate_metrics(2)
        assert (tmp_path / "r" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
        run.truncate_metrics(0)
        assert run.rows() == []


# ---- model directories -----------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    import torch

    torch.manual_seed(0)
    ckpt.save_model(DiffusionModel(TINY), tmp_path / "m")
    return tmp_path / "m"


def _edit_config(model_dir, edit):
    meta = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(edit(meta)))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: [m], "expected a JSON object"),
        (lambda m: {**m, "model": None}, "field 'model'"),
        (lambda m: {**m, "model": {**m["model"], "resolution": "8"}}, "model.resolution"),
        (lambda m: {**m, "model": {**m["model"], "norm_num_groups": 0}}, "model.norm_num_groups"),
        (lambda m: {**m, "class_names": "abc"}, "class_names"),
        (lambda m: {**m, "trained_steps": "10"}, "trained_steps"),
        (lambda m: {**m, "kind": None}, "not a diffaudit model"),
    ],
)
def test_bad_model_config_named(model_dir, edit, match):
    _edit_config(model_dir, edit)
    with pytest.raises(CheckpointError, match=match) as err:
        ckpt.load_model(model_dir, device="cpu")
    assert "config.json" in str(err.value)


def test_non_utf8_config_and_mismatched_architecture(model_dir):
    _edit_config(model_dir, lambda m: {**m, "model": {**m["model"], "block_out_channels": [16, 32]}})
    with pytest.raises(CheckpointError, match="do not match the architecture") as err:
        ckpt.load_model(model_dir, device="cpu")
    assert len(str(err.value)) < 600 and "\n" not in str(err.value)
    (model_dir / "config.json").write_bytes(b'{"kind": "\xff"}')
    with pytest.raises(CheckpointError, match="UTF-8"):
        ckpt.load_model(model_dir, device="cpu")


class _Killed(Exception):
    pass


@pytest.mark.parametrize("point", ["model:new-written", "model:old-moved", "model:new-moved"])
def test_model_swap_killed_at_each_point_stays_loadable(model_dir, monkeypatch, point):
    import torch

    old_id = ckpt.read_model_config(model_dir)["model_id"]
    torch.manual_seed(1)
    new_model = DiffusionModel(TINY)

    def crash(name):
        if name == point:
            raise _Killed  # save_model has no cleanup code, so an exception here is as abrupt as SIGKILL

    monkeypatch.setattr(ckpt, "crash_point", crash)
    with pytest.raises(_Killed):
        ckpt.save_model(new_model, model_dir)
    monkeypatch.undo()
    loaded_id = ckpt.load_model(model_dir, device="cpu")[1]["model_id"]  # read-only: finds the complete copy
    assert loaded_id in (old_id, ckpt.weights_id(ckpt._state(new_model)))
    ckpt.recover_model_dir(model_dir)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["m"]
    assert ckpt.load_model(model_dir, device="cpu")[1]["model_id"] == loaded_id
    ckpt.save_model(new_model, model_dir)  # the next save works ("Directory not empty" before)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["m"]


# ---- image folders ---------------------------------------------------------------------------------------------
def _png(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, 7, dtype=np.uint8)).save(path)


def test_folder_reader_guards(tmp_path):
    root = tmp_path / "data"
    _png(root / "cat" / "[/]a.png")
    (root / "cat" / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    with pytest.raises(DataError, match="eps.png: not a PNG or JPEG"):
        read_folder(root)
    _, _, names, report = read_folder(root, skip_bad=True)
    assert names == ("cat",) and report.read == 1 and "eps.png" in report.skipped[0][0]

    loop = tmp_path / "loop"
    _png(loop / "cls" / "a.png")
    os.symlink("..", loop / "cls" / "up")
    with pytest.raises(DataError, match="symlink loop"):
        list_image_files(loop)
    self_loop = tmp_path / "self"
    _png(self_loop / "a.png")
    os.symlink("b.png", self_loop / "b.png")
    with pytest.raises(DataError, match="b.png: a symlink loop"):
        read_folder(self_loop)

    outside = tmp_path / "out"
    _png(tmp_path / "secret.png")
    _png(outside / "a.png")
    os.symlink(tmp_path / "secret.png", outside / "b.png")
    with pytest.raises(DataError, match="leaves the folder"):
        read_folder(outside)
    _png(tmp_path / "big" / "big.png", size=(64, 64))
    with pytest.raises(DataError, match="over the limit"):
        open_image(tmp_path / "big" / "big.png", tmp_path / "big", max_pixels=100)


def test_known_tag_scan_uses_the_guarded_reader(tmp_path):
    folder = tmp_path / "scan"
    _png(tmp_path / "secret.png")
    folder.mkdir()
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    (folder / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    notes = {m.source: m.note for m in detect_known_tags(folder)}
    assert "leaves the folder" in notes["link.png"] and "not a PNG or JPEG" in notes["eps.png"]
