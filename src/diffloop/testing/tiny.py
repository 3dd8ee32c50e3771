"""Tiny random-weight Stable Diffusion components, built from configs: one builder for tests and
bench.

Follows diffusers' own pipeline tests (tests/pipelines/stable_diffusion): a UNet with (32, 64)
channels, a 2-layer CLIP text encoder of width 32, a 2-level VAE, SD's DDIM schedule.

Sizes: latents (4, 16, 16), images (3, 32, 32) (the VAE downsamples by 2), text (77, 32).
``prediction_type="epsilon"`` mimics SD 1.x, ``"v_prediction"`` SD 2.x; the networks are otherwise
identical. The tokenizer is the caller's; by default the committed CLIP BPE tokenizer
(``diffloop.testing.tokenizer``), with which the test suite's pipelines are built (bench passes a
word-level one, ``make_word_tokenizer``).

Use from a conftest::

    @pytest.fixture(scope="session")
    def tiny_sd(tmp_path_factory):
        return tiny_sd_dir(tmp_path_factory)              # or prediction_type="v_prediction"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# MAX_TOKENS: CLIP's context length; prompts longer than this are truncated by the pipeline
from diffloop.testing.tokenizer import MAX_TOKENS, make_tiny_tokenizer

LATENT_SIZE = 16
IMAGE_SIZE = 32  # LATENT_SIZE * 2 (VAE with two blocks -> one downsampling)
TEXT_DIM = 32
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The vocabulary of benchmark prompts (bench's word-level tokenizers, SD and SDXL shapes).
PROMPT_WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "astronaut",
    "riding",
    "a",
    "horse",
    "on",
    "the",
    "moon",
    "cat",
    "dog",
    "red",
    "green",
    "blue",
]

UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": (2, 4),  # num_attention_heads=... raises in UNet2DConditionModel
    "norm_num_groups": 32,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
    "sample_size": IMAGE_SIZE,
}


def make_word_tokenizer(words: list[str] = PROMPT_WORDS) -> Any:
    """A word-level tokenizer of max length 77 (no files needed)."""
    from diffloop.shapes.model import build_tokenizer

    return build_tokenizer(list(words), MAX_TOKENS)


def make_tiny_text_encoder(tokenizer: Any) -> Any:
    """2-layer CLIP text transformer of width 32 whose special-token ids match ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # != 2 for CLIP BPE, so the pooled output uses this id
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_tiny_unet() -> Any:
    """UNet on (4, 16, 16) latents, (32, 64) channels, cross-attention to width-32 text."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_tiny_vae() -> Any:
    """KL autoencoder (3, 32, 32) <-> (4, 16, 16)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> Any:
    """Stable Diffusion's DDIM schedule, every field explicit so a pipeline does not rewrite the
    config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_components(
    prediction_type: str = "epsilon",
    seed: int = 0,
    tokenizer: Any = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """{"unet", "text_encoder", "tokenizer", "scheduler", "vae"}; weights a pure function of
    ``seed``.

    Each network is initialised right after ``torch.manual_seed(seed + i)`` inside ``fork_rng``, so
    the weights do not depend on the caller's RNG state and the caller's RNG is left untouched.
    ``tokenizer`` defaults to the committed CLIP BPE one (``make_tiny_tokenizer``).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_tiny_unet()
        torch.manual_seed(seed + 1)
        vae = make_tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = make_tiny_text_encoder(tokenizer)
    if device is not None:
        unet, vae, text_encoder = unet.to(device), vae.to(device), text_encoder.to(device)
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": sd_ddim_scheduler(prediction_type),
        "vae": vae,
    }


def build_tiny_sd(prediction_type: str = "epsilon", seed: int = 0, tokenizer: Any = None) -> Any:
    """The tiny ``StableDiffusionPipeline`` in memory (``build_tiny_components``)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **build_tiny_components(prediction_type, seed, tokenizer),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_sd(
    path: str | Path, prediction_type: str = "epsilon", seed: int = 0, tokenizer: Any = None
) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path`` (loads back offline)."""
    path = Path(path)
    build_tiny_sd(prediction_type, seed, tokenizer).save_pretrained(path)
    return path


def tiny_sd_dir(tmp_path_factory: Any, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """For a session-scoped pytest fixture: a fresh tiny pipeline under pytest's tmp root."""
    path = tmp_path_factory.mktemp(f"tiny_sd_{prediction_type}")
    return make_tiny_sd(path, prediction_type, seed)
