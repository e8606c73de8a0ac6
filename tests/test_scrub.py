"""Scrubbing: tagged images and near-copies of generated sets are removed, the rest kept, with a manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.data.sources import load_source
from diffaudit.errors import ConfigError, DataError
from diffaudit.guards.perturb import gaussian_noise
from diffaudit.guards.scrub import (
    RULE_NEAR_COPY,
    RULE_TAGGED,
    LoopTagger,
    make_loop_filter,
    scrub,
    scrub_summary,
    tag_name,
)
from diffaudit.guards.tagging import get_tagger

runner = CliRunner()
KEY, AMPLITUDE = 7, 6.0


@pytest.fixture(scope="module")
def mixed():
    """60 real faces, 20 tagged faces, 20 noisy copies of a generated set; plus 20 clean faces to calibrate."""
    faces = load_source("faces")
    tagger = get_tagger("spread-spectrum", key=KEY, amplitude=AMPLITUDE)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(20, 1, 5, 5)).astype(np.uint8)
    generated = ImageSet(np.kron(coarse, np.ones((1, 1, 5, 5), np.uint8)), np.full(20, -1))  # blocky 25x25
    tagged = ImageSet(tagger.embed(faces.images[60:80]), faces.labels[60:80], faces.class_names)
    near = ImageSet(gaussian_noise(generated.images, sigma=3.0, seed=1), np.full(20, -1))
    data = ImageSet.concat(
        [
            faces.subset(np.arange(60)),
            tagged.with_provenance(synthetic=True, tag="ss"),
            ImageSet(near.images, near.labels, faces.class_names).with_provenance(synthetic=True),
        ]
    )
    threshold = tagger.calibrate(faces.images[80:], 0.05)
    return data, generated, tagger, threshold


def test_scrub_removes_tagged_and_near_copies(mixed):
    data, generated, tagger, threshold = mixed
    kept, removed = scrub(data, tagger, threshold, [generated], delta=0.15)
    by_index = {r["index"]: r for r in removed}
    assert all(RULE_TAGGED in by_index[i]["rules"] for i in range(60, 80))
    assert all(RULE_NEAR_COPY in by_index[i]["rules"] for i in range(80, 100))
    assert by_index[80]["near_copy_id"] == generated.ids[0] and by_index[80]["near_copy_distance"] < 0.15
    real_removed = [i for i in by_index if i < 60]
    assert len(real_removed) <= 6  # calibrated at 5% on 20 clean faces
    assert len(kept) == 100 - len(removed) and set(kept.ids) == set(
        data.ids[[i for i in range(100) if i not in by_index]]
    )
    summary = scrub_summary(data, removed)
    assert summary["synthetic_in"] == 40 and summary["synthetic_slipped"] == 0
    assert summary["real_removed"] == len(real_removed)


def test_scrub_single_rules_and_errors(mixed):
    data, generated, tagger, threshold = mixed
    kept, removed = scrub(data, generated=[generated])
    assert sorted(r["index"] for r in removed) == list(range(80, 100)) and removed[0]["tag_score"] is None
    kept, removed = scrub(data.subset(np.arange(60)), tagger, 1.0)  # nothing scores above 1
    assert len(kept) == 60 and removed == []
    with pytest.raises(ConfigError, match="threshold"):
        scrub(data, tagger)
    with pytest.raises(DataError, match="shape"):
        scrub(data, generated=[ImageSet(np.zeros((2, 1, 8, 8), np.uint8), np.full(2, -1))])


def test_loop_filter_hook(mixed):
    data, generated, tagger, threshold = mixed
    filter_fn = make_loop_filter(tagger, threshold, remember_removed=True)
    kept, report = filter_fn(data, 3)
    assert report["generation"] == 3 and report["synthetic_in"] == 40
    assert report["removed_by_rule"][RULE_TAGGED] >= 20
    # Untagged near-copies slip through a tag-only filter, and the report says so from provenance.
    assert report["synthetic_slipped"] == 20 and len(kept) == report["num_kept"]
    # remember_removed: a later generation's near-copy of a removed (tagged) image is caught by distance.
    again = ImageSet(gaussian_noise(data.images[60:62], sigma=1.0, seed=9), np.full(2, -1))
    _, report2 = filter_fn(again, 4)
    assert report2["removed_by_rule"][RULE_NEAR_COPY] == 2


def test_scrub_cli_writes_clean_set_and_manifest(tmp_path, mixed):
    data, generated, tagger, threshold = mixed
    data.save(tmp_path / "data.npz")
    generated.save(tmp_path / "gen.npz")
    out = tmp_path / "clean.npz"
    r = runner.invoke(
        app,
        ["scrub", "--data", f"npz:{tmp_path / 'data.npz'}", "--out", str(out), "--tagger", "spread-spectrum",
         "--key", str(KEY), "--threshold", str(threshold), "--generated", str(tmp_path / "gen.npz")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "clean.scrub.json").read_text())
    clean = ImageSet.load(out)
    assert manifest["summary"]["num_kept"] == len(clean) and manifest["summary"]["synthetic_slipped"] == 0
    assert {rule for row in manifest["removed"] for rule in row["rules"]} == {RULE_TAGGED, RULE_NEAR_COPY}
    assert not clean.provenance["synthetic"].any()
    r = runner.invoke(app, ["scrub", "--data", f"npz:{tmp_path / 'data.npz'}", "--out", str(out)])
    assert isinstance(r.exception, ConfigError)


def test_loop_tagger_tags_and_measures_inherited_tags(mixed):
    data, _, tagger, threshold = mixed
    tag_fn = LoopTagger(tagger, threshold)
    real = data.subset(np.arange(60))
    out = tag_fn(real, 2)
    assert set(out.provenance["tag"]) == {tag_name(tagger)} and tagger.detect(out.images, threshold).all()
    assert tag_fn.inherited[2] <= 0.1  # untagged inputs: few look tagged
    tag_fn(out, 3)  # already-tagged inputs (a model that reproduced the tag) are counted as inherited
    assert tag_fn.inherited[3] == 1.0


class _BrightnessDetector:
    """A stand-in detector: score = mean brightness (the scrub rule only needs ``scores`` and ``threshold``)."""

    method = "brightness"

    def score(self, images):
        return images.images.reshape(len(images), -1).mean(axis=1)

    def describe(self):
        return {"method": self.method}


def test_scrub_by_tagless_detector_and_loop_hook():
    from diffaudit.detectors.synthetic import CalibratedDetector
    from diffaudit.guards.scrub import RULE_DETECTED

    rng = np.random.default_rng(0)
    real = ImageSet(rng.integers(0, 100, (30, 1, 8, 8), dtype=np.uint8), np.full(30, -1))
    fake = ImageSet(rng.integers(150, 255, (10, 1, 8, 8), dtype=np.uint8), np.full(10, -1))
    data = ImageSet.concat([real, fake.with_provenance(synthetic=True)])
    det = CalibratedDetector(_BrightnessDetector(), threshold=120.0, target_fpr=0.01, achieved_fpr=0.0,
                             num_calibration=99)  # fmt: skip
    kept, removed = scrub(data, detector=det)
    assert sorted(r["index"] for r in removed) == list(range(30, 40))
    assert all(r["rules"] == [RULE_DETECTED] and r["detector_score"] > 120 for r in removed)
    assert removed[0]["detector_threshold"] == 120.0 and removed[0]["tag_score"] is None
    _, report = make_loop_filter(None, None, detector=det)(data, 2)
    assert report["removed_by_rule"] == {RULE_TAGGED: 0, RULE_DETECTED: 10, RULE_NEAR_COPY: 0}
    assert report["synthetic_slipped"] == 0 and report["real_removed"] == 0
