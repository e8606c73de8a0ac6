"""`diffaudit tag` / `diffaudit detect`: round trip with a calibrated threshold, and known public tags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError
from diffaudit.guards.tags_dwt import DwtDctTagger

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tag")
    faces = load_source("faces")
    faces.subset(np.arange(50)).save(d / "imgs.npz")
    faces.subset(np.arange(50, 100)).save(d / "clean.npz")
    return d


def test_tag_then_detect_round_trip(files):
    tagged = files / "tagged.npz"
    r = runner.invoke(
        app,
        ["tag", "--images", str(files / "imgs.npz"), "--tagger", "spread-spectrum", "--key", "1234",
         "--amplitude", "6", "--out", str(tagged)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    t = ImageSet.load(tagged)
    assert set(t.provenance["tag"]) == {"spread-spectrum:key=1234,amplitude=6"}
    assert not np.intersect1d(t.ids, ImageSet.load(files / "imgs.npz").ids).size  # new content, new ids

    def detect(images, *extra):
        out = files / "det.json"
        args = ["detect", "--images", str(images), "--key", "1234", "--out", str(out), *extra]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        return json.loads(out.read_text())

    hit = detect(tagged, "--calibrate-on", str(files / "clean.npz"), "--target-fpr", "0.02")
    assert hit["num_tagged"] >= 48 and hit["threshold_source"].startswith("calibrated")
    miss = detect(files / "imgs.npz", "--threshold", str(hit["threshold"]))
    assert miss["num_tagged"] <= 3
    # No threshold and nothing to calibrate on: refused, not guessed.
    r = runner.invoke(app, ["detect", "--images", str(tagged), "--key", "1234"])
    assert isinstance(r.exception, ConfigError)


def test_detect_known_tags_in_folder(tmp_path):
    from skimage import data as skdata

    img = skdata.astronaut()[100:356, 150:406]  # 256x256 RGB
    clean = np.ascontiguousarray(img.transpose(2, 0, 1))[None]
    tagged = DwtDctTagger("sd-v1").embed(clean)
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(tagged[0].transpose(1, 2, 0)).save(folder / "a_tagged.png")
    Image.fromarray(clean[0].transpose(1, 2, 0)).save(folder / "b_clean.png")
    Image.fromarray(clean[0, 0, :64, :64]).save(folder / "c_small_grey.png")
    out = tmp_path / "known.json"
    r = runner.invoke(app, ["detect", "--folder", str(folder), "--known-tags", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["file"]: row for row in json.loads(out.read_text())["images"]}
    assert rows["a_tagged.png"]["tag"] == "sd-v1" and rows["a_tagged.png"]["bit_accuracy"]["sd-v1"] > 0.9
    assert rows["b_clean.png"]["tag"] == ""
    assert rows["c_small_grey.png"]["tag"] == "" and rows["c_small_grey.png"]["note"]
