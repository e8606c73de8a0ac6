"""Image-to-image mixing on the analytic backend: exact share, provenance link to the replaced real image, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffaudit.data.imageset import ImageSet
from diffaudit.errors import ConfigError
from diffaudit.loop.config import LoopConfig, LoopHooks, replace_config
from diffaudit.loop.experiment import Experiment, run_experiment
from diffaudit.loop.mixing import MixSpec, img2img_split

K = 4


def _real(n: int = 200, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    images = (rng.integers(0, 60, size=(n, 1, 8, 8)) + 40 * labels[:, None, None, None]).astype(np.uint8)
    return ImageSet(images, labels, tuple("abcd"), {"source": "toy"})


def _cfg(**fields) -> LoopConfig:
    base = LoopConfig(
        backend="gaussian",
        train_size=60,
        synthetic_share=0.25,
        poison_generations=2,
        heal_generations=1,
        num_samples=40,
        features="pixels",
        holdout_classes=(3,),
        mix_source="img2img",
        strength=0.1,
        drift_samples=3,
    )
    return replace_config(base, **fields)


def test_split_is_exact_seeded_and_spares_heldout_classes():
    real = _real()
    kept, orig = img2img_split(real, MixSpec("replace", 60, 0.25), 1, seed=3, holdout_classes=(3,))
    assert (len(kept), len(orig)) == (45, 15)
    assert not np.isin(orig.labels, [3]).any() and not set(kept.ids) & set(orig.ids)
    again = img2img_split(real, MixSpec("replace", 60, 0.25), 1, seed=3, holdout_classes=(3,))[1]
    assert (again.ids == orig.ids).all()
    other = img2img_split(real, MixSpec("replace", 60, 0.25), 2, seed=3, holdout_classes=(3,))[1]
    assert set(other.ids) != set(orig.ids)  # each generation re-renders its own choice
    _, full = img2img_split(real, MixSpec("fully-synthetic", 60, 1.0), 1, seed=3, holdout_classes=(3,))
    assert len(full) == 60 and not np.isin(full.labels, [3]).any()
    # accumulate keeps every real image of the subset; the re-renderings come on top.
    acc_kept, acc_orig = img2img_split(real, MixSpec("accumulate", 60, 0.25), 1, seed=3, holdout_classes=(3,))
    assert len(acc_kept) == 60 and len(acc_orig) == 15 and set(acc_orig.ids) <= set(acc_kept.ids)
    with pytest.raises(ConfigError, match="strength"):
        _cfg(strength=0.0).validate()


def test_img2img_loop_links_each_synthetic_image_to_the_real_one_it_replaces(tmp_path):
    real = _real()
    run_experiment(Experiment({"i2i": _cfg()}, name="t"), tmp_path / "r", real=real, show_progress=False, plots=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_synthetic"] for r in rows] == [0, 15, 15, 0]  # exactly 25% of 60
    assert all(r["mix_source"] == "img2img" and r["img2img_strength"] == 0.1 for r in rows)
    assert [r["generation"] for r in rows] == [0, 1, 2, 3] and all(r["samples_extra"] == 0 for r in rows)
    # Drift: generation 0 against itself is 0; retraining moves the fixed-seed images.
    assert rows[0]["all/drift_l2"] == 0.0 and rows[1]["retrained/drift_l2"] > 0
    by_id = {str(i): k for k, i in enumerate(real.ids)}
    for g in (1, 2):
        gdir = tmp_path / "r" / "repeat-0" / "i2i" / f"gen-{g:03d}"
        train = ImageSet.load(gdir / "train-set.npz")
        info = json.loads((gdir / "train-set-img2img.json").read_text())
        assert info["made_by"] == rows[g - 1]["model_id"] and info["generation"] == g - 1
        syn = train.provenance["synthetic"]
        assert sorted(p["id"] for p in info["pairs"]) == sorted(train.ids[syn].tolist())
        assert (train.provenance["generation"][syn] == g - 1).all()
        init = np.array([by_id[p["init_id"]] for p in info["pairs"]])
        assert len(set(init.tolist())) == 15 and not set(real.ids[init]) & set(train.ids[~syn])  # replaced
        assert [p["label"] for p in info["pairs"]] == real.labels[init].tolist()
        order = {str(i): k for k, i in enumerate(train.ids)}
        made = train.images[[order[p["id"]] for p in info["pairs"]]].astype(float)
        # At strength 0.1 a re-rendering stays near its own real image, far nearer than to the other ones.
        own = np.abs(made - real.images[init]).mean()
        shuffled = np.abs(made - real.images[np.roll(init, 1)]).mean()
        assert own < 0.5 * shuffled, (own, shuffled)


class _Crash:
    def __init__(self, at: int | None) -> None:
        self.at = at

    def __call__(self, mixed: ImageSet, generation: int):
        if generation == self.at:
            self.at = None
            raise KeyboardInterrupt
        return mixed, {"removed": 0}


def test_resume_of_a_killed_img2img_generation_equals_an_uninterrupted_run(tmp_path):
    real = _real()

    def exp(hook):
        return Experiment({"i2i": _cfg(mode="fresh")}, name="t", hooks=LoopHooks(filter_fn=hook))

    whole = run_experiment(exp(_Crash(None)), tmp_path / "a", real=real, show_progress=False, plots=False)
    crash = _Crash(2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp(crash), tmp_path / "b", real=real, show_progress=False, plots=False)
    assert (tmp_path / "b" / "repeat-0" / "i2i" / "gen-002.partial").exists()
    resumed = run_experiment(exp(crash), tmp_path / "b", resume=True, real=real, show_progress=False, plots=False)
    assert resumed == whole
    rows_a, rows_b = ((tmp_path / d / "metrics.jsonl").read_text() for d in "ab")
    assert sorted(rows_a.splitlines()) == sorted(rows_b.splitlines())
    pairs = [json.loads((tmp_path / d / "repeat-0/i2i/gen-002/train-set-img2img.json").read_text()) for d in "ab"]
    assert pairs[0] == pairs[1]
