"""FLUX.1 components with random weights, built from configs (nothing downloaded): the tiny model of
the test suite and the FLUX.1-dev-shaped model of ``diffloop bench --shape flux``.

Sizes (``FLUX_CONFIGS``):
- ``"tiny"``: diffusers' own FLUX fast test (tests/pipelines/flux/test_pipeline_flux.py,
  ``get_dummy_components``): ``FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
  num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])`` (the rope axes sum to the head dim), a
  5-layer CLIP text encoder of width 32 (pooled 32), a T5 encoder of width 32, a one-level VAE with
  ``latent_channels=1`` (so 2x2 packing gives the transformer's 4 input channels) and no
  downsampling. Images (3, 32, 32) <-> latents (1, 32, 32) <-> packed (256, 4).
- ``"dev"``: FLUX.1-dev's config.json values (black-forest-labs/FLUX.1-dev: transformer/,
  text_encoder/ (CLIP ViT-L/14), text_encoder_2/ (T5 v1.1 XXL's width, 2 of its layers), vae/):
  11.9e9 transformer parameters. Images (3, 1024, 1024) <-> latents (16, 128, 128) <-> packed (4096,
  64).

``guidance_embeds=True`` is FLUX.1-dev (guidance-distilled: the guidance value is an input of the
transformer), ``False`` FLUX.1-schnell. The scheduler configs are the models' own
(``FLUX_SCHEDULER_CONFIGS``): dev shifts its sigmas by the image sequence length
(``use_dynamic_shifting``), schnell does not (shift 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FLUX_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "dev": {
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 56, 56],
        },
        "text_encoder": {  # CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14)
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            "vocab_size": 49408,
            "layer_norm_eps": 1e-5,
        },
        # google/t5-v1_1-xxl's encoder width and heads, 2 of its 24 layers: the transformer's cost
        # depends only on the embedding width and length, and 24 random layers (4.7e9 parameters)
        # would only slow the benchmark's start.
        "text_encoder_2": {
            "d_model": 4096,
            "d_ff": 10240,
            "d_kv": 64,
            "num_heads": 64,
            "num_layers": 2,
            "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": 32,
            "vocab_size": 32128,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 16,
            "sample_size": 1024,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "force_upcast": True,
        },
    },
    "tiny": {
        "transformer": {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 4, 8],
        },
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 5,
            "num_attention_heads": 4,
            "hidden_act": "gelu",
            "projection_dim": 32,
            "vocab_size": 1000,
            "layer_norm_eps": 1e-5,
        },
        "text_encoder_2": {  # hf-internal-testing/tiny-random-t5's sizes
            "d_model": 32,
            "d_ff": 37,
            "d_kv": 8,
            "num_heads": 4,
            "num_layers": 5,
            "feed_forward_proj": "relu",
            "relative_attention_num_buckets": 8,
            "vocab_size": 1000,
        },
        "vae": {
            "sample_size": 32,
            "block_out_channels": (4,),
            "layers_per_block": 1,
            "latent_channels": 1,
            "norm_num_groups": 1,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "shift_factor": 0.0609,
            "scaling_factor": 1.5035,
        },
    },
}

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
FLUX_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    "schnell": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
}


def flux_scheduler(variant: str = "dev") -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` FLUX.1-``variant`` ships ("dev" or "schnell")."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS[variant])


def build_flux_components(
    size: str = "tiny",
    *,
    guidance_embeds: bool = True,
    tokenizer: Any = None,
    tokenizer_2: Any = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Random-weight FluxPipeline components of ``size`` ("tiny" or "dev", ``FLUX_CONFIGS``).

    ``guidance_embeds``: True = FLUX.1-dev (its scheduler), False = FLUX.1-schnell (its scheduler).
    ``tokenizer`` (CLIP) and ``tokenizer_2`` (T5) default to the in-code tiny ones of
    ``diffloop.testing.tiny_flow`` (for "dev" too: a benchmark needs no real vocabulary); the text
    encoders' special-token ids follow them and their vocabularies are at least the tokenizers'
    sizes. Each network is initialised right after ``torch.manual_seed(seed + i)`` inside
    ``fork_rng``: the weights are a pure function of ``seed`` and the caller's RNG is untouched.
    Returns {transformer, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, scheduler}.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from diffloop.testing.tiny_flow import (
        clip_text_config,
        make_clip_tokenizer,
        make_t5_tokenizer,
        t5_config,
    )

    if size not in FLUX_CONFIGS:
        raise ValueError(f"size must be one of {sorted(FLUX_CONFIGS)}, got {size!r}")
    configs = FLUX_CONFIGS[size]
    tokenizer = tokenizer if tokenizer is not None else make_clip_tokenizer()
    tokenizer_2 = tokenizer_2 if tokenizer_2 is not None else make_t5_tokenizer()
    clip_config = clip_text_config(dict(configs["text_encoder"]), tokenizer)
    t5_config = t5_config(dict(configs["text_encoder_2"]), tokenizer_2)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            **configs["transformer"], guidance_embeds=guidance_embeds
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **configs["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(clip_config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(t5_config)
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "vae": vae,
        "scheduler": flux_scheduler("dev" if guidance_embeds else "schnell"),
    }


def build_tiny_flux(guidance_embeds: bool = True, seed: int = 0) -> Any:
    """The tiny ``FluxPipeline`` in memory with the in-code tiny CLIP and T5 tokenizers
    (``diffloop.testing.tiny_flow``)."""
    from diffusers import FluxPipeline

    components = build_flux_components("tiny", guidance_embeds=guidance_embeds, seed=seed)
    return FluxPipeline(**components, image_encoder=None, feature_extractor=None)


def make_tiny_flux(path: str | Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """``save_pretrained`` the tiny pipeline to ``path``: FLUX.1's directory layout
    (model_index.json with _class_name FluxPipeline, transformer/, text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/, vae/, scheduler/)."""
    path = Path(path)
    build_tiny_flux(guidance_embeds, seed).save_pretrained(path)
    return path
