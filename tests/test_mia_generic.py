"""Membership inference and the Wen detector over any generator: analytic closed forms, LiRA end to end on an
analytic model and on a tiny text-to-image pipeline (same files and keys as the class-model run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.attacks import mia, roc
from diffaudit.attacks.mia_queries import QUERY_ATTACKS
from diffaudit.attacks.mia_run import run_mia
from diffaudit.attacks.mia_setup import build_setup
from diffaudit.attacks.shadow import MiaConfig, merge_shards, run_shard
from diffaudit.cli import app
from diffaudit.config import get_preset
from diffaudit.data.imageset import ImageSet
from diffaudit.detectors import wen
from diffaudit.errors import DataError
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.generators.schedulers import training_scheduler
from diffaudit.runs import RunDir

RESULT_KEYS = {"attacks", "sweep", "pool", "target", "shadows", "timesteps", "seconds", "costs", "skipped"}
WEN_ROW_KEYS = {"label", "name", "noise_gap", "noise_gap_std", "per_seed"}


def _gaussian_pool(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = np.clip(128 + rng.normal(0, 40, (n, 1, 4, 4)), 0, 255).astype(np.uint8)
    return ImageSet(images, np.zeros(n, np.int64), ("x",))


def test_losses_equal_the_closed_form_of_a_fitted_gaussian():
    data = _gaussian_pool(12)
    gen = AnalyticTrainer("gaussian").fit(data.subset(np.arange(8)), None)
    losses = mia.sample_losses(gen, data, (30, 400), noise_draws=2, seed=5)
    x = data.images.reshape(12, -1) / 255.0
    m = x[:8].mean(0)
    cov = 4 * (np.cov(x[:8].T, ddof=0) + 1e-6 * np.eye(16))  # model units y = 2x - 1
    ab = training_scheduler(gen.scheduler_config).alphas_cumprod.double().numpy()
    y0 = 2 * x - 1
    for d in range(2):
        import torch

        eps = np.stack(
            [torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(mia.noise_seed(i, d, 5))).numpy()
             for i in data.ids]
        ).reshape(12, -1)  # fmt: skip
        for j, t in enumerate((30, 400)):
            x_t = np.sqrt(ab[t]) * y0 + np.sqrt(1 - ab[t]) * eps
            s_t = ab[t] * cov + (1 - ab[t]) * np.eye(16)
            pred = np.sqrt(1 - ab[t]) * np.linalg.solve(s_t, (x_t - np.sqrt(ab[t]) * (2 * m - 1)).T).T
            np.testing.assert_allclose(losses[:, j, d], ((pred - eps) ** 2).mean(1), rtol=1e-4)


def test_shards_are_order_independent_and_merge_by_index(tmp_path):
    data = _gaussian_pool(16)
    cfg = MiaConfig(num_shadows=2, timesteps=(50,), noise_draws=1)
    setup, _ = build_setup(cfg, get_preset("digits-8"), data, trainer="gaussian")
    p2, ran2 = run_shard(cfg, setup, 2, tmp_path)
    p1, ran1 = run_shard(cfg, setup, 1, tmp_path)
    assert ran1 and ran2 and run_shard(cfg, setup, 1, tmp_path) == (p1, False)  # a finished shard is not redone
    merged, ids = merge_shards([p1, p2], setup.pool.ids)
    assert merged.shape == (16, 2, 1, 1) and len(set(ids)) == 2
    np.testing.assert_array_equal(merged[:, 1], np.load(p2)["losses"])  # column k is shard k + 1
    with pytest.raises(DataError, match="other candidates"):
        merge_shards([p1], setup.pool.ids[::-1])
    # Order independence of the query: the same images in another order get the same losses per id.
    perm = np.random.default_rng(1).permutation(16)
    model = AnalyticTrainer("gaussian").fit(data, None)
    a = mia.sample_losses(model, data, (50, 300), noise_draws=2, seed=1)
    b = mia.sample_losses(model, data.subset(perm), (50, 300), noise_draws=2, seed=1)
    np.testing.assert_allclose(b, a[perm], rtol=1e-6)


def test_lira_end_to_end_on_an_overfitted_gaussian(tmp_path):
    # 20 members in 16 dimensions: the fitted covariance is nearly singular around them, so members have a much
    # lower loss than non-members; an implementation that mixed up samples or models would sit near AUC 0.5.
    data = _gaussian_pool(40)
    cfg = MiaConfig(num_shadows=4, timesteps=(50, 200), noise_draws=2, selection_fraction=0.5)
    setup, choices = build_setup(cfg, get_preset("digits-8"), data, trainer="gaussian")
    with RunDir(tmp_path / "run", kind="mia") as run:
        results = run_mia(cfg, setup, run, show_progress=False)
    assert set(results) == RESULT_KEYS
    assert choices["steps"]["value"] == 1
    for name in mia.ATTACKS:
        assert results["attacks"][name][roc.AUC] > 0.7, (name, results["attacks"][name][roc.AUC])
    # The analytic model has no network: GSA is skipped with the reason; the other query attacks run.
    assert "not white-box" in results["skipped"]["gsa"] and "gsa" not in results["attacks"]
    assert {"pia", "pian", "secmi-stat", "secmi-nn"} <= set(results["attacks"])
    membership = np.load(tmp_path / "run" / "membership.npz")
    assert membership["shadow_membership"].shape == (4, 40) and membership["shadow_stats"].shape == (40, 4, 2)


def test_wen_larger_for_a_memorizing_condition_on_an_analytic_model():
    rng = np.random.default_rng(0)
    # A condition whose training images are one image copied (a memorized prompt) and a diverse condition that
    # is most of the data, so its prediction is close to the unconditional (null) one.
    one = np.repeat(rng.integers(0, 256, (1, 1, 4, 4)), 4, axis=0)
    many = rng.integers(0, 256, (36, 1, 4, 4))
    data = ImageSet(np.concatenate([one, many]).astype(np.uint8), np.repeat([0, 1], [4, 36]), ("copied", "diverse"))
    gen = AnalyticTrainer("gaussian").fit(data, None)
    report = wen.wen_report(gen, num_seeds=4, num_steps=20, measure_steps=5, show_progress=False)
    rows = {r["name"]: r for r in report["per_label"]}
    assert set(rows["copied"]) == WEN_ROW_KEYS
    assert rows["copied"]["noise_gap"] > 1.5 * rows["diverse"]["noise_gap"]
    direct = gen.guidance_gap(np.zeros(4, np.int64), [0, 1, 2, 3], num_steps=20, measure_steps=5)
    assert rows["copied"]["per_seed"] == direct.tolist()


# ---- a tiny text-to-image pipeline, through the CLI ---------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_and_folders(tmp_path_factory):
    from PIL import Image

    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

    root = tmp_path_factory.mktemp("mia-pipe")
    pipe = save_tiny_pipeline(root / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    rng = np.random.default_rng(0)
    folders = {}
    for name, n in (("members", 6), ("nonmembers", 6)):
        folder = root / name
        folder.mkdir()
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"{name} picture {i % 3}"})
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        folders[name] = folder
    return pipe, folders


FAST = ["--timesteps", "100,500", "--noise-draws", "1", "--steps", "2", "--selection-fraction", "0.5"]
FAST += ["--wen-seeds", "2", "--batch-size", "4"]


def test_pipeline_user_target_with_members_and_shadows(pipeline_and_folders, tmp_path):
    pipe, folders = pipeline_and_folders
    out = tmp_path / "run"
    args = ["mia", "--out", str(out), "--model", str(pipe), "--members", f"captioned:{folders['members']}"]
    args += ["--nonmembers", f"captioned:{folders['nonmembers']}", "--num-shadows", "2", *FAST]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == RESULT_KEYS and set(results["attacks"]) == set(mia.ATTACKS) | set(QUERY_ATTACKS)
    assert results["target"]["user_supplied"] and results["target"]["members"] == 6
    assert results["target"]["family"] == "pipeline"
    assert results["shadows"]["trained_now"] == {"shadow-00": True, "shadow-01": True}
    # Shadows are LoRA fine-tunes: each a new model, different from the target and from each other.
    ids = results["shadows"]["model_ids"]
    assert len(set(ids)) == 2 and results["target"]["model_id"] not in ids
    config = json.loads((out / "config.json").read_text())
    assert config["choices"]["keep_models"]["value"] is False and config["choices"]["lora"]["value"]["rank"] == 4
    assert not (out / "models" / "shadow-00" / "model").exists()
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == 12 and {"score_lira-offline", "loss_t100", "loss_t500"} <= set(scores[0])
    report = json.loads((out / "wen.json").read_text())
    assert len(report["per_label"]) == 6 and set(report["per_label"][0]) == WEN_ROW_KEYS
    assert report["per_label"][0]["name"] == "members picture 0"
    assert all(r["noise_gap"] > 0 for r in report["per_label"])


def test_pipeline_online_setting_and_prompts_for_wen(pipeline_and_folders, tmp_path):
    pipe, folders = pipeline_and_folders
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "run"
    args = ["mia", "--out", str(out), "--model", str(pipe), "--data", f"captioned:{folders['members']}"]
    args += ["--num-shadows", "2", "--prompts", str(prompts), "--keep-models", *FAST]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "results.json").read_text())
    assert not results["target"]["user_supplied"] and results["target"]["members"] == 3
    assert set(results["shadows"]["trained_now"]) == {"target", "shadow-00", "shadow-01"}
    assert (out / "models" / "target" / "model" / "model_index.json").exists()
    report = json.loads((out / "wen.json").read_text())
    assert [r["name"] for r in report["per_label"]] == ["a red circle", "a blue square"]
