"""A user's diffusers pipeline directory as a Generator: loading, refusals, watermark, prompts and captions.

The family-independent contract (seeds, losses, guidance gap, round trip, goldens) is in test_generators.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffaudit.data.prompts import captions_of, read_captioned_folder, read_prompts
from diffaudit.data.sources import load_source
from diffaudit.errors import CheckpointError, ConfigError, DataError
from diffaudit.generators import load_generator
from diffaudit.generators.pipeline import PipelineGenerator
from diffaudit.generators.pipeline_dir import check_pipeline_dir
from diffaudit.generators.pipeline_train import PipelineTrainConfig, PipelineTrainer
from diffaudit.generators.tiny import TinyPipelineConfig, save_tiny_pipeline

PROMPTS = ["a red square", "a blue circle"]
SMALL = TinyPipelineConfig(resolution=16, vae_channels=(4, 8))


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny", SMALL, seed=0)


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


def test_load_describes_model_and_id_is_content_hash(pipe_dir: Path, tmp_path: Path) -> None:
    gen = load_generator(pipe_dir, PROMPTS, device="cpu")
    assert isinstance(gen, PipelineGenerator)
    assert gen.image_shape == (3, 16, 16) and gen.latent_shape == (4, 8, 8)
    assert gen.dtype == torch.float32 and gen.model_id.startswith("sd-") and gen.conditions == tuple(PROMPTS)
    copy = tmp_path / "copy"
    shutil.copytree(pipe_dir, copy)
    assert load_generator(f"sd:{copy}", PROMPTS, device="cpu").model_id == gen.model_id  # same U-Net bytes
    other = save_tiny_pipeline(tmp_path / "other", SMALL, seed=1)
    assert load_generator(other, PROMPTS, device="cpu").model_id != gen.model_id


def test_pickle_only_weights_are_refused(pipe_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pipe_dir, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").rename(bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*diffusion_pytorch_model.bin"):
        load_generator(bad, PROMPTS, device="cpu")


def test_missing_component_and_bad_dtype_are_named(pipe_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "novae"
    shutil.copytree(pipe_dir, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(CheckpointError, match="'vae'"):
        check_pipeline_dir(bad)
    with pytest.raises(CheckpointError, match="model_index.json"):
        check_pipeline_dir(bad / "unet")
    with pytest.raises(ConfigError, match="fp16"):
        load_generator(pipe_dir, PROMPTS, device="cpu", dtype="fp16")


def test_sd_v1_watermark_on_and_off(tmp_path: Path) -> None:
    """``sample --watermark sd-v1`` writes Stable Diffusion v1's dwtDct tag (images of >= 256 px only)."""
    from diffaudit.config import SampleConfig
    from diffaudit.guards.tags_dwt import DwtDctTagger
    from diffaudit.sampling import SampleRunConfig, generate

    cfg = TinyPipelineConfig(resolution=256, unet_channels=(4, 8), vae_channels=(4, 4, 4, 4))
    path = save_tiny_pipeline(tmp_path / "big", cfg)
    big = load_generator(path, PROMPTS, device="cpu")
    run_cfg = SampleRunConfig(model=str(path), num_images=2, sample=SampleConfig(num_steps=1, guidance_scale=1.0))
    on, _ = generate(big, np.array([0, 1]), np.array([0, 1]), dataclasses.replace(run_cfg, watermark="sd-v1"), False)
    off, _ = generate(big, np.array([0, 1]), np.array([0, 1]), run_cfg, False)
    assert on.provenance["tag"].tolist() == ["sd-v1"] * 2 and off.provenance["tag"].tolist() == [""] * 2
    tagger = DwtDctTagger("sd-v1")
    assert tagger.score(on.images).min() >= 0.9
    assert tagger.score(off.images).max() < 0.8


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


def test_captioned_folders_are_conditions(tmp_path: Path) -> None:
    meta = _captioned_folder(tmp_path / "meta", 3, 0, metadata=True)
    data = read_captioned_folder(meta, 32)
    assert data.images.shape == (3, 3, 32, 32)
    assert data.class_names == tuple(PROMPTS) and data.labels.tolist() == [0, 1, 0]
    assert captions_of(data) == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    as_source = load_source(f"captioned:{meta}", resolution=16)
    assert as_source.shape == (3, 16, 16) and as_source.class_names == tuple(PROMPTS)
    txt = _captioned_folder(tmp_path / "txt", 2, 1, metadata=False)
    assert captions_of(read_captioned_folder(txt, 16)) == PROMPTS
    (txt / "img1.txt").unlink()
    with pytest.raises(DataError, match=r"img1.png: no caption"):
        read_captioned_folder(txt, 16)


def test_full_unet_fine_tuning_changes_only_the_unet(pipe_dir: Path, tmp_path: Path) -> None:
    gen = load_generator(pipe_dir, PROMPTS, device="cpu")
    data = read_captioned_folder(_captioned_folder(tmp_path / "r", 4, 5, True), 16)
    vae0 = {k: v.clone() for k, v in gen.vae.state_dict().items()}
    tuned = PipelineTrainer(PipelineTrainConfig(learning_rate=1e-2, batch_size=2)).fit(data, gen, 2, 0)
    assert any(not torch.equal(v, tuned.unet.state_dict()[k]) for k, v in gen.unet.state_dict().items())
    assert all(torch.equal(v, tuned.vae.state_dict()[k]) for k, v in vae0.items())
    assert tuned.model_id != gen.model_id and tuned.conditions == tuple(PROMPTS)
    with pytest.raises(ConfigError, match="init"):
        PipelineTrainer().fit(data, None, 2, 0)
