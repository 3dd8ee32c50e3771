"""Tiny random-weight Stable Diffusion pipelines for tests, built from configs (nothing downloaded).

Follows diffusers' own pipeline tests (tests/pipelines/stable_diffusion): a UNet with (32, 64)
channels, a 2-layer CLIP text encoder of width 32, a 2-level VAE, and a CLIP tokenizer read from the
committed fixture tests/fixtures/tiny_tokenizer (regenerate it with make_tiny_tokenizer.py there).

Sizes: latents (4, 16, 16), images (3, 32, 32) (the VAE downsamples by 2), text (77, 32).
``prediction_type="epsilon"`` mimics SD 1.x, ``"v_prediction"`` SD 2.x; the networks are otherwise
identical.

Use from a conftest::

    @pytest.fixture(scope="session")
    def tiny_sd(tmp_path_factory):
        return tiny_sd_dir(tmp_path_factory)              # or prediction_type="v_prediction"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup costs ~50 s; never needed

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "tiny_tokenizer"
MAX_TOKENS = 77  # CLIP's context length; prompts longer than this are truncated by the pipeline
LATENT_SIZE = 16
IMAGE_SIZE = 32  # LATENT_SIZE * 2 (VAE with two blocks -> one downsampling)
TEXT_DIM = 32


def make_tiny_tokenizer() -> CLIPTokenizer:
    """CLIP BPE tokenizer from the committed vocab.json / merges.txt (914 tokens, max length 77)."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    # transformers 5's CLIPTokenizer takes merges as (a, b) tuples; skip the "#version" line
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def make_tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """2-layer CLIP text transformer of width 32 whose special-token ids match ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # != 2, so the pooled output uses this id
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_tiny_unet() -> UNet2DConditionModel:
    """UNet on (4, 16, 16) latents, (32, 64) channels, cross-attention to width-32 text."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),  # num_attention_heads=... raises in UNet2DConditionModel
        norm_num_groups=32,
    )


def make_tiny_vae() -> AutoencoderKL:
    """KL autoencoder (3, 32, 32) <-> (4, 16, 16)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    )


def make_tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's DDIM schedule, every field explicit so the pipeline does not rewrite the config."""
    from diffloop.bench import sd_ddim_scheduler

    return sd_ddim_scheduler(prediction_type)


def build_tiny_sd(prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline in memory; weights are a pure function of ``seed``.

    Each network is initialised right after ``torch.manual_seed(seed + i)`` inside ``fork_rng``, so
    the weights do not depend on the caller's RNG state and the caller's RNG is left untouched.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    tokenizer = make_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_tiny_unet()
        torch.manual_seed(seed + 1)
        vae = make_tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = make_tiny_text_encoder(tokenizer)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path``; returns ``path`` as a Path.

    Loads back offline with ``StableDiffusionPipeline.from_pretrained(path)``.
    """
    path = Path(path)
    build_tiny_sd(prediction_type, seed).save_pretrained(path)
    return path


def tiny_sd_dir(tmp_path_factory, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """For a session-scoped conftest fixture: a fresh tiny pipeline under pytest's tmp root."""
    path = tmp_path_factory.mktemp(f"tiny_sd_{prediction_type}")
    return make_tiny_sd(path, prediction_type, seed)
