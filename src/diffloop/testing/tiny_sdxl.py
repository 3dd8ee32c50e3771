"""Random-weight SDXL components built from configs: SDXL base 1.0's shapes (for bench) and
diffusers' fast-test sizes (for tests); nothing is downloaded.

The tests' pipeline (``build_tiny_sdxl``, ``tiny_sdxl_dir``) has diffusers' own SDXL fast-test sizes
(tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, ``get_dummy_components``), kept in
``SDXL_CONFIGS["tiny"]``: a (2, 4)-channel UNet with ``addition_embed_type="text_time"`` (6 time ids
x 8 + pooled 32 = 80 inputs), two 5-layer CLIP text encoders of width 32 (the second with a 32-wide
projection), a 2-level VAE. Both encoders use the committed CLIP BPE tokenizer
(``diffloop.testing.tokenizer``), as diffusers' test uses one tiny CLIP tokenizer twice.
Sizes: latents (4, 32, 32), images (3, 64, 64), text (77, 64), pooled (32,). Its scheduler is saved
as diffusers' test and SDXL base 1.0 ship it, Euler (``EulerDiscreteScheduler``), so loading the
directory exercises the conversion to DDIM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffloop.policies.schedulers import to_ddim

# -------------------------------------------------------------------------- random-weight models

# The fast test's CLIP text encoders (both the same, the second with a 32-wide projection).
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "projection_dim": 32,
    "vocab_size": 1000,
}

# SDXL base 1.0's config.json values (stabilityai/stable-diffusion-xl-base-1.0: unet/,
# text_encoder/, text_encoder_2/, vae/), and as "tiny" diffusers' SDXL fast-test sizes
# (tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py, get_dummy_components).
SDXL_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "base": {
        "unet": {
            "sample_size": 128,
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,  # 6 x 256 + 1280
            "norm_num_groups": 32,
        },
        "text_encoder": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
            "vocab_size": 49408,
        },
        "text_encoder_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "hidden_act": "gelu",
            "projection_dim": 1280,
            "vocab_size": 49408,
        },
        "vae": {
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 1024,
            "scaling_factor": 0.13025,
            "force_upcast": True,
        },
    },
    "tiny": {
        "unet": {
            "sample_size": 32,
            "block_out_channels": (2, 4),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "cross_attention_dim": 64,  # 32 + 32
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,  # 6 x 8 + 32
            "norm_num_groups": 1,
        },
        "text_encoder": TINY_TEXT_CONFIG,
        "text_encoder_2": TINY_TEXT_CONFIG,
        "vae": {
            "block_out_channels": (32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4,
            "sample_size": 128,
        },
    },
}

# SDXL base 1.0's scheduler/scheduler_config.json less the PNDM leftovers (clip_sample,
# set_alpha_to_one, skip_prk_steps), which many fine-tunes drop too: the conversion must not rely
# on them.
SDXL_EULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def build_sdxl_components(
    size: str = "base", *, device: torch.device | str = "cpu", seed: int = 0, tokenizer: Any = None
) -> dict[str, Any]:
    """Random-weight SDXL components of ``size`` ("base": SDXL base 1.0's shapes, 3.5e9 parameters;
    "tiny": diffusers' fast-test shapes) for benchmarks and tests; nothing is downloaded.

    ``tokenizer`` (used for both encoders) defaults to a word-level one; the text encoders' special
    token ids follow it and their vocabulary is at least its size. The scheduler is SDXL's Euler
    config
    converted by ``to_ddim``, as loading a real SDXL directory does.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if size not in SDXL_CONFIGS:
        raise ValueError(f"size must be one of {sorted(SDXL_CONFIGS)}, got {size!r}")
    configs = SDXL_CONFIGS[size]
    if tokenizer is None:
        from diffloop.shapes.model import build_tokenizer
        from diffloop.testing.tiny import PROMPT_WORDS

        tokenizer = build_tokenizer(PROMPT_WORDS, 77)

    def text_config(name: str) -> Any:
        c = dict(configs[name])
        c["vocab_size"] = max(c["vocab_size"], len(tokenizer))
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return CLIPTextConfig(**c, max_position_embeddings=77, layer_norm_eps=1e-5, **ids)

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**configs["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config("text_encoder"))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2"))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": to_ddim(SDXL_EULER_CONFIG),
        "force_zeros_for_empty_prompt": True,
    }


# ----------------------------------------------------------------------- the tests' tiny pipeline


def build_tiny_sdxl(seed: int = 0) -> Any:
    """The tiny SDXL pipeline in memory (Euler scheduler, no watermarker); weights are a pure
    function of ``seed`` and the caller's RNG is left untouched."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from diffloop.testing.tokenizer import make_tiny_tokenizer

    c = build_sdxl_components("tiny", seed=seed, tokenizer=make_tiny_tokenizer())
    return StableDiffusionXLPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"],
        tokenizer_2=c["tokenizer_2"],
        unet=c["unet"],
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG),
        add_watermarker=False,
    )


def make_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """``save_pretrained`` the tiny pipeline to ``path``: the real SDXL directory layout."""
    path = Path(path)
    build_tiny_sdxl(seed).save_pretrained(path)
    return path


def tiny_sdxl_dir(tmp_path_factory: Any, seed: int = 0) -> Path:
    """For a session-scoped pytest fixture: a fresh tiny SDXL directory under pytest's tmp root."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed)
