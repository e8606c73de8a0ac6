"""The damage map (loop sweep): monotone damage on the Gaussian backend, resume per cell, merging runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.loop.config import LoopConfig, replace_config
from diffaudit.loop.sweep import SweepSpec, build_map, collect_cells, merge_sweeps, run_sweep

K = 4


def _real(n: int = 160, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    images = (rng.integers(0, 60, size=(n, 1, 4, 4)) + 40 * labels[:, None, None, None]).astype(np.uint8)
    return ImageSet(images, labels, tuple("abcd"), {"source": "toy"})


def _base(**fields) -> LoopConfig:
    cfg = LoopConfig(
        backend="gaussian",
        train_size=32,
        poison_generations=1,
        heal_generations=1,
        num_samples=24,
        features="pixels",
        mix_source="img2img",
        strength=0.8,
        repeats=2,
    )
    return replace_config(cfg, **fields)


def _run(path, base, spec, real):
    return run_sweep(base, spec, path, real=real, show_progress=False, plots=False)


def test_gaussian_damage_grows_with_the_share(tmp_path):
    """Theory (Shumailov; Bertrand et al.): the more of the data a refit model draws itself, the further it drifts."""
    real = _real()
    spec = SweepSpec(shares=(0.0, 0.25, 0.5, 1.0))
    doc = _run(tmp_path / "s", _base(repeats=3, poison_generations=3, heal_generations=0, num_samples=40), spec, real)
    cell = doc["cells"]["base"]
    means = [cell["shares"][a]["paired"]["all/fid"]["mean"] for a in ("share-25", "share-50", "share-100")]
    assert 0 < means[0] < means[1] < means[2], means
    assert cell["shares"]["share-100"]["paired"]["all/fid"]["n"] == 3
    # The map names the smallest share whose interval lies above 0, and collapse is a stricter bar.
    damaging = [
        cell["shares"][a]["share"] for a in ("share-25", "share-50", "share-100") if cell["shares"][a]["damages"]
    ]
    assert cell["smallest_damaging_share"] == (min(damaging) if damaging else None)


def test_sweep_resumes_per_cell(tmp_path, monkeypatch):
    import diffaudit.loop.experiment as experiment

    real = _real()
    spec = SweepSpec(shares=(0.0, 0.5), axes=(("temperature", (1.0, 0.7)),))
    whole = _run(tmp_path / "whole", _base(repeats=1, heal_generations=0), spec, real)
    original = experiment.run_experiment
    calls: list[str] = []

    def flaky(exp, out, **kw):
        calls.append(exp.name)
        if exp.name == "temperature-0.7" and calls.count("temperature-0.7") == 1:
            raise KeyboardInterrupt  # killed while the second cell runs
        return original(exp, out, **kw)

    monkeypatch.setattr(experiment, "run_experiment", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", _base(repeats=1, heal_generations=0), spec, real)
    assert (tmp_path / "b" / "cells" / "temperature-1.0" / "summary.json").is_file()
    cfg = _base(repeats=1, heal_generations=0)
    resumed = run_sweep(cfg, spec, tmp_path / "b", resume=True, real=real, show_progress=False, plots=False)
    # The complete cell was not run again; the interrupted one was.
    assert calls == ["temperature-1.0", "temperature-0.7", "temperature-0.7"]
    assert resumed["cells"] == whole["cells"]
    assert json.loads((tmp_path / "b" / "map.json").read_text())["cells"] == json.loads(json.dumps(whole["cells"]))


def test_merging_sweeps_of_different_seeds_equals_one_sweep(tmp_path):
    real = _real()
    spec = SweepSpec(shares=(0.0, 0.5), mitigations=("none", "self-correct"), mitigation_share=0.5)
    one = _run(tmp_path / "one", _base(repeats=2), spec, real)
    _run(tmp_path / "s0", _base(seed=0, repeats=1), spec, real)
    _run(tmp_path / "s1", _base(seed=1, repeats=1), spec, real)
    merged = merge_sweeps([tmp_path / "s1", tmp_path / "s0"], tmp_path / "merged", plots=True)
    assert merged["cells"] == json.loads(json.dumps(one["cells"]))
    assert merged["mitigations"] == json.loads(json.dumps(one["mitigations"]))
    assert merged["cells"]["base"]["seeds"] == [0, 1]
    assert (tmp_path / "merged" / "map-fid.png").is_file()
    sc = merged["mitigations"]["base"]["self-correct"]["shares"]["share-50"]
    assert sc["paired_vs_unmitigated"]["all/fid"]["n"] == 2  # paired with the unmitigated control of each seed
    with pytest.raises(ConfigError, match="both hold"):
        build_map(collect_cells([tmp_path / "s0", tmp_path / "one"]), spec, 1)
    other = SweepSpec(shares=(0.0, 0.25))
    _run(tmp_path / "other", _base(seed=2, repeats=1), other, real)
    with pytest.raises(ConfigError, match="sweep settings differ"):
        merge_sweeps([tmp_path / "s0", tmp_path / "other"], tmp_path / "bad")


def test_sweep_spec_validation():
    base = _base()
    with pytest.raises(ConfigError, match="need 0"):
        SweepSpec(shares=(0.25, 0.5)).validate(base)
    with pytest.raises(ConfigError, match="not a loop setting"):
        SweepSpec(axes=(("warp_factor", (1, 2)),)).validate(base)
    with pytest.raises(ConfigError, match="mitigation 'prayer'"):
        SweepSpec(mitigations=("none", "prayer")).validate(base)
    with pytest.raises(ConfigError, match="guidance_schedule applies to diffusion"):
        SweepSpec(axes=(("guidance_schedule", ("linear",)),)).validate(base)


def test_cli_sweep_and_merge(tmp_path, capsys):
    from diffaudit.cli import main

    common = ["loop", "--preset", "gaussian-digits", "--quick", "--backend", "gaussian", "--poison-generations", "1"]
    common += ["--heal-generations", "0", "--set", "train_size=200", "--set", "num_samples=40", "--set", "mode=replace"]
    common += ["--set", "features=pixels", "--sweep", "synthetic_share=0,0.5", "--sweep", "temperature=0.8"]
    for seed in (0, 1):
        res = CliRunner().invoke(app, [*common, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")])
        assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "s0" / "map.json").read_text())
    assert set(doc["cells"]) == {"temperature-0.8"} and doc["cells"]["temperature-0.8"]["seeds"] == [0]
    assert (tmp_path / "s0" / "map-fid.png").is_file()
    res = CliRunner().invoke(
        app, ["loop-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    merged = json.loads((tmp_path / "m" / "map.json").read_text())
    assert merged["cells"]["temperature-0.8"]["seeds"] == [0, 1]
    with pytest.raises(SystemExit) as exc:
        main([*common[:-2], "--sweep", "synthetic_share=0.1,0.5", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "need 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_heatmap_marks_each_metric_by_its_own_interval():
    from diffaudit.loop.sweep_plots import square_mark

    entry = {
        "damages": True,
        "collapses": False,
        "paired": {
            "all/fid": {"mean": 3.0, "low": 1.0, "high": 5.0, "n": 8},
            "heldout/fid": {"mean": 8.0, "low": -8.6, "high": 24.5, "n": 8},  # FID damaged, held-out not
            "all/recall": {"mean": -0.07, "low": -0.12, "high": -0.03, "n": 8},
        },
    }
    assert square_mark(entry, "all/fid") == "+"
    assert square_mark(entry, "heldout/fid") == ""  # not the all/fid verdict
    assert square_mark(entry, "all/recall") == "+"  # its own interval excludes 0
    assert square_mark({**entry, "collapses": True}, "all/fid") == "*"
    one_seed = {**entry, "paired": {"all/recall": {"mean": -0.5, "low": -0.5, "high": -0.5, "n": 1}}}
    assert square_mark(one_seed, "all/recall") == ""
