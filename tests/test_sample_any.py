"""``diffaudit sample`` on every generator family: a run directory with the same files and keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app, main
from diffaudit.data.imageset import ImageSet
from diffaudit.generators.analytic import AnalyticTrainer
from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

runner = CliRunner()


def _run_sample(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, ["sample", *args])
    return result.exit_code, result.output


def test_pipeline_sample_run_with_prompts_file(tmp_path):
    pipe = save_tiny_pipeline(tmp_path / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": 500}\n')
    out = tmp_path / "run"
    code, text = _run_sample(
        [
            "--model",
            str(pipe),
            "--prompts",
            str(prompts),
            "--num-per-condition",
            "2",
            "--num-steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0, text
    samples = ImageSet.load(out / "samples.npz")
    assert samples.images.shape == (4, 3, 16, 16)
    assert samples.class_names == ("a cat", "a dog") and samples.labels.tolist() == [0, 0, 1, 1]
    assert samples.provenance["seed"].tolist() == [0, 1, 500, 501]  # the file's own first seed wins
    config = json.loads((out / "config.json").read_text())
    assert config["generator"]["family"] == "pipeline" and config["conditions"] == ["a cat", "a dog"]
    assert config["sample"]["guidance_scale"] == 7.5  # a pipeline's own default, recorded
    assert json.loads((out / "manifest.json").read_text())["kind"] == "sample"
    # the same request through sd:PATH gives the same images (the prefix is only a hint)
    code, text = _run_sample(
        ["--model", f"sd:{pipe}", "--prompts", str(prompts), "--num-per-condition", "2", "--num-steps", "3",
         "--out", str(tmp_path / "again")]
    )  # fmt: skip
    assert code == 0, text
    np.testing.assert_array_equal(ImageSet.load(tmp_path / "again" / "samples.npz").images, samples.images)


def _main_exit(args: list[str], capsys) -> tuple[int, str]:
    """Run the console entry point (which turns errors into one line and exit code 2)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code), capsys.readouterr().err


def test_pipeline_without_prompts_is_a_clear_error(tmp_path, capsys):
    pipe = save_tiny_pipeline(tmp_path / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    code, text = _main_exit(["sample", "--model", str(pipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--prompts" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()


def test_analytic_sample_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 255, (30, 1, 4, 4), dtype=np.uint8), np.arange(30) % 2, ("x", "y"))
    trainer = AnalyticTrainer("gaussian")
    trainer.save(trainer.fit(data, None), tmp_path / "g")
    code, text = _run_sample(["--model", str(tmp_path / "g"), "--num-images", "6", "--labels", "y", "--out",
                              str(tmp_path / "run")])  # fmt: skip
    assert code == 0, text
    samples = ImageSet.load(tmp_path / "run" / "samples.npz")
    assert samples.labels.tolist() == [1] * 6 and samples.provenance["seed"].tolist() == list(range(6))
    code, text = _main_exit(
        ["sample", "--model", str(tmp_path / "g"), "--watermark", "sd-v1", "--out", str(tmp_path / "w")], capsys
    )
    assert code == 2 and "256" in text and not (tmp_path / "w").exists()


def test_speed_flags_are_applied_recorded_and_checked(tmp_path, capsys):
    pipe = save_tiny_pipeline(tmp_path / "pipe", TinyPipelineConfig(resolution=16, vae_channels=(4, 8)), seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    common = ["--model", str(pipe), "--prompts", str(prompts), "--num-images", "2", "--num-steps", "3"]
    code, text = _run_sample([*common, "--out", str(tmp_path / "plain")])
    assert code == 0, text
    code, text = _run_sample([*common, "--channels-last", "--autocast", "bf16", "--out", str(tmp_path / "fast")])
    assert code == 0, text
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert config["autocast"] == "bf16" and config["channels_last"] is True
    assert config["sampling_speed"]["autocast_active"] is False  # CPU: recorded, not applied
    assert "sampling_speed" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = ImageSet.load(tmp_path / "plain" / "samples.npz").images.astype(np.int16)
    fast = ImageSet.load(tmp_path / "fast" / "samples.npz").images.astype(np.int16)
    assert np.abs(fast - plain).max() <= 1  # a memory layout, not another model
    code, text = _main_exit(["sample", *common, "--autocast", "fp8", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "autocast" in text and not (tmp_path / "bad").exists()


def test_speed_options_refused_for_a_generator_without_a_denoising_network(monkeypatch):
    # Every built-in family denoises; a user's own Generator implementation need not.
    import diffaudit.generators.select as select
    from diffaudit.errors import ConfigError
    from diffaudit.sampling import SampleRunConfig, _open

    class Plain:
        def describe(self) -> dict:
            return {"family": "plain"}

    monkeypatch.setattr(select, "open_generator", lambda *a, **k: (Plain(), {}))
    _open(SampleRunConfig(model="x"))  # no speed-ups asked: fine
    with pytest.raises(ConfigError, match="denoising network"):
        _open(SampleRunConfig(model="x", channels_last=True))
