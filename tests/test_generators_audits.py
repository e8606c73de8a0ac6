"""Audits that take any generator, checked on the families the other test files do not cover.

* guarded sampling (``sample --guard``) on the analytic generator and the tiny text-to-image pipeline;
* the report's regurgitation card on a real extraction run of each family (not a fake run directory).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffaudit.config import SampleConfig
from diffaudit.data.imageset import ImageSet
from diffaudit.generators import load_generator
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline
from diffaudit.guards.copy_filter import CopyFilter
from diffaudit.guards.guarded_sampling import guarded_generate, retry_seed
from diffaudit.guards.index import build_index

FAST = SampleConfig(sampler="ddim", num_steps=2, guidance_scale=2.0, temperature=1.0, batch_size=8)


@pytest.fixture(scope="module")
def analytic_dir(tmp_path_factory):
    """Gaussians per condition; condition 2 was fit to 5 copies of one image, so it only emits that image."""
    tmp = tmp_path_factory.mktemp("an")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(45, 1, 8, 8), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], [20, 20, 5])
    images[labels == 2] = images[40]
    data = ImageSet(images, labels, ("a", "b", "mem"))
    AnalyticTrainer("gaussian").save(AnalyticTrainer("gaussian").fit(data, None), tmp / "model")
    data.save(tmp / "train.npz")
    return tmp, data


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    return save_tiny_pipeline(tmp / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)


def _own_outputs_filter(gen, labels, seeds) -> CopyFilter:
    """A copy filter whose index holds exactly the generator's first outputs for these seeds (all copies)."""
    first = gen.sample(labels, seeds, num_steps=2)
    noise = np.random.default_rng(1).integers(0, 256, size=(40, *first.shape), dtype=np.uint8)
    holdout = ImageSet(noise, np.full(40, -1))
    return CopyFilter(build_index(first, holdout=holdout, target_fpr=0.05))


@pytest.mark.parametrize("family", ["analytic", "pipeline"])
def test_guarded_sampling_resamples_copies_on_every_family(family, analytic_dir, pipeline_dir):
    if family == "analytic":
        gen = load_generator(analytic_dir[0] / "model")
        labels = np.array([0, 1, 0, 1])
    else:
        gen = load_generator(pipeline_dir, conditions=["a cat", "a dog"], device="cpu")
        labels = np.array([0, 1, 0, 1])
    seeds = [3, 4, 5, 6]
    copy_filter = _own_outputs_filter(gen, labels, seeds)
    out, record = guarded_generate(gen, labels, seeds, {"num_steps": 2}, copy_filter, max_retries=2)
    # Every first attempt reproduces an indexed image, so each is blocked (and re-sampled with a retry seed).
    assert {(b["position"], b["seed"]) for b in record["blocked"] if b["attempt"] == 0} == set(enumerate(seeds))
    assert record["num_images_resampled"] == 4
    if family == "analytic":  # new seeds give new draws, which pass
        assert record["num_gave_up"] == 0 and len(out) == 4
        for used, s in zip(out.provenance["seed"].tolist(), seeds, strict=True):
            assert used in (retry_seed(s, 1), retry_seed(s, 2))
        assert not copy_filter.blocked_mask(out).any()
        assert set(out.provenance["model_id"]) == {gen.model_id}
    else:  # a random-weight pipeline makes nearly the same image for every seed: it gives up after the bound
        assert record["num_gave_up"] == 4 and len(out) == 0
        assert record["gave_up"][0]["seeds_tried"] == [seeds[0], retry_seed(seeds[0], 1), retry_seed(seeds[0], 2)]


def test_report_regurgitation_card_reads_every_family(analytic_dir, pipeline_dir, tmp_path):
    """The report's verdict comes from the result files, so a pipeline run reads like a class-model run."""
    from PIL import Image

    from diffaudit.attacks import extraction_run as er
    from diffaudit.report.files import load_run
    from diffaudit.report.verdicts import summary_cards

    tmp, _ = analytic_dir
    er.run_extract(
        er.ExtractConfig(model=str(tmp / "model"), data=f"npz:{tmp / 'train.npz'}", per_label=12, grid=2,
                         sample=FAST, show_progress=False),
        tmp_path / "analytic",
    )  # fmt: skip
    caps = tmp_path / "caps"
    caps.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(caps / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i % 2}"}))
    (caps / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    er.run_extract(
        er.ExtractConfig(model=str(pipeline_dir), data=f"captioned:{caps}", per_label=3, grid=2, sample=FAST,
                         min_clique=2, show_progress=False),
        tmp_path / "pipeline",
    )  # fmt: skip
    for name, expect_risk in (("analytic", True), ("pipeline", False)):
        card = {c.risk: c for c in summary_cards([load_run(tmp_path / name, 0)])}["regurgitation"]
        result = json.loads((tmp_path / name / "results.json").read_text())
        extracted = result["summary"]["num_extracted"]
        assert (extracted > 0) == expect_risk, (name, extracted)
        assert str(extracted) in card.number and card.links == [("run-0-" + name + "-evidence", name)]
