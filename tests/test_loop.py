"""The self-consuming loop engine: mixing, healing ratio, resume, and the CLI end to end (tiny sizes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.loop.config import LoopConfig, LoopHooks, replace_config
from diffaudit.loop.evaluate import healing_ratio
from diffaudit.loop.experiment import Experiment, run_experiment
from diffaudit.loop.mixing import MixSpec, mix_generation, mix_summary
from diffaudit.loop.plan import extra_samples

K = 4  # classes in the toy sets


def _real(n: int = 120, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    images = (rng.integers(0, 60, size=(n, 1, 8, 8)) + 40 * labels[:, None, None, None]).astype(np.uint8)
    return ImageSet(images, labels, tuple("abcd"), {"source": "toy"})


def _pool(generation: int, n: int = 80) -> ImageSet:
    rng = np.random.default_rng(100 + generation)
    labels = np.arange(n) % K
    images = rng.integers(0, 256, size=(n, 1, 8, 8)).astype(np.uint8)
    return ImageSet(
        images,
        labels,
        tuple("abcd"),
        {"synthetic": True, "generation": generation, "seed": np.arange(n) + 1000 * generation},
    )


# ---- mixing -----------------------------------------------------------------------------------------------
def test_replace_fraction_counts_and_provenance():
    real, pools = _real(), [_pool(0), _pool(1)]
    mixed = mix_generation(real, pools, MixSpec("replace", 100, 0.1), generation=2, seed=3)
    syn = mixed.provenance["synthetic"]
    assert len(mixed) == 100 and syn.sum() == 10
    assert set(mixed.provenance["generation"][syn].tolist()) == {1}  # only the previous generation
    assert set(mixed.ids[~syn]) <= set(real.ids)
    assert (mixed.provenance["seed"][syn] >= 1000).all()  # seeds of the generation-1 pool survive


def test_exact_count_versus_fraction():
    spec_count = MixSpec("replace", 900, None, 30)
    spec_share = MixSpec("replace", 900, 0.033, None)
    assert spec_count.num_synthetic == 30 and spec_share.num_synthetic == 30  # Bohacek & Farid's 30 of 900
    assert MixSpec("replace", 100, None, 7).num_synthetic == 7
    assert MixSpec("replace", 100, 0.07, None).num_synthetic == 7
    with pytest.raises(ConfigError):
        MixSpec("replace", 100, 0.1, 10).validate()  # both given
    with pytest.raises(ConfigError):
        MixSpec("replace", 100, None, 101).validate()
    with pytest.raises(ConfigError):
        MixSpec("sideways", 100, 0.1).validate()


def test_accumulate_keeps_all_real_and_every_earlier_pool():
    real, pools = _real(), [_pool(g) for g in range(3)]
    spec = MixSpec("accumulate", 100, None, 5)
    m2 = mix_generation(real, pools[:2], spec, generation=2, seed=1)
    m3 = mix_generation(real, pools, spec, generation=3, seed=1)
    s = mix_summary(m3)
    assert len(m3) == 100 + 3 * 5 and s["train_synthetic"] == 15
    assert s["train_synthetic_by_generation"] == {"0": 5, "1": 5, "2": 5}
    # What a pool contributed stays in later generations (the data accumulates, it is not redrawn).
    assert set(m2.ids[m2.provenance["synthetic"]]) <= set(m3.ids[m3.provenance["synthetic"]])
    assert set(m3.ids[~m3.provenance["synthetic"]]) == set(m2.ids[~m2.provenance["synthetic"]])


def test_fresh_draws_new_real_and_fully_synthetic_has_no_real():
    real, pools = _real(), [_pool(0), _pool(1)]
    f1 = mix_generation(real, pools, MixSpec("fresh", 60, 0.5), generation=1, seed=0)
    f2 = mix_generation(real, pools, MixSpec("fresh", 60, 0.5), generation=2, seed=0)
    r1, r2 = (set(m.ids[~m.provenance["synthetic"]]) for m in (f1, f2))
    assert len(r1) == 30 and r1 != r2
    fs = mix_generation(real, pools, MixSpec("fully-synthetic", 50, 0.0), generation=2, seed=0)
    assert len(fs) == 50 and fs.provenance["synthetic"].all()
    assert set(fs.provenance["generation"].tolist()) == {1}


def test_holdout_classes_get_no_synthetic_and_mixing_is_deterministic():
    real, pools = _real(), [_pool(0)]
    spec = MixSpec("replace", 100, 0.3)
    a = mix_generation(real, pools, spec, 1, seed=5, holdout_classes=(2, 3))
    b = mix_generation(real, pools, spec, 1, seed=5, holdout_classes=(2, 3))
    syn = a.provenance["synthetic"]
    assert syn.sum() == 30 and not np.isin(a.labels[syn], [2, 3]).any()
    assert np.isin(a.labels[~syn], [2, 3]).any()  # held-out classes still train on real images
    assert (a.ids == b.ids).all()
    assert mix_summary(a, (2, 3))["train_synthetic_heldout"] == 0
    with pytest.raises(ConfigError, match="eligible"):
        mix_generation(real, pools, MixSpec("replace", 100, 0.5), 1, seed=5, holdout_classes=(1, 2, 3))


def test_forgetting_control_drops_heldout_real_images_only_while_poisoning():
    real, pools = _real(), [_pool(0)]
    spec = MixSpec("replace", 60, 0.0)  # no synthetic data: only the held-out classes' absence differs
    poisoned = mix_generation(real, pools, spec, 1, seed=5, holdout_classes=(2, 3), heldout_real=False)
    assert len(poisoned) == 60 and not np.isin(poisoned.labels, [2, 3]).any()
    healing = mix_generation(real, pools, spec, 1, seed=5, holdout_classes=(2, 3), synthetic=False, heldout_real=False)
    assert np.isin(healing.labels, [2, 3]).any()  # generation 0 and healing keep every class
    with pytest.raises(ConfigError, match="needs holdout_classes"):
        mix_generation(real, pools, spec, 1, seed=5, heldout_real=False)


def test_generation_zero_and_healing_are_real_only():
    real, pools = _real(), [_pool(0)]
    for mixed in (
        mix_generation(real, [], MixSpec("replace", 100, 0.5), 0, seed=0),
        mix_generation(real, pools, MixSpec("replace", 100, 0.5), 1, seed=0, synthetic=False),
    ):
        assert len(mixed) == 100 and not mixed.provenance["synthetic"].any()


# ---- healing ratio ----------------------------------------------------------------------------------------
def test_healing_ratio_cases():
    assert healing_ratio(10.0, 30.0, 10.0)["ratio"] == pytest.approx(1.0)  # FID back to base: full recovery
    assert healing_ratio(10.0, 30.0, 30.0)["ratio"] == pytest.approx(0.0)
    assert healing_ratio(10.0, 30.0, 20.0)["ratio"] == pytest.approx(0.5)
    assert healing_ratio(10.0, 30.0, 40.0)["ratio"] == pytest.approx(-0.5)  # worse after "healing"
    assert healing_ratio(0.6, 0.2, 0.5)["ratio"] == pytest.approx(0.75)  # recall: higher is better, same formula
    flat = healing_ratio(10.0, 10.0, 12.0)
    assert flat["ratio"] is None and "noise" in flat["reason"]
    noisy = healing_ratio(10.0, 10.5, 10.0, noise=1.0)  # shift smaller than the noise: undefined
    assert noisy["ratio"] is None
    assert healing_ratio(10.0, 12.0, 10.0, noise=1.0)["ratio"] == pytest.approx(1.0)
    assert healing_ratio(10.0, math.nan, 10.0)["ratio"] is None


# ---- engine: resume ---------------------------------------------------------------------------------------
class _Crash:
    """A filter hook that passes sets through, raising once when generation ``at`` is reached."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def __call__(self, mixed: ImageSet, generation: int):
        if generation == self.at:
            self.at = None
            raise KeyboardInterrupt
        return mixed, {"removed": 0}


