"""Training-data extraction: the filter on planted cliques, matching, calibration, untargeted mode, canaries, and
the CLI end to end on a tiny class-conditional train run (see test_extract_generators.py for other families)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.attacks import extraction as ex
from diffaudit.attacks.calibration import calibrate_edge_threshold, roc_from_distances, threshold_at_fpr
from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError

SHAPE = (1, 8, 8)


def _train_set(n: int = 40, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, size=(n, *SHAPE), dtype=np.uint8), np.zeros(n, np.int64), ("x",))


def _noisy_copies(image: np.ndarray, n: int, std: float, rng: np.random.Generator) -> np.ndarray:
    x = image[None].astype(np.float32) + rng.normal(0, std * 255, size=(n, *image.shape))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _generations(images: np.ndarray, seed0: int = 0) -> ImageSet:
    n = len(images)
    return ImageSet(images, np.zeros(n, np.int64), ("x",), {"seed": np.arange(seed0, seed0 + n), "synthetic": True})


def _planted(train: ImageSet, target: int, copies: int, n: int, seed: int) -> ImageSet:
    """``n`` generations: ``copies`` noisy copies of train image ``target`` hidden among random images."""
    rng = np.random.default_rng(seed)
    gens = rng.integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)
    where = rng.choice(n, size=copies, replace=False)
    gens[where] = _noisy_copies(train.images[target], copies, 0.01, rng)
    return _generations(gens)


def test_planted_clique_is_found_and_matched():
    train = _train_set()
    gens = _planted(train, target=7, copies=12, n=60, seed=1)
    params = ex.ExtractionParams(edge_threshold=0.1, min_clique=10)
    rec = ex.scan_label(gens, train, params, label=0, label_name="x")
    assert rec[ex.FLAGGED] and rec[ex.CLIQUE_SIZE] == 12
    assert rec[ex.NEAREST_TRAIN_INDEX] == 7 and rec[ex.NEAREST_TRAIN_ID] == train.ids[7]
    assert rec[ex.EXTRACTED] and rec[ex.NEAREST_TRAIN_DISTANCE] < 0.05
    assert rec[ex.EIDETIC_K] == 1
    assert rec[ex.REPRESENTATIVE] in rec[ex.MEMBERS]
    assert 0 < rec[ex.MEAN_DISTANCE] < 0.1


def test_no_clique_is_not_flagged_and_min_clique_matters():
    train = _train_set()
    rng = np.random.default_rng(2)
    gens = _generations(rng.integers(0, 256, size=(50, *SHAPE), dtype=np.uint8))
    rec = ex.scan_label(gens, train, ex.ExtractionParams(), 0, "x")
    assert not rec[ex.FLAGGED] and rec[ex.CLIQUE_SIZE] < 10
    # 9 copies: a clique, but below the paper's k = 10.
    rec9 = ex.scan_label(_planted(train, 3, 9, 50, seed=3), train, ex.ExtractionParams(), 0, "x")
    assert rec9[ex.CLIQUE_SIZE] == 9 and not rec9[ex.FLAGGED]


def test_extracted_depends_on_delta_and_eidetic_k_counts_duplicates():
    train = _train_set()
    # Duplicate training image 5 three times: eidetic k of a match to it is 3.
    train = ImageSet.concat([train, train.subset([5, 5])])
    far = np.clip(train.images[5].astype(np.int16) + 40, 0, 255).astype(np.uint8)  # l2 ~ 0.15
    queries = np.stack([train.images[5], far])
    d = ex.match_training(queries, train, delta=0.15)
    assert d[ex.EIDETIC_K][0] == 3 and d[ex.EXTRACTED][0]
    loose, tight = ex.match_training(queries, train, 0.5), ex.match_training(queries, train, 0.01)
    assert loose[ex.EXTRACTED][1] and not tight[ex.EXTRACTED][1]


def test_several_cliques_are_peeled_when_asked():
    train = _train_set()
    rng = np.random.default_rng(5)
    gens = rng.integers(0, 256, size=(60, *SHAPE), dtype=np.uint8)
    gens[:11] = _noisy_copies(train.images[1], 11, 0.01, rng)
    gens[20:32] = _noisy_copies(train.images[2], 12, 0.01, rng)
    one = ex.find_cliques(_generations(gens), ex.ExtractionParams())
    two = ex.find_cliques(_generations(gens), ex.ExtractionParams(max_cliques=5))
    assert len(one) == 1 and one[0][ex.CLIQUE_SIZE] == 12
    assert [c[ex.CLIQUE_SIZE] for c in two] == [12, 11]


def test_calibration_separates_copies_from_other_images():
    train = _train_set(80)
    cal = calibrate_edge_threshold(train, grid=4, target_fpr=0.01, num_pairs=400, noise_std=0.03, seed=0)
    assert cal.fpr <= 0.01 and cal.tpr > 0.95 and cal.auc > 0.99
    fpr, tpr, cuts = roc_from_distances(np.array([0.1, 0.2]), np.array([0.15, 0.3]))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(cuts) > 0)
    assert threshold_at_fpr(np.array([0.3, 0.1, 0.2, 0.4]), 0.25) == 0.2  # one of four below 0.2 is 25%
    with pytest.raises(ConfigError):
        threshold_at_fpr(np.array([0.1]), 1.5)


def test_untargeted_adaptive_ratio_flags_a_planted_copy():
    train = _train_set(60)
    rng = np.random.default_rng(6)
    gens = rng.integers(0, 256, size=(20, *SHAPE), dtype=np.uint8)
    gens[4] = _noisy_copies(train.images[9], 1, 0.01, rng)[0]
    out = ex.untargeted_extraction(_generations(gens), train, n_neighbors=50)
    assert out["extracted_and_within_delta_train_ids"] == [str(train.ids[9])]
    assert [p["generation"] for p in out["pairs"]] == [4]


def test_canary_report_rates_precision_and_recall():
    train = _train_set(30)
    train = ImageSet(train.images, np.arange(30) % 3, ("a", "b", "c"))
    train = ImageSet.concat([train, train.subset([4] * 3)])  # image 4 has 4 copies
    canaries = [{"id": str(train.ids[4]), "index": 4, "label": 1, "copies": 4}]
    canaries.append({"id": str(train.ids[8]), "index": 8, "label": 2, "copies": 1})
    rng = np.random.default_rng(8)
    sets = [_generations(rng.integers(0, 256, size=(30, *SHAPE), dtype=np.uint8), 30 * k) for k in range(3)]
    sets[1].images[:15] = _noisy_copies(train.images[4], 15, 0.01, rng)  # label 1 memorized canary 4
    records = [ex.scan_label(g, train, ex.ExtractionParams(), k, "abc"[k]) for k, g in enumerate(sets)]
    assert [r[ex.FLAGGED] for r in records] == [False, True, False] and records[1][ex.EIDETIC_K] == 4
    assert records[1][ex.MEMBER_IDS] == [str(sets[1].ids[m]) for m in records[1][ex.MEMBERS]]
    summary = ex.summarize(records)
    assert summary[ex.NUM_FLAGGED] == 1 and summary[ex.EXTRACTED_TRAIN_IDS] == [str(train.ids[4])]
    rep = ex.canary_report(records, canaries, train, ImageSet.concat(sets))
    assert rep["by_copies"]["4"]["clique_rate"] == 1.0 and rep["by_copies"]["1"]["clique_rate"] == 0.0
    assert rep["precision"] == 1.0 and rep["recall"] == 0.5
    assert rep["per_canary"][0]["nearest_generation_seed"] in range(30, 45)


TINY = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "train.batch_size=8", "train.steps=4"]


@pytest.fixture(scope="module")
def tiny_train_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ex") / "train"
    sets = [a for s in TINY + ["data.canaries=[1,4]", "data.subset=60"] for a in ("--set", s)]
    res = CliRunner().invoke(app, ["train", "--out", str(run), "--grid-images", "0", *sets])
    assert res.exit_code == 0, res.output
    return run


def test_cli_end_to_end_and_resume(tiny_train_run, tmp_path):
    out = tmp_path / "extract"
    base = ["extract", "--model", str(tiny_train_run), "--out", str(out), "--per-label", "12", "--labels", "0,1"]
    base += ["--num-steps", "2", "--grid", "2", "--min-clique", "3", "--untargeted", "--calibrate"]
    base += ["--calibration-pairs", "200"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"params", "labels", "summary", "untargeted", "canaries", "edge_threshold", "model_id"}
    assert results["edge_threshold"]["source"] == "calibrated" and "roc" in results["edge_threshold"]["calibration"]
    assert [r["label"] for r in results["labels"]] == [0, 1]
    assert {ex.CLIQUE_SIZE, ex.NEAREST_TRAIN_ID, ex.EIDETIC_K, ex.EXTRACTED} <= set(results["labels"][0])
    assert set(results["canaries"]["by_copies"]) == {"1", "4"}
    for name in (
        "generations.npz",
        "extracted_pairs.png",
        "roc.png",
        "config.json",
        "manifest.json",
        "extraction_vs_duplication.png",
    ):
        assert (out / name).exists(), name
    assert len(ImageSet.load(out / "generations.npz")) == 24
    config = json.loads((out / "config.json").read_text())
    assert config["per_label"] == 12 and "reasons" in config
    # Resume of a finished run regenerates nothing and gives the same results.
    res2 = CliRunner().invoke(app, [*base, "--resume"])
    assert res2.exit_code == 0, res2.output
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == results["summary"] and again["labels"] == results["labels"]
    # Refuses to overwrite without --resume.
    res3 = CliRunner().invoke(app, base)
    assert isinstance(res3.exception, ConfigError) and "pass --resume" in str(res3.exception)


def test_clique_budget_overrun_is_recorded_not_fatal():
    rng = np.random.default_rng(7)
    gens = _generations(_noisy_copies(_train_set().images[0], 30, 0.005, rng))
    (small,) = ex.find_cliques(gens, ex.ExtractionParams(max_clique_nodes=5))
    assert small[ex.CLIQUE_EXACT] is False
    (full,) = ex.find_cliques(gens, ex.ExtractionParams())
    assert full[ex.CLIQUE_EXACT] and full[ex.CLIQUE_SIZE] == 30 and full[ex.FLAGGED]
