"""Bring your own model: tiny random-weight diffusers pipelines loaded as sd:PATH, and the sd commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffaudit.attacks import extraction as ex
from diffaudit.cli import app
from diffaudit.data.imageset import ImageSet
from diffaudit.errors import CheckpointError, ConfigError, DataError
from diffaudit.pipelines import audit
from diffaudit.pipelines.audit import extract_prompts, generate_sd, latent_losses
from diffaudit.data.prompts import read_captioned_folder, read_prompts
from diffaudit.pipelines.sd import check_pipeline_dir, load_sd
from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny", TinyPipelineConfig(resolution=32), seed=0)


@pytest.fixture(scope="module")
def model(pipe_dir: Path):
    return load_sd(pipe_dir, device="cpu")


def _captioned_folder(root: Path, n: int, seed: int, metadata: bool) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        caption = PROMPTS[i % 2]
        if metadata:
            rows.append(json.dumps({"file_name": f"img{i}.png", "text": caption}))
        else:
            (root / f"img{i}.txt").write_text(caption)
    if metadata:
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


# ---- loading -----------------------------------------------------------------------------------------------


def test_load_describes_model_and_id_is_content_hash(pipe_dir: Path, model, tmp_path: Path) -> None:
    assert model.resolution == 32 and model.latent_shape == (4, 4, 4)
    assert model.dtype == torch.float32 and model.model_id.startswith("sd-")
    copy = tmp_path / "copy"
    shutil.copytree(pipe_dir, copy)
    assert load_sd(f"sd:{copy}", device="cpu").model_id == model.model_id  # same U-Net bytes, same id
    other = save_tiny_pipeline(tmp_path / "other", TinyPipelineConfig(resolution=32), seed=1)
    assert load_sd(other, device="cpu").model_id != model.model_id


def test_pickle_only_weights_are_refused(pipe_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pipe_dir, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").rename(bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*diffusion_pytorch_model.bin"):
        load_sd(bad, device="cpu")
    (tmp_path / "p.txt").write_text("a cat\n")
    args = ["sd", "sample", "--model", f"sd:{bad}", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, CheckpointError) and not (tmp_path / "r").exists()


def test_missing_component_is_named(pipe_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "novae"
    shutil.copytree(pipe_dir, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(CheckpointError, match="'vae'"):
        check_pipeline_dir(bad)
    with pytest.raises(CheckpointError, match="model_index.json"):
        check_pipeline_dir(bad / "unet")
    with pytest.raises(ConfigError, match="fp16"):
        load_sd(pipe_dir, device="cpu", dtype="fp16")


# ---- the model interface ------------------------------------------------------------------------------------


def test_samples_depend_only_on_their_seed(model) -> None:
    prompts, seeds = [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [5, 6, 7]
    batch = model.sample(prompts, seeds, num_steps=3, guidance_scale=3.0)
    assert batch.shape == (3, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    single = model.sample(prompts[1:2], seeds[1:2], num_steps=3, guidance_scale=3.0)
    torch.testing.assert_close(batch[1:2], single, atol=1e-4, rtol=0)
    assert not torch.allclose(batch[0], batch[2], atol=1e-3)  # same prompt, different seed
    for sampler in ("ddpm", "dpm++"):
        a = model.sample(prompts, seeds, sampler=sampler, num_steps=2)
        b = model.sample(prompts[2:], seeds[2:], sampler=sampler, num_steps=2)
        torch.testing.assert_close(a[2:], b, atol=1e-4, rtol=0)
    init = model.sample(prompts, seeds, num_steps=2)
    i2i = model.sample(prompts, seeds, num_steps=4, init_images=init, strength=0.5)
    i2i_one = model.sample(prompts[:1], seeds[:1], num_steps=4, init_images=init[:1], strength=0.5)
    torch.testing.assert_close(i2i[:1], i2i_one, atol=1e-4, rtol=0)


def test_loss_and_noise_gap(model) -> None:
    z0 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    loss = model.per_sample_loss(z0, PROMPTS, torch.tensor([100, 100]), noise)
    assert loss.shape == (2,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    again = model.per_sample_loss(z0[:1], PROMPTS[:1], torch.tensor([100]), noise[:1])
    torch.testing.assert_close(loss[:1], again, atol=1e-5, rtol=1e-5)
    gap = model.noise_gap(["", PROMPTS[0]], [0, 0], num_steps=10)
    assert gap[0] == pytest.approx(0.0, abs=1e-6)  # the null prompt against itself
    assert gap[1] > 1e-4


def test_generate_records_provenance_and_watermark_limits(model) -> None:
    images = generate_sd(model, PROMPTS, np.array([0, 1, 1]), [3, 4, 5], num_steps=2, batch_size=2, show_progress=False)
    assert images.shape == (3, 32, 32) and images.class_names == tuple(PROMPTS)
    assert images.provenance["seed"].tolist() == [3, 4, 5] and images.labels.tolist() == [0, 1, 1]
    assert set(images.provenance["model_id"]) == {model.model_id} and images.provenance["synthetic"].all()
    one = generate_sd(model, PROMPTS, np.array([1]), [4], num_steps=2, show_progress=False)
    assert np.abs(one.images[0].astype(int) - images.images[1].astype(int)).max() <= 1
    with pytest.raises(ConfigError, match="256"):
        generate_sd(model, PROMPTS, np.array([0]), [0], num_steps=1, watermark="sd-v1", show_progress=False)


def test_sd_v1_watermark_on_and_off(tmp_path: Path) -> None:
    cfg = TinyPipelineConfig(resolution=256, unet_channels=(4, 8), vae_channels=(4, 4, 4, 4))
    big = load_sd(save_tiny_pipeline(tmp_path / "big", cfg), device="cpu")
    from diffaudit.guards.tagging import DwtDctTagger

    kw = dict(num_steps=1, guidance_scale=1.0, show_progress=False)
    on = generate_sd(big, PROMPTS, np.array([0, 1]), [0, 1], watermark="sd-v1", **kw)
    off = generate_sd(big, PROMPTS, np.array([0, 1]), [0, 1], watermark="none", **kw)
    assert on.provenance["tag"].tolist() == ["sd-v1"] * 2 and off.provenance["tag"].tolist() == [""] * 2
    tagger = DwtDctTagger("sd-v1")
    assert tagger.score(on.images).min() >= 0.9
    assert tagger.score(off.images).max() < 0.8


# ---- prompts and captions -----------------------------------------------------------------------------------


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert [e.prompt for e in read_prompts(txt)] == ["a cat", "a dog"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "seed": 7}\n{"prompt": "a dog"}\n')
    assert [(e.prompt, e.seed) for e in read_prompts(jl)] == [("a cat", 7), ("a dog", None)]
    jl.write_text('{"prompt": "a cat"}\n{"text": "x"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        read_prompts(jl)
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")


def test_captioned_folders(tmp_path: Path) -> None:
    meta = _captioned_folder(tmp_path / "meta", 3, 0, metadata=True)
    data, caps = read_captioned_folder(meta, 32)
    assert data.images.shape == (3, 3, 32, 32) and caps == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    txt = _captioned_folder(tmp_path / "txt", 2, 1, metadata=False)
    assert read_captioned_folder(txt, 16)[1] == PROMPTS
    (txt / "img1.txt").unlink()
    with pytest.raises(DataError, match=r"img1.png: no caption"):
        read_captioned_folder(txt, 16)


# ---- extraction (no model needed) ---------------------------------------------------------------------------


def test_extract_flags_planted_clique_and_matches_training_image() -> None:
    rng = np.random.default_rng(0)
    memorized = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    copies = np.clip(memorized[None].astype(int) + rng.integers(-3, 4, (6, 3, 32, 32)), 0, 255).astype(np.uint8)
    diverse = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    gens = ImageSet(
        np.concatenate([copies, diverse]),
        np.repeat([0, 1], 6),
        ("memorized prompt", "fresh prompt"),
        {"seed": np.arange(12)},
    )
    train = ImageSet(np.concatenate([diverse[:2] // 2, memorized[None]]), np.full(3, -1))
    rows = extract_prompts(gens, edge_threshold=0.1, min_clique=5, train=train, show_progress=False)
    by_prompt = {r[ex.LABEL_NAME]: r for r in rows}
    hit, miss = by_prompt["memorized prompt"], by_prompt["fresh prompt"]
    assert rows[0] is hit and hit[ex.FLAGGED] and hit[ex.CLIQUE_SIZE] == 6
    assert hit[ex.EXTRACTED] and hit[ex.NEAREST_TRAIN_ID] == train.ids[2]
    assert sorted(hit[ex.MEMBER_SEEDS]) == list(range(6))
    assert sorted(hit[audit.KEY_MEMBER_IDS]) == sorted(gens.ids[:6])
    assert not miss[ex.FLAGGED] and miss[ex.EXTRACTED] in (None, False)
    no_train = extract_prompts(gens, edge_threshold=0.1, min_clique=5, show_progress=False)
    assert no_train[0][ex.FLAGGED] and no_train[0][ex.NEAREST_TRAIN_ID] is None


def test_latent_losses_are_order_independent(model, tmp_path: Path) -> None:
    data, caps = read_captioned_folder(_captioned_folder(tmp_path / "m", 3, 2, True), 32)
    a = latent_losses(model, data, caps, t=100, num_noise=2, batch_size=2, show_progress=False)
    b = latent_losses(model, data.subset([2, 1, 0]), caps[::-1], t=100, num_noise=2, show_progress=False)
    np.testing.assert_allclose(a, b[::-1], rtol=1e-5)


# ---- CLI end to end ---------------------------------------------------------------------------------------------


def test_cli_sample_extract_mia_loop(pipe_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red square", "seed": 100}\n{"prompt": "a blue circle"}\n')
    common = ["--model", f"sd:{pipe_dir}", "--num-steps", "2", "--device", "cpu", "--no-progress"]
    res = runner.invoke(
        app,
        ["sd", "sample", *common, "--prompts", str(prompts), "--out", str(tmp_path / "s")] + ["--num-per-prompt", "3"],
    )
    assert res.exit_code == 0, res.output
    samples = ImageSet.load(tmp_path / "s" / "samples.npz")
    assert samples.provenance["seed"].tolist() == [100, 101, 102, 3, 4, 5]
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seeds"] for r in rows] == [[100, 101, 102], [3, 4, 5]]

    train = _captioned_folder(tmp_path / "train", 4, 3, metadata=True)
    res = runner.invoke(
        app,
        ["sd", "extract", *common, "--prompts", str(prompts), "--out", str(tmp_path / "x")]
        + ["--num-per-prompt", "3", "--min-clique", "2", "--train", str(train)],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r[audit.KEY_PROMPT_INDEX] for r in rows) == [0, 1]
    assert all(r[audit.KEY_NOISE_GAP] > 0 for r in rows)
    assert json.loads((tmp_path / "x" / "config.json").read_text())["edge_threshold"] == 0.1

    res = runner.invoke(
        app,
        ["sd", "extract", *common, "--samples", str(tmp_path / "s" / "samples.npz")]
        + ["--out", str(tmp_path / "x2"), "--min-clique", "2", "--no-noise-gap"],
    )
    assert res.exit_code == 0, res.output
    rows2 = [json.loads(x) for x in (tmp_path / "x2" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r[ex.SEEDS][0] for r in rows2) == [3, 100] and audit.KEY_NOISE_GAP not in rows2[0]
    assert [r[ex.NUM_GENERATED] for r in rows2] == [3, 3]  # the repeated shard is merged by id
    res = runner.invoke(app, ["sd", "extract", *common, "--out", str(tmp_path / "x3")])
    assert res.exit_code != 0 and "exactly one" in str(res.exception)

    held = _captioned_folder(tmp_path / "held", 4, 4, metadata=False)
    res = runner.invoke(
        app,
        ["sd", "mia", "--model", str(pipe_dir), "--members", str(train), "--nonmembers", str(held)]
        + ["--out", str(tmp_path / "m"), "--device", "cpu", "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "m" / "manifest.json").read_text())["result"]
    assert 0.0 <= result["auc"] <= 1.0 and result["num_members"] == 4 and "tpr@1%fpr" in result

    held_prompts = tmp_path / "held.txt"
    held_prompts.write_text("a green triangle\n")
    loop_args = ["--data", str(train), "--out", str(tmp_path / "l"), "--heldout-prompts", str(held_prompts)]
    loop_args += ["--generations", "1", "--heal", "1", "--steps", "2", "--synthetic-fraction", "0.5"]
    loop_args += ["--lora-rank", "2", "--learning-rate", "1e-2", "--num-steps", "2", "--eval-seeds", "2"]
    res = runner.invoke(app, ["sd", "loop", "--model", str(pipe_dir), "--device", "cpu", *loop_args])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["generation"], r["phase"], r["num_synthetic"]) for r in rows] == [
        (0, "start", 0),
        (1, "loop", 2),
        (2, "heal", 0),
    ]
    assert rows[0]["drift_l2_train_prompts"] == 0.0 and rows[1]["drift_l2_heldout_prompts"] > 0.0
    assert (tmp_path / "l" / "unet" / "lora.safetensors").is_file()

    bad = runner.invoke(app, ["sd", "sample", *common, "--prompts", str(prompts), "--out", str(tmp_path / "s")])
    assert bad.exit_code != 0  # the run directory exists


def test_full_unet_fine_tuning_changes_only_the_unet(pipe_dir: Path, tmp_path: Path) -> None:
    from diffaudit.pipelines.loop import SDLoopConfig, run_sd_loop

    net = load_sd(pipe_dir, device="cpu")
    real, caps = read_captioned_folder(_captioned_folder(tmp_path / "r", 2, 5, True), 32)
    unet0 = {k: v.clone() for k, v in net.unet.state_dict().items()}
    vae0 = {k: v.clone() for k, v in net.vae.state_dict().items()}
    cfg = SDLoopConfig(generations=1, steps=2, batch_size=2, learning_rate=1e-2, num_steps=2, eval_seeds=1)
    rows = run_sd_loop(net, real, caps, [], cfg)
    assert [r["num_synthetic"] for r in rows] == [0, 0]  # round(30/900 * 2) = 0 self-generated images
    assert any(not torch.equal(v, net.unet.state_dict()[k]) for k, v in unet0.items())
    assert all(torch.equal(v, net.vae.state_dict()[k]) for k, v in vae0.items())
    assert rows[1]["drift_l2_heldout_prompts"] is None and rows[1]["drift_l2_train_prompts"] > 0
    assert rows[0]["model_id"] == load_sd(pipe_dir, device="cpu").model_id != rows[1]["model_id"] == net.model_id