def _gauss_cfg(**fields) -> LoopConfig:
    """A small analytic-backend loop: 60 images, 2 poisoning + 1 healing generations, pixel features."""
    base = LoopConfig(
        backend="gaussian",
        train_size=60,
        synthetic_share=0.5,
        poison_generations=2,
        heal_generations=1,
        num_samples=40,
        features="pixels",
    )
    return replace_config(base, **fields)


def _gauss_exp(hook: _Crash) -> Experiment:
    cfg = _gauss_cfg(holdout_classes=(3,), repeats=2)
    arms = {
        "replace": cfg,
        "accumulate": LoopConfig(**{**cfg.to_dict(), "mode": "accumulate", "holdout_classes": (3,)}),
    }
    return Experiment(arms, name="t", hooks=LoopHooks(filter_fn=hook))


def test_resume_equals_uninterrupted_gaussian(tmp_path):
    real = _real(200)
    whole = run_experiment(_gauss_exp(_Crash(None)), tmp_path / "a", real=real, show_progress=False, plots=False)
    crash = _Crash(2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_gauss_exp(crash), tmp_path / "b", real=real, show_progress=False, plots=False)
    assert (tmp_path / "b" / "repeat-0" / "replace" / "gen-002.partial").exists()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "interrupted"
    resumed = run_experiment(_gauss_exp(crash), tmp_path / "b", resume=True, real=real, show_progress=False)
    assert resumed == whole
    assert not list((tmp_path / "b").rglob("*.partial"))
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    key = lambda r: (r["arm"], r["repeat"], r["generation"])  # noqa: E731
    assert len(rows_b) == len(rows_a) == 2 * 2 * 4  # no generation logged twice
    assert sorted(rows_a, key=key) == sorted(rows_b, key=key)
    # Retrained classes got synthetic data in poisoning generations; the held-out class never did.
    poison = [r for r in rows_a if r["phase"] == "poison"]
    assert all(r["train_synthetic"] > 0 and r["train_synthetic_heldout"] == 0 for r in poison)
    assert all(r["filter"] == {"removed": 0} for r in poison)
    assert {"all/fid", "retrained/fid", "heldout/fid"} <= set(rows_a[0])


