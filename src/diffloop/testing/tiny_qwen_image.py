"""Qwen-Image components with random weights, built from configs (nothing downloaded): the tiny
model of the test suite, the Qwen-Image-shaped model of ``diffloop bench --shape qwen_image``, an
in-code Qwen2 tokenizer, and the reference the policy is compared with (diffusers'
``QwenImagePipeline`` run from given initial latents).

Sizes (``QWEN_IMAGE_CONFIGS``):
- ``"tiny"``: diffusers' own Qwen-Image fast test (tests/pipelines/qwenimage/test_qwenimage.py,
  ``get_dummy_components``): ``QwenImageTransformer2DModel(patch_size=2, in_channels=16,
  out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
  joint_attention_dim=16, axes_dims_rope=(8, 4, 4))``, a 2-layer Qwen2.5-VL of width 16 (its
  vision tower 2 layers of 16), and an ``AutoencoderKLQwenImage`` with ``z_dim=4``,
  ``dim_mult=[1, 2, 4]`` (two spatial downsamplings: ``vae_scale_factor`` 4). Two changes: the text
  encoder's vocabulary is the in-code tokenizer's (a few hundred ids instead of 152064), and the
  VAE's ``latents_mean`` / ``latents_std`` are Qwen-Image's first four values instead of 0 / 1, so
  that the per-channel de-normalisation before decoding is exercised. Images (3, 32, 32) <->
  latents (4, 8, 8) <-> packed (16, 16).
- ``"qwen_image"``: Qwen/Qwen-Image's config.json values (transformer/, vae/ = the class defaults,
  text_encoder/ = Qwen2.5-VL-7B-Instruct's width, heads and vocabulary with 2 of its 28 language
  layers and 1 of its 32 vision layers: the transformer's cost depends on the embedding width and
  length only, and the vision tower is never run for text-to-image): 20.4e9 transformer parameters.
  Images (3, 1024, 1024) <-> latents (16, 128, 128) <-> packed (4096, 64).

The scheduler is Qwen-Image's own (``QWEN_IMAGE_SCHEDULER_CONFIG``, its
scheduler/scheduler_config.json): sigmas shifted by the image sequence length
(``use_dynamic_shifting``, exponential time shift with the pipeline's ``calculate_shift`` mu) and
stretched so that the last nonzero sigma is 0.02 (``shift_terminal``). The tiny model uses it too
(diffusers' fast test uses the default scheduler), so the schedule is tested as it ships.

The tokenizer (``make_qwen_tokenizer``) is a ``Qwen2Tokenizer``: Qwen2's byte-level BPE with its
pre-tokenisation regex, trained in code on the pipeline's prompt template and a few words, so every
word of the template is one token as with the real tokenizer. The template's system part and
"<|im_start|>user\\n" are then exactly ``QwenImagePipeline.prompt_template_encode_start_idx`` = 34
tokens (the prefix the pipeline drops), and the special tokens have Qwen2.5-VL's order
(<|endoftext|>, <|im_start|>, <|im_end|>, ..., <|vision_start|>, ..., <|video_pad|>).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffloop.policies.qwen_image import PROMPT_TEMPLATE
from diffloop.testing.tiny_flow import WORDS

# Qwen2.5-VL's special tokens in vocabulary order (ids 151643 .. 151656 in the real tokenizer).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Qwen/Qwen-Image scheduler/scheduler_config.json.
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

QWEN_IMAGE_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "transformer": {
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 3,
            "joint_attention_dim": 16,
            "guidance_embeds": False,
            "axes_dims_rope": (8, 4, 4),
        },
        "text_encoder": {
            "text_config": {
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [1, 1, 2],
                },
            },
            "vision_config": {
                "depth": 2,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
        },
        "vae": {
            "base_dim": 24,
            "z_dim": 4,
            "dim_mult": [1, 2, 4],
            "num_res_blocks": 1,
            "temperal_downsample": [False, True],
            "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075],
            "latents_std": [2.8184, 1.4541, 2.3275, 2.6558],
        },
    },
    "qwen_image": {
        "transformer": {
            "patch_size": 2,
            "in_channels": 64,
            "out_channels": 16,
            "num_layers": 60,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 3584,
            "guidance_embeds": False,
            "axes_dims_rope": (16, 56, 56),
        },
        # Qwen/Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder/config.json) with 2 of its 28
        # language layers and 1 of its 32 vision layers (module docstring).
        "text_encoder": {
            "text_config": {
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 2,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-6,
                "max_position_embeddings": 128000,
                "vocab_size": 152064,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [16, 24, 24],
                },
            },
            "vision_config": {
                "depth": 1,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "fullatt_block_indexes": [0],
                "tokens_per_second": 2,
            },
        },
        "vae": {},  # AutoencoderKLQwenImage's defaults are Qwen-Image's vae/config.json
    },
}


# ------------------------------------------------------------------------------- tokenizer


def _tokenizer_corpus(words: Sequence[str]) -> list[str]:
    """The template's text between its special tokens, and each word after a newline (a prompt's
    first word) and after a space."""
    text = PROMPT_TEMPLATE.format("")
    for special in QWEN_SPECIAL_TOKENS:
        text = text.replace(special, "\0")
    pieces = [p for p in text.split("\0") if p]
    return pieces + [f"\n{w}" for w in words] + [f" {w}" for w in words]


def make_qwen_tokenizer(words: Sequence[str] = WORDS) -> Any:
    """A ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenisation) whose merges are trained in
    code on the prompt template and ``words``: each of them is one token, anything else falls back
    to byte tokens. The special tokens follow the vocabulary in Qwen2.5-VL's order; <|endoftext|>
    pads, as in Qwen2.5-VL's tokenizer."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # A vocabulary limit far above what the corpus can fill: merging stops when every pre-token
    # is a single token.
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_tokenizer_corpus(words), trainer)
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)  # adds <|endoftext|>
    specials = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[1:]]
    tokenizer.add_tokens(specials, special_tokens=True)
    return tokenizer


