"""Random-weight flow-matching components built from configs (nothing downloaded): tokenizers, a
tiny SD3 for tests, and an SD3.5-medium-shaped one for ``diffloop bench --shape sd35``.

Tokenizers (shared with the FLUX builders): ``make_clip_tokenizer`` is a word-level tokenizer with
CLIP's layout ([BOS] words [EOS], EOS id 3, not 2: transformers' CLIP pools at the first EOS only
when eos_token_id != 2); ``make_t5_tokenizer`` a ``T5TokenizerFast`` over a tiny Unigram vocabulary
(<pad>=0, </s>=1, <unk>=2, then "▁word" pieces and single letters), which save_pretrained /
AutoTokenizer round-trip offline.

Tiny SD3: diffusers' fast-test sizes (tests/pipelines/stable_diffusion_3/
test_pipeline_stable_diffusion_3.py, ``get_dummy_components``) except a 16x16 latent (256 image
tokens instead of 1024, for CPU speed), ``joint_attention_dim = 64`` = the two 32-wide CLIP
encoders side by side and the T5 width (real SD3 pads CLIP's 2048 to T5's 4096; diffusers' test
crops 64 to 32), and a two-level VAE (images 32x32).
Sizes: latents (4, 16, 16), images (3, 32, 32), prompt embeds (77 + T5_TOKENS, 64), pooled (64,).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CLIP_TOKENS = 77
T5_TOKENS = 16  # the tiny T5's max_sequence_length (SD3's pipeline default is 256)
WORDS = [
    "a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "the", "moon", "cat", "dog",
    "red", "green", "blue", "bench", "car", "ball", "and", "two", "left", "right",
]  # fmt: skip


# ------------------------------------------------------------------------------- tokenizers


def make_clip_tokenizer(words: list[str] = WORDS, max_length: int = CLIP_TOKENS) -> Any:
    """A word-level CLIP-layout tokenizer (``diffloop.shapes.model.build_tokenizer``)."""
    from diffloop.shapes.model import build_tokenizer

    return build_tokenizer(list(words), max_length)


def make_t5_tokenizer(words: list[str] = WORDS, max_length: int = T5_TOKENS) -> Any:
    """``T5TokenizerFast`` over a Unigram vocabulary of the words (as "▁word") and the letters a-z
    (unknown words fall back to letters); ids <pad>=0, </s>=1, <unk>=2; no extra ids."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    pieces += [("\u2581", -4.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_config(c: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    vocab = max(c.pop("vocab_size", 0), len(tokenizer))
    return CLIPTextConfig(**c, vocab_size=vocab, max_position_embeddings=CLIP_TOKENS, **ids)


def t5_config(c: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import T5Config

    vocab = max(c.pop("vocab_size", 0), len(tokenizer))
    return T5Config(**c, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)  # fmt: skip


# -------------------------------------------------------------------------------------- SD3

CLIP_TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5,
             "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 32,
             "layer_norm_eps": 1e-5}  # fmt: skip

SD3_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "transformer": {
            "sample_size": 16, "patch_size": 1, "in_channels": 4, "num_layers": 1,
            "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
            "joint_attention_dim": 64, "pooled_projection_dim": 64, "out_channels": 4,
        },
        "text_encoder": CLIP_TINY,
        "text_encoder_2": CLIP_TINY,
        "text_encoder_3": {"d_model": 64, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
                           "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
        "vae": {
            "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (4, 8),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 1, "use_quant_conv": False,
            "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5035,
        },
        "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    },
    # stabilityai/stable-diffusion-3.5-medium's config.json values (transformer/, text_encoder*/,
    # vae/, scheduler/); text_encoder_3 (T5-XXL, 4.7e9 parameters) is left out of the bench:
    # without it SD3 conditions on zeros of the same sequence length, so the transformer's cost is
    # unchanged.
    "sd35_medium": {
        "transformer": {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
            "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
            "qk_norm": "rms_norm",
        },
        "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "hidden_act": "quick_gelu",
                         "projection_dim": 768, "vocab_size": 49408},
        "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120,
                           "num_hidden_layers": 32, "num_attention_heads": 20,
                           "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408},
        "vae": {
            "sample_size": 1024, "in_channels": 3, "out_channels": 3,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2,
            "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "shift_factor": 0.0609, "scaling_factor": 1.5305,
        },
        "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    },
}  # fmt: skip


def build_sd3_components(
    size: str = "tiny",
    *,
    seed: int = 0,
    clip_tokenizer: Any = None,
    t5_tokenizer: Any = None,
    with_t5: bool | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Random-weight StableDiffusion3Pipeline components of ``size`` ("tiny" or "sd35_medium");
    weights are a pure function of ``seed`` (the caller's RNG is untouched).

    ``clip_tokenizer`` serves both CLIP encoders (default ``make_clip_tokenizer``); ``with_t5``
    (default: when the size has a T5 config) adds text_encoder_3 / tokenizer_3, else they are None.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if size not in SD3_CONFIGS:
        raise ValueError(f"size must be one of {sorted(SD3_CONFIGS)}, got {size!r}")
    configs = SD3_CONFIGS[size]
    with_t5 = "text_encoder_3" in configs if with_t5 is None else with_t5
    clip_tokenizer = clip_tokenizer if clip_tokenizer is not None else make_clip_tokenizer()
    out: dict[str, Any] = {"tokenizer": clip_tokenizer, "tokenizer_2": clip_tokenizer,
                           "text_encoder_3": None, "tokenizer_3": None}  # fmt: skip
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        out["transformer"] = SD3Transformer2DModel(**configs["transformer"])
        torch.manual_seed(seed + 1)
        out["vae"] = AutoencoderKL(**configs["vae"])
        for i, name in enumerate(("text_encoder", "text_encoder_2")):
            torch.manual_seed(seed + 2 + i)
            config = clip_text_config(dict(configs[name]), clip_tokenizer)
            out[name] = CLIPTextModelWithProjection(config)
        if with_t5:
            t5_tokenizer = t5_tokenizer if t5_tokenizer is not None else make_t5_tokenizer()
            torch.manual_seed(seed + 4)
            out["text_encoder_3"] = T5EncoderModel(
                t5_config(dict(configs["text_encoder_3"]), t5_tokenizer)
            )
            out["tokenizer_3"] = t5_tokenizer
    out["scheduler"] = FlowMatchEulerDiscreteScheduler(**configs["scheduler"])
    return out


def build_tiny_sd3(seed: int = 0, **kwargs: Any) -> Any:
    """The tiny ``StableDiffusion3Pipeline`` in memory (``build_sd3_components("tiny")``)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**build_sd3_components("tiny", seed=seed, **kwargs))


def make_tiny_sd3(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Build the tiny SD3 pipeline and ``save_pretrained`` it to ``path`` (loads back offline)."""
    path = Path(path)
    build_tiny_sd3(seed, **kwargs).save_pretrained(path)
    return path