def test_extra_samples_only_where_a_later_mix_needs_them(tmp_path):
    """Arms score the same evaluation seeds; only generations feeding a later mix sample retrained classes extra."""
    real = _real(200)
    base = _gauss_cfg(holdout_classes=(3,))
    arms = {
        "control": replace_config(base, synthetic_share=0.0),
        "all-syn": replace_config(base, mode="accumulate", synthetic_share=0.75),
    }
    # 40 evaluation labels cycle over 4 classes: 30 of the 3 retrained ones; the mix needs 45 of them.
    assert [extra_samples(arms["all-syn"], real, 40, g) for g in range(4)] == [15, 15, 0, 0]
    assert [extra_samples(arms["control"], real, 40, g) for g in range(4)] == [0, 0, 0, 0]
    run_experiment(Experiment(arms, name="t"), tmp_path / "r", real=real, show_progress=False, plots=False)
    rows = {(r["arm"], r["generation"]): r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open())}
    assert [rows[("all-syn", g)]["samples_extra"] for g in range(4)] == [15, 15, 0, 0]
    assert [rows[("control", g)]["samples_extra"] for g in range(4)] == [15, 0, 0, 0]  # generation 0 is shared
    assert all(r["samples_evaluated"] == 40 for r in rows.values())
    assert rows[("all-syn", 2)]["train_synthetic"] == 90 and rows[("all-syn", 2)]["train_synthetic_heldout"] == 0
    syn = ImageSet.load(tmp_path / "r" / "repeat-0" / "all-syn" / "gen-001" / "samples.npz")
    ctl = ImageSet.load(tmp_path / "r" / "repeat-0" / "control" / "gen-001" / "samples.npz")
    assert len(syn) == 55 and len(ctl) == 40
    assert syn.provenance["seed"][:40].tolist() == ctl.provenance["seed"].tolist()  # common random numbers
    assert syn.labels[:40].tolist() == ctl.labels.tolist() == (np.arange(40) % K).tolist()
    assert not np.isin(syn.labels[40:], [3]).any()  # extras are of retrained classes only


def test_nepotism_preset_extra_samples():
    from diffaudit.loop.plan import load_real
    from diffaudit.loop.presets import build_experiment

    exp = build_experiment("nepotism-digits")
    real, _ = load_real(exp.first)
    extra = {name: extra_samples(cfg, real, cfg.num_samples, 0) for name, cfg in exp.arms.items()}
    # 500 evaluation samples hold 250 of digits 0-4: only the 100% arm (900 synthetic) needs more.
    assert extra == {"share-0": 0, "share-3.3": 0, "share-10": 0, "share-25": 0, "share-100": 650}
    assert [extra_samples(exp.arms["share-100"], real, 500, g) for g in range(9)] == [650] * 5 + [0] * 4


def test_arms_must_share_generation_zero():
    a = LoopConfig(backend="gaussian", features="none")
    with pytest.raises(ConfigError, match="share generation 0"):
        Experiment({"x": a, "y": LoopConfig(backend="gaussian", features="none", train_size=10)})