def text_encoder_config(c: dict[str, Any], tokenizer: Any) -> Any:
    """``Qwen2_5_VLConfig`` from ``c`` ({"text_config", "vision_config"}): the vocabulary at
    least the tokenizer's, the special-token ids the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = dict(c["text_config"])
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(c["vision_config"]), **ids)


# ------------------------------------------------------------------------------- components


def qwen_image_scheduler() -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` Qwen-Image ships
    (``QWEN_IMAGE_SCHEDULER_CONFIG``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)


def build_qwen_image_components(
    size: str = "tiny",
    *,
    tokenizer: Any = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Random-weight QwenImagePipeline components of ``size`` ("tiny" or "qwen_image",
    ``QWEN_IMAGE_CONFIGS``).

    ``tokenizer`` defaults to ``make_qwen_tokenizer()`` (for "qwen_image" too: a benchmark needs no
    real vocabulary). Each network is initialised right after ``torch.manual_seed(seed + i)``
    inside ``fork_rng``: the weights are a pure function of ``seed`` and the caller's RNG is
    untouched. The text encoder is in eval mode, as ``from_pretrained`` loads it.
    Returns {transformer, text_encoder, tokenizer, vae, scheduler}.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    if size not in QWEN_IMAGE_CONFIGS:
        raise ValueError(f"size must be one of {sorted(QWEN_IMAGE_CONFIGS)}, got {size!r}")
    configs = QWEN_IMAGE_CONFIGS[size]
    tokenizer = tokenizer if tokenizer is not None else make_qwen_tokenizer()
    encoder_config = text_encoder_config(configs["text_encoder"], tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**configs["transformer"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(**configs["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = Qwen2_5_VLForConditionalGeneration(encoder_config).eval()
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "vae": vae,
        "scheduler": qwen_image_scheduler(),
    }


def build_tiny_qwen_image(seed: int = 0) -> Any:
    """The tiny ``QwenImagePipeline`` in memory, with the in-code tokenizer."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**build_qwen_image_components("tiny", seed=seed))


def make_tiny_qwen_image(path: str | Path, seed: int = 0) -> Path:
    """``save_pretrained`` the tiny pipeline to ``path``: Qwen-Image's directory layout
    (model_index.json with _class_name QwenImagePipeline, transformer/, text_encoder/, tokenizer/,
    vae/, scheduler/); ``QwenImagePipeline.from_pretrained(path)`` loads it offline."""
    path = Path(path)
    build_tiny_qwen_image(seed).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------- reference


def pipeline_initial_latents(
    pipe: Any, n: int, resolution: int, generator: torch.Generator
) -> torch.Tensor:
    """Packed initial noise as ``QwenImagePipeline.prepare_latents`` draws it: (n, 1, C, h, w)
    standard normal from ``generator``, packed in 2x2 patches to (n, h/2 * w/2, 4C), where
    C = transformer in_channels / 4 and h = w = 2 * (resolution // (vae_scale_factor * 2))."""
    channels = pipe.transformer.config.in_channels // 4
    side = 2 * (resolution // (pipe.vae_scale_factor * 2))
    noise = torch.randn((n, 1, channels, side, side), generator=generator)
    return pipe._pack_latents(noise, n, channels, side, side)


def pipeline_reference(
    pipe: Any,
    prompts: Sequence[str],
    latents: torch.Tensor,
    *,
    num_steps: int,
    resolution: int,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    max_sequence_length: int = 512,
) -> torch.Tensor:
    """The images (N, 3, H, W) in [0, 1] that ``QwenImagePipeline`` generates from the packed
    initial ``latents`` (N, L, 4C): its deterministic Euler sampler (noise level 0) on its
    mu-shifted schedule, with "true CFG" when ``guidance_scale`` > 1 (``true_cfg_scale``: a
    second transformer call on ``negative_prompt``, combined as
    v = v_neg + w (v_pos - v_neg), rescaled to the norm of v_pos over the channel dimension), and
    one branch otherwise. ``negative_prompt`` None with ``guidance_scale`` > 1 means "" (diffloop's
    default negative prompt); the pipeline itself would then skip CFG.
    """
    cfg = guidance_scale > 1.0
    negative = (negative_prompt if negative_prompt is not None else "") if cfg else None
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[negative] * len(prompts) if cfg else None,
        true_cfg_scale=guidance_scale if cfg else 1.0,
        height=resolution,
        width=resolution,
        num_inference_steps=num_steps,
        latents=latents,
        max_sequence_length=max_sequence_length,
        output_type="pt",
    )
    return out.images
