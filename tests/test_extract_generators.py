"""``run_extract`` / ``diffaudit extract`` over every generator family: analytic (a planted clique), a tiny
text-to-image pipeline (prompts file or captioned data), resume, and the errors of a pipeline without prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffaudit.attacks import extraction as ex
from diffaudit.attacks import extraction_run as er
from diffaudit.cli import app
from diffaudit.config import SampleConfig
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError

FAST = SampleConfig(sampler="ddim", num_steps=2, guidance_scale=2.0, temperature=1.0, batch_size=8)
RESULT_KEYS = {"params", "edge_threshold", "model_id", "labels", "summary"}
RUN_FILES = ("results.json", "config.json", "manifest.json", "metrics.jsonl", "generations.npz", "extracted_pairs.png")
MEMORIZED = 2  # the analytic model's condition with (near) zero variance


@pytest.fixture(scope="module")
def analytic(tmp_path_factory):
    """A Gaussian per condition; condition "mem" was fit to 5 copies of one image, so it only emits that image."""
    from diffaudit.generators.analytic import AnalyticTrainer

    tmp = tmp_path_factory.mktemp("analytic")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(45, 1, 8, 8), dtype=np.uint8)
    labels = np.repeat([0, 1, MEMORIZED], [20, 20, 5])
    images[labels == MEMORIZED] = images[40]
    data = ImageSet(images, labels, ("a", "b", "mem"))
    gen = AnalyticTrainer("gaussian").fit(data, None, 0, 0)
    AnalyticTrainer("gaussian").save(gen, tmp / "model")
    data.save(tmp / "train.npz")
    return tmp, data


def _config(model, data, **kw) -> er.ExtractConfig:
    kw.setdefault("per_label", 12)
    kw.setdefault("grid", 2)
    kw.setdefault("sample", FAST)
    return er.ExtractConfig(model=str(model), data=data, show_progress=False, **kw)


def test_planted_clique_of_an_analytic_model_is_found_and_matched(analytic, tmp_path):
    tmp, data = analytic
    res = er.run_extract(_config(tmp / "model", f"npz:{tmp / 'train.npz'}", seed=100), tmp_path / "run")
    assert set(res) == RESULT_KEYS
    by_label = {r[ex.LABEL]: r for r in res["labels"]}
    assert sorted(by_label) == [0, 1, 2] and by_label[2][ex.LABEL_NAME] == "mem"
    mem = by_label[MEMORIZED]
    # Every generation of the memorized condition is the training image: one clique of all of them.
    assert mem[ex.FLAGGED] and mem[ex.CLIQUE_SIZE] == 12 and mem[ex.CLIQUE_EXACT]
    assert mem[ex.MEMBER_SEEDS] == list(range(100 + 2 * 12, 100 + 3 * 12))  # position 2 of the scan
    assert mem[ex.EXTRACTED] and mem[ex.NEAREST_TRAIN_DISTANCE] < 0.01
    assert data.labels[mem[ex.NEAREST_TRAIN_INDEX]] == MEMORIZED and mem[ex.EIDETIC_K] == 5
    assert not by_label[0][ex.FLAGGED] and not by_label[1][ex.FLAGGED]
    assert res["summary"][ex.NUM_FLAGGED] == 1 and res["summary"][ex.EXTRACTED_TRAIN_IDS] == [str(data.ids[40])]
    gens = ImageSet.load(tmp_path / "run" / "generations" / "label_2.npz")
    assert mem[ex.MEMBER_IDS] == [str(i) for i in gens.ids]
    for name in RUN_FILES:
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["kind"] == "extract"


def test_resume_skips_finished_conditions(analytic, tmp_path, monkeypatch):
    tmp, _ = analytic
    cfg = _config(tmp / "model", f"npz:{tmp / 'train.npz'}", labels="a,mem")
    first = er.run_extract(cfg, tmp_path / "run")
    # "Lose" condition 2 (its row and images): a resume regenerates only that one and gets the same result.
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r[ex.LABEL] != MEMORIZED))
    calls: list[int] = []
    real = er.scan_condition

    def counted(gen, label, *args, **kw):
        calls.append(label)
        return real(gen, label, *args, **kw)

    monkeypatch.setattr(er, "scan_condition", counted)
    second = er.run_extract(er.ExtractConfig(**{**cfg.__dict__, "resume": True}), tmp_path / "run")
    assert calls == [MEMORIZED]
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)
    with pytest.raises(ConfigError, match="pass --resume"):
        er.run_extract(cfg, tmp_path / "run")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny random pipeline at 16 px, a captioned folder of 3 images (2 captions) and a prompts file."""
    from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

    tmp = tmp_path_factory.mktemp("pipe")
    path = save_tiny_pipeline(tmp / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    caps = tmp / "caps"
    caps.mkdir()
    rng = np.random.default_rng(1)
    for i, caption in enumerate(["a red circle", "a blue square", "a red circle"]):
        Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(caps / f"{i}.png")
        (caps / f"{i}.txt").write_text(caption)
    (tmp / "prompts.txt").write_text("a blue square\na green star\n")
    return tmp, path


def _check_pipeline_run(out, prompts: list[str], per_label: int) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert set(res) == RESULT_KEYS
    assert [r[ex.LABEL_NAME] for r in res["labels"]] == prompts
    everything = ImageSet.load(out / "generations.npz")
    assert everything.images.shape == (len(prompts) * per_label, 3, 16, 16)
    for pos, r in enumerate(res["labels"]):
        assert r[ex.NUM_GENERATED] == per_label and r[ex.SEEDS] == [pos * per_label, (pos + 1) * per_label - 1]
        part = everything.subset(np.arange(pos * per_label, (pos + 1) * per_label))
        assert r[ex.MEMBER_IDS] == [str(part.ids[m]) for m in r[ex.MEMBERS]]
        assert r[ex.MEMBER_SEEDS] == [int(part.provenance["seed"][m]) for m in r[ex.MEMBERS]]
        assert r[ex.NEAREST_TRAIN_ID] is not None and r[ex.EIDETIC_K] >= 1
    return res


def test_pipeline_with_captioned_data_library(pipeline, tmp_path, analytic):
    tmp, path = pipeline
    cfg = _config(path, f"captioned:{tmp / 'caps'}", per_label=4, min_clique=2)
    er.run_extract(cfg, tmp_path / "run")
    res = _check_pipeline_run(tmp_path / "run", ["a red circle", "a blue square"], 4)
    # The same keys as a class-family run, per condition too.
    atmp, _ = analytic
    other = er.run_extract(_config(atmp / "model", f"npz:{atmp / 'train.npz'}", labels="a"), tmp_path / "an")
    assert set(other) == set(res) and set(other["labels"][0]) == set(res["labels"][0])
    assert set(other["summary"]) == set(res["summary"])


def test_pipeline_with_prompts_file_cli(pipeline, tmp_path):
    tmp, path = pipeline
    out = tmp_path / "run"
    args = [
        "extract",
        "--model",
        f"sd:{path}",
        "--prompts",
        str(tmp / "prompts.txt"),
        "--data",
        f"folder:{tmp / 'caps'}",
    ]
    args += ["--out", str(out), "--per-label", "3", "--num-steps", "2", "--grid", "2", "--min-clique", "2"]
    res = CliRunner().invoke(app, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    _check_pipeline_run(out, ["a blue square", "a green star"], 3)
    config = json.loads((out / "config.json").read_text())
    assert config["generator"]["model_id"] == config["model_id"] and config["per_label"] == 3


def test_pipeline_without_prompts_is_a_clear_error(pipeline, tmp_path, capsys):
    from diffaudit.cli import main

    tmp, path = pipeline
    out = tmp_path / "run"
    args = ["extract", "--model", str(path), "--data", f"folder:{tmp / 'caps'}", "--out", str(out), "--per-label", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)  # the console entry point: a DiffauditError is one line and exit code 2
    assert exit_info.value.code == 2
    said = capsys.readouterr().err
    assert "needs conditions" in said and "--prompts" in said and str(path) in said
    assert not out.exists()  # refused before the run directory was created


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="not both"):
        er.ExtractConfig(model="m", edge_threshold=0.1, calibration=er.CalibrationConfig())
    with pytest.raises(ConfigError, match="give a model"):
        er.ExtractConfig()
    with pytest.raises(ConfigError, match="min clique"):
        er.ExtractConfig(model="m", min_clique=1)


def test_cli_defaults_agree_with_the_library():
    from diffaudit.attacks import calibration
    from diffaudit.cli import extract as cli

    assert cli.DEFAULT_PER_LABEL == ex.DEFAULT_PER_LABEL and cli.DEFAULT_EDGE_THRESHOLD == ex.DEFAULT_EDGE_THRESHOLD
    assert cli.DEFAULT_MIN_CLIQUE == ex.DEFAULT_MIN_CLIQUE and cli.DEFAULT_DELTA == ex.DEFAULT_DELTA
    assert cli.DEFAULT_TARGET_FPR == calibration.DEFAULT_TARGET_FPR
    assert cli.DEFAULT_NUM_PAIRS == calibration.DEFAULT_NUM_PAIRS
    assert cli.DEFAULT_NOISE_STD == calibration.DEFAULT_NOISE_STD