# ---- CLI end to end ----------------------------------------------------------------------------------------
def test_cli_gaussian_quick(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "loop",
            "--preset",
            "gaussian-digits",
            "--quick",
            "--out",
            str(out),
            "--backend",
            "gaussian",
            "--mode",
            "replace",
            "--synthetic-count",
            "30",
            "--poison-generations",
            "2",
            "--heal-generations",
            "1",
            "--set",
            "train_size=100",
            "--set",
            "num_samples=60",
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("manifest.json", "config.json", "metrics.jsonl", "summary.json", "curves.png", "grids-custom.png"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2, 3]
    assert [r["train_synthetic"] for r in rows] == [0, 30, 30, 0]
    summary = json.loads((out / "summary.json").read_text())
    heal = summary["arms"]["custom"]["healing"]
    assert {"all/fid", "all/recall", "all/coverage"} <= set(heal)
    assert json.loads((out / "config.json").read_text())["arms"]["custom"]["synthetic_count"] == 30
    again = CliRunner().invoke(app, ["loop", "--preset", "gaussian-digits", "--quick", "--out", str(out)])
    assert again.exit_code != 0  # a non-empty run directory is never overwritten


def test_cli_tiny_diffusion_loop(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "loop",
            "--preset",
            "nepotism-digits",
            "--quick",
            "--out",
            str(out),
            "--synthetic-count",
            "3",
            "--poison-generations",
            "1",
            "--heal-generations",
            "1",
            "--holdout-classes",
            "5,6,7,8,9",
            "--set",
            "train_size=40",
            "--set",
            "num_samples=20",
            "--set",
            "base_steps=2",
            "--set",
            "steps_per_generation=1",
            "--set",
            "sample_steps=2",
            "--set",
            "features=pixels",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["base", "poison", "heal"]
    assert rows[1]["train_synthetic"] == 3 and rows[1]["train_synthetic_heldout"] == 0
    assert {"retrained/fid", "heldout/recall"} <= set(rows[1])
    g1 = out / "repeat-0" / "custom" / "gen-001"
    for name in ("model/config.json", "samples.npz", "train-set.npz", "grid.png", "row.json"):
        assert (g1 / name).exists(), name
    samples = ImageSet.load(g1 / "samples.npz")
    assert (samples.provenance["generation"] == 1).all() and samples.provenance["synthetic"].all()
    assert samples.provenance["seed"].tolist() == list(
        range(rows[1]["sample_seeds"][0], rows[1]["sample_seeds"][1] + 1)
    )
    init = json.loads((g1 / "model" / "config.json").read_text())["init_model_id"]
    assert init == rows[0]["model_id"]  # generation 1 fine-tuned generation 0


class _ToyTagger:
    """Sets the top-left pixel to 255 and scores it: enough to check the hook plumbing."""

    name = "toy"
    params: dict = {}

    def embed(self, images):
        out = images.copy()
        out[:, :, 0, 0] = 255
        return out

    def score(self, images):
        return images[:, 0, 0, 0].astype(float)

    def detect(self, images, threshold):
        return self.score(images) > threshold


def test_tag_and_scrub_hooks_remove_synthetic_before_retraining(tmp_path):
    from diffaudit.guards.scrub import LoopTagger, make_loop_filter

    tagger = _ToyTagger()
    real = _real(200)
    real = ImageSet(real.images.clip(0, 200), real.labels, real.class_names)  # no real image looks tagged
    hooks = LoopHooks(filter_fn=make_loop_filter(tagger, 254.5), tag_fn=LoopTagger(tagger))
    cfg = LoopConfig(
        backend="gaussian",
        train_size=60,
        synthetic_share=0.5,
        poison_generations=2,
        heal_generations=0,
        num_samples=40,
        features="none",
    )
    run_experiment(Experiment({"scrub": cfg}, hooks=hooks), tmp_path / "r", real=real, show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        f = row["filter"]
        assert (f["synthetic_removed"], f["real_removed"], f["synthetic_slipped"]) == (30, 0, 0)
    assert all(r["train_synthetic"] == 0 for r in rows)
    samples = ImageSet.load(tmp_path / "r" / "repeat-0" / "scrub" / "gen-001" / "samples.npz")
    assert (samples.provenance["tag"] == "toy:").all() and (samples.images[:, 0, 0, 0] == 255).all()


class _LoudTagger(_ToyTagger):
    """A tag that changes every pixel: any metric computed on tagged images moves."""

    def embed(self, images):
        return np.full_like(images, 255)


def test_tags_do_not_enter_the_evaluation(tmp_path):
    # The map measures the model: a tag added to its outputs (for the scrub filter) must not change the scores.
    from diffaudit.guards.scrub import LoopTagger, make_loop_filter

    tagger = _LoudTagger()
    real = _real(200)
    cfg = LoopConfig(
        backend="gaussian", train_size=60, synthetic_share=0.5, poison_generations=1, heal_generations=0,
        num_samples=40, features="pixels",
    )  # fmt: skip
    hooks = LoopHooks(filter_fn=make_loop_filter(tagger, 254.5), tag_fn=LoopTagger(tagger))
    run_experiment(Experiment({"a": cfg}, hooks=hooks), tmp_path / "tagged", real=real, show_progress=False)
    run_experiment(Experiment({"a": cfg}), tmp_path / "plain", real=real, show_progress=False)
    tagged, plain = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("tagged", "plain")
    )
    scores = [k for k, v in plain[0].items() if k.startswith("all/") and isinstance(v, float)]
    assert scores  # something is scored
    assert {k: tagged[0][k] for k in scores} == {k: plain[0][k] for k in scores}  # generation 0: the same model
    saved = ImageSet.load(tmp_path / "tagged" / "repeat-0" / "gen-000" / "samples.npz")
    assert (saved.images == 255).all()  # what is saved (and re-used) carries the tag


def test_cli_tag_and_scrub_removes_synthetic_before_retraining(tmp_path):
    """--tag-and-scrub: synthetic images carry the tag, the filter drops them, real ones mostly pass."""
    out = tmp_path / "run"
    args = [
        "loop",
        "--preset",
        "gaussian-digits",
        "--quick",
        "--out",
        str(out),
        "--backend",
        "gaussian",
        "--mode",
        "replace",
        "--synthetic-count",
        "40",
        "--poison-generations",
        "2",
        "--heal-generations",
        "0",
        "--set",
        "train_size=100",
        "--set",
        "num_samples=60",
        "--set",
        "features=none",
        "--tag-and-scrub",
        "--tag-amplitude",
        "48",
        "--tag-fpr",
        "0.05",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    info = json.loads((out / "safeguard.json").read_text())
    assert info["realised_fpr_on_real"] <= 0.1 and info["tagger"].startswith("spread-spectrum")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    poisoned = [r for r in rows if r.get("filter")]
    assert len(poisoned) == 2
    for row in poisoned:
        f = row["filter"]
        assert f["synthetic_in"] == 40 and f["synthetic_removed"] >= 36  # >= 90% of tagged images caught
        assert f["real_removed"] <= 10


def test_merging_seed_runs_equals_one_run_with_repeats(tmp_path):
    """Runs with --set seed=0 and seed=1 merge into exactly the summary of one run with seed 0 and 2 repeats."""
    from diffaudit.loop.merge import merge_runs

    real = _real(200)
    base = _gauss_cfg()
    one = {"replace": replace_config(base, repeats=2)}
    whole = run_experiment(Experiment(one, name="t"), tmp_path / "whole", real=real, show_progress=False, plots=False)
    for seed in (0, 1):
        arms = {"replace": replace_config(base, seed=seed)}
        run_experiment(Experiment(arms, name="t"), tmp_path / f"s{seed}", real=real, show_progress=False, plots=False)
    merged = merge_runs([tmp_path / "s1", tmp_path / "s0"], tmp_path / "merged")
    assert merged["arms"]["replace"]["curves"] == whole["arms"]["replace"]["curves"]
    assert merged["arms"]["replace"]["repeats"] == [0, 1]
    assert (tmp_path / "merged" / "curves.png").exists()
    from diffaudit.report.findings import findings_for

    assert "mean of 2 repeats" in " ".join(findings_for("loop-merge", tmp_path / "merged", {}, {}, [], {}))
    with pytest.raises(ConfigError, match="both hold seed"):
        merge_runs([tmp_path / "s0", tmp_path / "s0"], tmp_path / "twice")
    other = {"replace": replace_config(base, synthetic_share=0.25, seed=2)}
    run_experiment(Experiment(other, name="t"), tmp_path / "other", real=real, show_progress=False, plots=False)
    with pytest.raises(ConfigError, match="differ"):
        merge_runs([tmp_path / "s0", tmp_path / "other"], tmp_path / "bad")
    with pytest.raises(ConfigError, match="not a loop run"):
        merge_runs([tmp_path / "s0", tmp_path], tmp_path / "bad2")
