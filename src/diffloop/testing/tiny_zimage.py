"""Z-Image components with random weights, built from configs (nothing downloaded): the tiny model
of the test suite, the Z-Image-shaped one of ``diffloop bench --shape zimage``, and the reference
harness the policy's parity tests compare against (``ZImagePipeline`` itself at noise 0).

Sizes (``ZIMAGE_CONFIGS``):
- ``"tiny"``: diffusers' own Z-Image fast test (tests/pipelines/z_image/test_z_image.py,
  ``get_dummy_components``): ``ZImageTransformer2DModel(dim=32, n_layers=2, n_refiner_layers=1,
  n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4])`` (the rope axes sum to the head
  dim 16), a 2-layer Qwen3 of width 16 (its ``cap_feat_dim``), a two-level VAE with 16 latent
  channels (narrower than the test's (32, 64) blocks, for CPU speed) and FLUX.1's scaling / shift.
  ``axes_lens`` are [1024, 64, 64] (the test's [256, 32, 32] would cap the caption at 255 tokens:
  the caption's position runs along the first axis). Images (3, 32, 32) <-> latents (16, 16, 16)
  <-> 8 x 8 = 64 image tokens of 2x2 patches.
- ``"z_image"``: the config.json values of Tongyi-MAI/Z-Image and Tongyi-MAI/Z-Image-Turbo (the
  same architecture): transformer/ (S3-DiT, 6.15e9 parameters: dim 3840, 30 layers + 2 + 2
  refiner layers, 30 heads), text_encoder/ (Qwen3-4B as ``Qwen3Model``, 4.02e9 parameters:
  width 2560, 36 layers, 32 query / 8 key-value heads of 128), vae/ (FLUX.1's 16-channel VAE).

Variants (``ZIMAGE_SCHEDULER_CONFIGS``): the checkpoints differ in weights and in their scheduler
config only: Z-Image (base, CFG, 28-50 steps) shifts its sigmas statically by 6.0, Z-Image-Turbo
(distilled, no CFG, 8-9 steps) by 3.0; neither shifts by the image size (``use_dynamic_shifting``
false: the ``mu`` the pipeline passes is ignored).

Tokenizer (``make_qwen_tokenizer``): a ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer)
over the 256 byte symbols plus merges spelling out ``tiny_flow.WORDS`` (any text tokenizes: unknown
words fall back to bytes), with Qwen's special tokens (<|endoftext|> = pad and eos, <|im_start|>,
<|im_end|>, <think>, </think>) and a chat template that renders system / user messages and the
generation prompt exactly as Qwen3's (ChatML; ``enable_thinking=False`` adds the empty think
block, ``True``, the pipeline's choice, adds nothing). It round-trips through save_pretrained /
from_pretrained offline.

Pipeline conventions a policy must reproduce (diffusers 0.42 ``pipeline_z_image.py``), which
``zimage_pipeline_latents`` runs as the reference:
- text: the chat template over [{"role": "user", "content": prompt}], padded to
  ``max_sequence_length`` (512), the text encoder's hidden_states[-2], and only the unmasked tokens
  kept: a list of (L_i, cap_feat_dim) tensors of different lengths;
- the transformer takes lists of (C, 1, H, W) latents and of caption embeddings, the time
  (1000 - t) / 1000 = 1 - sigma (reversed), and returns the NEGATED velocity: v = -output;
- CFG: pos + s (pos - neg) with the pipeline's ``guidance_scale`` s (> 0 turns it on; diffloop's
  usual w is s + 1), optional ``cfg_normalization`` k (||pred|| capped at k ||pos|| per sample)
  and ``cfg_truncation`` (no CFG where 1 - sigma > it; the default 1.0 never truncates);
- sigmas linspace(1, 1/T, T) through the scheduler's static shift, then a final 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffloop.testing.tiny_flux import FLUX_CONFIGS

ZIMAGE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "z_image": {
        "transformer": {
            "all_patch_size": (2,),
            "all_f_patch_size": (1,),
            "in_channels": 16,
            "dim": 3840,
            "n_layers": 30,
            "n_refiner_layers": 2,
            "n_heads": 30,
            "n_kv_heads": 30,
            "norm_eps": 1e-5,
            "qk_norm": True,
            "cap_feat_dim": 2560,
            "rope_theta": 256.0,
            "t_scale": 1000.0,
            "axes_dims": [32, 48, 48],
            "axes_lens": [1024, 512, 512],
        },
        "text_encoder": {  # Qwen/Qwen3-4B's config.json (the pipeline loads it as Qwen3Model)
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
        # FLUX.1's VAE (vae/config.json of both checkpoints)
        "vae": dict(FLUX_CONFIGS["dev"]["vae"]),
    },
    "tiny": {
        "transformer": {
            "all_patch_size": (2,),
            "all_f_patch_size": (1,),
            "in_channels": 16,
            "dim": 32,
            "n_layers": 2,
            "n_refiner_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 2,
            "norm_eps": 1e-5,
            "qk_norm": True,
            "cap_feat_dim": 16,
            "rope_theta": 256.0,
            "t_scale": 1000.0,
            "axes_dims": [8, 4, 4],
            "axes_lens": [1024, 64, 64],
        },
        "text_encoder": {
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 1024,
        },
        "vae": {
            "block_out_channels": (8, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "layers_per_block": 1,
            "latent_channels": 16,
            "norm_num_groups": 4,
            "sample_size": 32,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
        },
    },
}

# scheduler/scheduler_config.json of Tongyi-MAI/Z-Image and Tongyi-MAI/Z-Image-Turbo.
ZIMAGE_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "base": {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 6.0},
    "turbo": {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0},
}

# ------------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3's chat template restricted to what a text-to-image prompt uses (no tools, no assistant
# turns): the same text as Qwen/Qwen3-4B's template for system and user messages and the
# generation prompt, with and without enable_thinking.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table (the byte-level pre-tokenizer's alphabet), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def make_qwen_tokenizer(words: Sequence[str] | None = None) -> Any:
    """A tiny ``Qwen2Tokenizer`` (module docstring): ids 0-255 the byte symbols, then one merge
    result per prefix of each " word" (as "Ġword"), then the special tokens; padding on the right
    (Qwen3's); ``model_max_length`` Qwen3's 131072."""
    from transformers import Qwen2Tokenizer

    from diffloop.testing.tiny_flow import WORDS

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges: list[tuple[str, str]] = []
    space = _byte_symbols()[ord(" ")]
    for word in dict.fromkeys(w.lower() for w in (WORDS if words is None else words)):
        pieces = [space, *word]
        left = pieces[0]
        for right in pieces[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left += right
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, model_max_length=131072, padding_side="right"
    )
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------ components


def zimage_scheduler(variant: str = "base") -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` Z-Image (``"base"``) or Z-Image-Turbo
    (``"turbo"``) ships."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if variant not in ZIMAGE_SCHEDULER_CONFIGS:
        raise ValueError(
            f"variant must be one of {sorted(ZIMAGE_SCHEDULER_CONFIGS)}, got {variant!r}"
        )
    return FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIGS[variant])


def qwen3_config(c: dict[str, Any], tokenizer: Any) -> Any:
    """``Qwen3Config`` of ``c`` whose vocabulary covers ``tokenizer`` and whose pad / eos ids are
    its <|endoftext|>."""
    from transformers import Qwen3Config

    c = dict(c)
    vocab = max(c.pop("vocab_size", 0), len(tokenizer))
    return Qwen3Config(**c, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)  # fmt: skip


def build_zimage_components(
    size: str = "tiny",
    *,
    variant: str = "base",
    tokenizer: Any = None,
    text_encoder_layers: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Random-weight ZImagePipeline components of ``size`` ("tiny" or "z_image",
    ``ZIMAGE_CONFIGS``) with ``variant``'s scheduler ("base" or "turbo").

    ``tokenizer`` defaults to ``make_qwen_tokenizer()`` (for "z_image" too: a benchmark needs no
    real vocabulary; the text encoder's vocabulary is at least the tokenizer's).
    ``text_encoder_layers`` overrides the text encoder's depth (the benchmark keeps 2 of Qwen3-4B's
    36: the transformer's cost depends only on the caption's width and length). The transformer's
    pad tokens (``torch.empty`` in its constructor) are drawn from N(0, 1) like the other weights.
    Each network is initialised right after ``torch.manual_seed(seed + i)`` inside ``fork_rng``:
    the weights are a pure function of ``seed`` and the caller's RNG is untouched.
    Returns {transformer, text_encoder, tokenizer, vae, scheduler}.
    """
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Model

    if size not in ZIMAGE_CONFIGS:
        raise ValueError(f"size must be one of {sorted(ZIMAGE_CONFIGS)}, got {size!r}")
    configs = ZIMAGE_CONFIGS[size]
    tokenizer = tokenizer if tokenizer is not None else make_qwen_tokenizer()
    text_config = dict(configs["text_encoder"])
    if text_encoder_layers is not None:
        text_config["num_hidden_layers"] = text_encoder_layers
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**configs["transformer"])
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **configs["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3Model(qwen3_config(text_config, tokenizer))
    return {
        "transformer": transformer,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "vae": vae,
        "scheduler": zimage_scheduler(variant),
    }


def build_tiny_zimage(variant: str = "base", seed: int = 0) -> Any:
    """The tiny ``ZImagePipeline`` in memory with the in-code tiny Qwen tokenizer."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(**build_zimage_components("tiny", variant=variant, seed=seed))


def make_tiny_zimage(path: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """``save_pretrained`` the tiny pipeline to ``path``: Z-Image's directory layout
    (model_index.json with _class_name ZImagePipeline, transformer/, text_encoder/, tokenizer/,
    vae/, scheduler/), which ``ZImagePipeline.from_pretrained`` loads back offline."""
    path = Path(path)
    build_tiny_zimage(variant, seed).save_pretrained(path)
    return path


# ------------------------------------------------------------------------ reference harness


def zimage_pipeline_latents(
    pipe: Any,
    prompts: Sequence[str],
    latents: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float = 0.0,
    negative_prompt: str | None = None,
    cfg_normalization: float = 0.0,
    cfg_truncation: float = 1.0,
    max_sequence_length: int = 512,
    output_type: str = "latent",
) -> torch.Tensor:
    """``ZImagePipeline`` itself from the initial noise ``latents`` (N, C, h, w): its final
    latents (N, C, h, w) float32 (``output_type="latent"``), or its images (N, 3, H, W) in [0, 1]
    (``"pt"``).

    ``guidance_scale`` is the PIPELINE's s (pos + s (pos - neg); 0 = no CFG), i.e. diffloop's
    ``sample.guidance_scale`` minus 1. ``cfg_normalization`` k > 0 caps each guided output's norm
    at k times the positive one's (the pipeline's ``True`` is k = 1). ``negative_prompt`` is used
    for every sample ("" when None, as the pipeline). The prompts are copied: the pipeline writes
    the chat-templated text back into the list it is given.
    """
    side = pipe.vae_scale_factor
    height, width = latents.shape[-2] * side, latents.shape[-1] * side
    negative = None if guidance_scale <= 0 else [negative_prompt or ""] * len(prompts)
    out = pipe(
        prompt=list(prompts),
        negative_prompt=negative,
        latents=latents.clone(),
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        cfg_normalization=cfg_normalization,
        cfg_truncation=cfg_truncation,
        max_sequence_length=max_sequence_length,
        output_type=output_type,
    )
    return out.images
