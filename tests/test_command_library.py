"""The library calls behind thin CLI commands: guards.tag_run, guards.scrub_run, scale.dispatch, data.show,
metrics.evaluate.run_evaluate (the CLI tests cover the same paths through ``diffaudit ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffaudit.config import DataConfig
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError
from diffaudit.guards.scrub_run import ScrubConfig, parse_generated, run_scrub, scrub_manifest_path
from diffaudit.guards.tag_run import DetectConfig, DetectorOptions, TagConfig, detect_brief, run_detect, run_tag
from diffaudit.scale.dispatch import ShardOptions, default_shard_count, run_sharded


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lib")
    faces = load_source("faces")
    faces.subset(np.arange(40)).save(d / "imgs.npz")
    faces.subset(np.arange(40, 80)).save(d / "clean.npz")
    return d


def test_run_tag_then_run_detect(files):
    done = run_tag(TagConfig(key=99, amplitude=6.0), files / "imgs.npz", files / "tagged.npz")
    assert done == {"num_images": 40, "tag": "spread-spectrum:key=99,amplitude=6", "out": str(files / "tagged.npz")}
    calibrated = DetectorOptions(calibrate_on=files / "clean.npz", target_fpr=0.05)
    cfg = DetectConfig(images=files / "tagged.npz", tag=TagConfig(key=99), detection=calibrated)
    result = run_detect(cfg, files / "det.json")
    assert json.loads((files / "det.json").read_text()) == json.loads(json.dumps(result))
    assert result["num_tagged"] >= 38 and result["target_fpr"] == 0.05
    assert len(result["per_image"]) == 40
    brief = detect_brief(result)
    assert "per_image" not in brief and brief["images"] == str(files / "tagged.npz")
    assert list(brief)[-1] == "images"  # the CLI prints the file name last
    with pytest.raises(ConfigError, match="either --threshold or --calibrate-on"):
        run_detect(
            DetectConfig(images=files / "tagged.npz", tag=TagConfig(key=99), threshold=1.0, detection=calibrated)
        )
    with pytest.raises(ConfigError, match="needs --key"):
        run_tag(TagConfig(), files / "imgs.npz", files / "never.npz")
    assert not (files / "never.npz").exists()


def test_run_detect_option_errors_before_loading(files):
    missing = Path("/nonexistent.npz")
    with pytest.raises(ConfigError, match="--method / --detector score --images"):
        run_detect(DetectConfig(folder=files, detection=DetectorOptions(method="spectral")))
    with pytest.raises(ConfigError, match="unknown --method 'nope'"):
        run_detect(DetectConfig(images=missing, detection=DetectorOptions(method="nope")))
    with pytest.raises(ConfigError, match="--method loss needs the suspect generator"):
        run_detect(DetectConfig(images=missing, detection=DetectorOptions(method="loss")))
    with pytest.raises(ConfigError, match="--known-tags scans a --folder"):
        run_detect(DetectConfig(images=missing, known_tags=True))


def test_run_scrub_removes_near_copies_and_writes_manifest(files):
    data = ImageSet.load(files / "imgs.npz")
    data.subset(np.arange(5)).save(files / "gen.npz")  # exact copies of the first five
    out = files / "clean_out.npz"
    cfg = ScrubConfig(data=f"npz:{files / 'imgs.npz'}", generated=parse_generated(f" {files / 'gen.npz'} ,"))
    manifest = run_scrub(cfg, out)
    assert scrub_manifest_path(out) == files / "clean_out.scrub.json"
    assert json.loads(scrub_manifest_path(out).read_text()) == json.loads(json.dumps(manifest))
    assert manifest["summary"]["num_removed"] == 5 and len(ImageSet.load(out)) == 35
    assert manifest["generated"] == [str(files / "gen.npz")] and manifest["near_copy_delta"] == 0.15
    assert manifest["tagger"] is None and manifest["detector"] is None
    with pytest.raises(ConfigError, match="nothing to scrub by"):
        run_scrub(ScrubConfig(data=f"npz:{files / 'imgs.npz'}"), files / "x.npz")
    with pytest.raises(ConfigError, match="--tagger needs --threshold"):
        run_scrub(ScrubConfig(data=f"npz:{files / 'imgs.npz'}", tagger="spread-spectrum", key=1), files / "x.npz")
    assert not (files / "x.npz").exists()


class _Stage:
    """A stand-in stage recording the unit it was asked to run."""

    kind = "sample"

    def __init__(self) -> None:
        self.calls: list = []

    def run_unit(self, config, run_dir, spec, show_progress):
        self.calls.append((config, spec.index, spec.count, show_progress))
        return run_dir / "shards" / spec.name


def test_run_sharded_one_shard_and_option_errors(tmp_path):
    stage = _Stage()
    done = run_sharded(stage, "cfg", tmp_path, ShardOptions(shard="1/3"), show_progress=False)
    assert stage.calls == [("cfg", 1, 3, False)] and done.summary is None
    assert done.folder == tmp_path / "shards" / done.spec.name and done.spec.label == "1/3"
    assert not ShardOptions().active and ShardOptions(engine="ray").active and ShardOptions(shards=2).active
    assert default_shard_count("local") == 1 and default_shard_count("ray") >= 1
    for opts, msg in [
        (ShardOptions(engine="dask"), "--engine 'dask': choose one of local, ray"),
        (ShardOptions(shard="0/2", shards=2), "--shard i/n runs one shard in this process"),
        (ShardOptions(shard="0/2", engine="ray"), "--shard i/n runs one shard in this process"),
        (ShardOptions(shard="2"), "expected i/n"),
        (ShardOptions(shard=""), "expected i/n"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            run_sharded(stage, "cfg", tmp_path, opts)
    with pytest.raises(ConfigError, match="--resume with shards"):
        run_sharded(stage, "cfg", tmp_path, ShardOptions(shards=2), resume=True)
    assert len(stage.calls) == 1


def test_show_source_writes_grid_and_saves(files, tmp_path):
    from diffaudit.data.show import default_grid_path, show_source

    summary = show_source(DataConfig(source=f"npz:{files / 'imgs.npz'}"), tmp_path / "g.png", tmp_path / "s.npz")
    assert summary["grid"] == str(tmp_path / "g.png") and (tmp_path / "g.png").stat().st_size > 0
    assert summary["saved"] == str(tmp_path / "s.npz") and len(ImageSet.load(tmp_path / "s.npz")) == 40
    assert default_grid_path("folder:a/b") == Path("folder_a_b-grid.png")


def test_run_evaluate_rejects_a_bad_delta_and_loads_at_the_samples_shape(files):
    from diffaudit.metrics.evaluate import EvaluateConfig, load_real_like, run_evaluate

    like = ImageSet(np.zeros((2, 1, 16, 16), np.uint8), np.full(2, -1))
    real = load_real_like(f"npz:{files / 'clean.npz'}", like)
    assert real.shape == (1, 16, 16) and len(real) == 40
    with pytest.raises(ConfigError, match="delta=2.0 must be in"):
        run_evaluate(EvaluateConfig(samples=str(files / "imgs.npz"), reference=f"npz:{files / 'clean.npz'}", delta=2.0))
