"""Tiny random-weight Stable Diffusion pipelines, built from configs, for tests, docs and benchmarks.

A real audit loads a user's pipeline directory (:mod:`diffaudit.generators.pipeline`); tests cannot download one, so
they build a pipeline of the same *layout* (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
a scheduler; ``model_index.json``) with a few thousand random weights and save it with
``save_pretrained(safe_serialization=True)``. Everything here is deterministic given ``seed``.

The tokenizer is a byte-level CLIP BPE with no merges: its vocabulary is the 256 byte symbols, each also with
the end-of-word marker, plus the start and end tokens. Every string tokenizes (one token per character), which
is all a test needs, and the files are the standard ``vocab.json`` + ``merges.txt`` any CLIPTokenizer reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffaudit.errors import ConfigError


@dataclass(frozen=True)
class TinyPipelineConfig:
    """Sizes of a tiny pipeline.

    ``resolution`` is the image side in pixels; the VAE downsamples by ``2 ** (len(vae_channels) - 1)`` (8 for
    four blocks, as in Stable Diffusion), so latents are ``resolution / 8`` pixels wide by default.
    """

    resolution: int = 32
    unet_channels: tuple[int, ...] = (8, 16)
    vae_channels: tuple[int, ...] = (4, 4, 8, 8)
    latent_channels: int = 4
    text_hidden: int = 16
    text_layers: int = 2
    max_tokens: int = 16
    norm_groups: int = 4
    prediction_type: str = "epsilon"


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tiny_tokenizer(directory: str | Path, max_tokens: int = 16) -> Path:
    """Write a byte-level CLIP tokenizer (``vocab.json``, ``merges.txt``, configs) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_tokens,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        ),
        encoding="utf-8",
    )
    return directory


def build_tiny_pipeline(config: TinyPipelineConfig = TinyPipelineConfig(), seed: int = 0):  # -> StableDiffusionPipeline
    """A random-weight ``StableDiffusionPipeline`` of the Stable Diffusion 1.x layout, on CPU in float32."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    factor = 2 ** (len(config.vae_channels) - 1)
    if config.resolution % (factor * 2 ** (len(config.unet_channels) - 1)):
        raise ConfigError(f"tiny pipeline resolution {config.resolution} must be divisible by the total downsampling")
    torch.manual_seed(seed)  # diffusers/transformers initialise weights from the global generator only
    unet = UNet2DConditionModel(
        sample_size=config.resolution // factor,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(config.unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(config.unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=2,
        norm_num_groups=config.norm_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        layers_per_block=1,
        sample_size=config.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=2 * 256 + 2,
            hidden_size=config.text_hidden,
            intermediate_size=2 * config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=2,
            max_position_embeddings=config.max_tokens,
            projection_dim=config.text_hidden,
            bos_token_id=2 * 256,
            eos_token_id=2 * 256 + 1,
            pad_token_id=2 * 256 + 1,
        )
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp, config.max_tokens))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=config.prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(directory: str | Path, config: TinyPipelineConfig = TinyPipelineConfig(), seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as safetensors + JSON into ``directory`` (the ``sd:PATH`` layout)."""
    pipe = build_tiny_pipeline(config, seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
