"""FLUX.2 components with random weights, built from configs (nothing downloaded): the tiny dev-
and Klein-style pipelines of the test suite, the reference harness the parity tests compare a
policy against, and the real-sized shapes of ``diffloop bench --shape flux2 | flux2_klein``.

The two pipelines of diffusers 0.42.1 (``pipelines/flux2/pipeline_flux2.py``,
``pipeline_flux2_klein.py``) share the transformer (``Flux2Transformer2DModel``), the VAE
(``AutoencoderKLFlux2``: 2x2 patchify, then a BatchNorm whose running statistics normalise the
latents), the packing (patchified latents (N, 4C, h/2, w/2) -> tokens (N, h/2 w/2, 4C) with 4-axis
position ids (t, h, w, l)) and the schedule (sigmas linspace(1, 1/T, T) shifted by the empirical
mu of the sequence length and T, ``compute_empirical_mu``). They differ in the text encoder:

- dev: Mistral-Small-3.1 (``Mistral3ForConditionalGeneration``) behind a Pixtral processor; the
  prompt is a chat [system: SYSTEM_MESSAGE, user: prompt] rendered by the processor's chat
  template; the embedding is hidden states (10, 20, 30) stacked on the feature axis
  (N, L, 3 x 5120). Guidance-distilled: the guidance value is an input of the transformer
  (``guidance_embeds=True``), one transformer call per step, no negative prompt.
- Klein: Qwen3 (``Qwen3ForCausalLM``); the prompt is a chat [user: prompt] rendered with
  ``add_generation_prompt=True, enable_thinking=False``; hidden states (9, 18, 27). No guidance
  embedding. ``is_distilled`` (model_index.json) Klein models run one call per step whatever the
  guidance scale; undistilled ("base") ones run real CFG, neg + s (cond - neg), with the empty
  prompt as negative (or the negative embeddings a caller passes).

Sizes (``FLUX2_CONFIGS``):
- ``"tiny"`` / ``"tiny_klein"``: diffusers' fast-test transformer (tests/pipelines/flux2/
  test_pipeline_flux2.py and test_pipeline_flux2_klein.py, ``get_dummy_components``: one double
  and one single block, 2 heads of 16, rope axes (4, 4, 4, 4)) with two changes: 2 latent channels
  (patchified 8: the channel order of the 2x2 patchify is visible, diffusers' 1 hides it) and a
  two-level VAE (images 32x32 -> latents (2, 16, 16) -> patchified (8, 8, 8) -> 64 tokens of 8).
  The text encoders are 16 wide but as deep as the real models' layer selection needs (31 Mistral
  layers, 28 Qwen3 layers), so the pipelines' default ``text_encoder_out_layers`` run unchanged
  (diffusers' tests pass ``(1,)``). Embeddings (N, 64, 48). The VAE's BatchNorm statistics are
  random (not 0 / 1), so decoding tests the de-normalisation.
- ``"dev"``: FLUX.2-dev's config.json values (black-forest-labs/FLUX.2-dev transformer/, vae/,
  text_encoder/): 32.2e9 transformer parameters; the Mistral text encoder at its real width with 3
  of its 40 layers (read at layers (1, 2, 3), ``FLUX2_OUT_LAYERS``): the transformer's cost
  depends only on the embedding's width and length, and 40 random layers (24e9 parameters) would
  only slow the benchmark's start.
- ``"klein_4b"``: FLUX.2-klein-4B (and klein-base-4B, same shapes): 5 double and 20 single blocks,
  24 heads, joint_attention_dim 7680 = 3 x Qwen3-4B's 2560; the whole Qwen3-4B.

Tokenizers (built in code, offline): FLUX.2-dev's real tokenizer is a ``PixtralProcessor``, which
transformers builds only with torchvision (unusable with the CPU torch here); the pipeline calls
nothing but its ``apply_chat_template`` (render, then tokenize without adding special tokens),
which a plain fast tokenizer implements with the same arguments, so the tiny dev pipeline carries
a word-level fast tokenizer with Mistral's special tokens and a chat template of Mistral-Small-3.1's
format (``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``). Klein's is a byte-level BPE
``Qwen2Tokenizer`` (the real class) with Qwen3's chat template, shared with the tiny Z-Image
(``diffloop.testing.tiny_zimage.make_qwen_tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffloop.testing.tiny_flow import WORDS

TEXT_TOKENS = 64  # the tiny tokenizers' model_max_length (the pipelines' default is 512)

# The pipelines' default hidden-state layers, and the bench's 3-layer Mistral's.
FLUX2_OUT_LAYERS: dict[str, tuple[int, ...]] = {
    "tiny": (10, 20, 30),
    "tiny_klein": (9, 18, 27),
    "dev": (1, 2, 3),
    "klein_4b": (9, 18, 27),
}

MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)  # fmt: skip

# Mistral-Small-3.1's chat format for system / user / assistant messages whose content is a string
# or a list of {"type": "text" | "image"} blocks (the pipeline's format_input sends lists).
MISTRAL_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' + text(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' + text(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- text(message['content']) + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# ------------------------------------------------------------------------------- tokenizers


def _system_words() -> list[str]:
    """The words and punctuation of FLUX.2-dev's system message, as the Whitespace pre-tokenizer
    splits them (so the tiny tokenizer gives the system prompt its own ids, not <unk>)."""
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return re.findall(r"\w+|[^\w\s]+", SYSTEM_MESSAGE.lower())


def make_mistral_tokenizer(words: list[str] = WORDS, max_length: int = TEXT_TOKENS) -> Any:
    """A word-level fast tokenizer with Mistral's special tokens and Mistral-Small-3.1's chat
    format (``MISTRAL_CHAT_TEMPLATE``). Ids: the special tokens in ``MISTRAL_SPECIAL_TOKENS``
    order (<unk>=0, <s>=1, </s>=2, <pad>=3, ...), then the words of ``words`` and of the system
    message; lower-cased, no special tokens added on encode (the template writes <s>), padded on
    the right with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = dict.fromkeys([*MISTRAL_SPECIAL_TOKENS, *(w.lower() for w in words)])
    vocabulary.update(dict.fromkeys(_system_words()))
    vocab = {token: i for i, token in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]),
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=max_length,
        padding_side="right",
    )


def make_klein_tokenizer(max_length: int = TEXT_TOKENS) -> Any:
    """Klein's tokenizer: the tiny Qwen3 one (``tiny_zimage.make_qwen_tokenizer``: byte-level BPE
    ``Qwen2Tokenizer`` with Qwen3's special tokens and chat template) with ``model_max_length``
    ``max_length``, the text length the policy and the reference harness default to."""
    from diffloop.testing.tiny_zimage import make_qwen_tokenizer

    tokenizer = make_qwen_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


# ------------------------------------------------------------------------------ text configs


def mistral3_config(c: dict[str, Any], tokenizer: Any) -> Any:
    """``Mistral3Config`` from {"text_config", "vision_config"} dicts; the vocabulary is at
    least the tokenizer's, the special-token ids are the tokenizer's."""
    from transformers import Mistral3Config

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = dict(c["text_config"], model_type="mistral", **ids)
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    vision = dict(c["vision_config"], model_type="pixtral")
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        **ids,
    )


# ---------------------------------------------------------------------------------- configs

_TINY_TRANSFORMER = {
    "patch_size": 1, "in_channels": 8, "num_layers": 1, "num_single_layers": 1,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
    "timestep_guidance_channels": 256, "axes_dims_rope": (4, 4, 4, 4),
}  # fmt: skip
_TINY_VAE = {
    "sample_size": 32, "block_out_channels": (4, 8), "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "latent_channels": 2, "norm_num_groups": 1, "use_quant_conv": False,
    "use_post_quant_conv": False,
}  # fmt: skip
# FLUX.2's VAE (black-forest-labs/FLUX.2-dev vae/config.json = AutoencoderKLFlux2's defaults).
_VAE = {
    "sample_size": 1024, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 32, "norm_num_groups": 32, "use_quant_conv": True,
    "use_post_quant_conv": True, "batch_norm_eps": 1e-4, "patch_size": (2, 2),
}  # fmt: skip

FLUX2_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "transformer": {**_TINY_TRANSFORMER, "guidance_embeds": True},
        "vae": _TINY_VAE,
        "text_encoder": {  # Mistral3: 31 layers of width 16, a one-layer Pixtral tower
            "text_config": {
                "hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 31,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
                "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
                "sliding_window": None,
            },
            "vision_config": {
                "hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 1,
                "num_attention_heads": 4, "head_dim": 4, "image_size": 30, "patch_size": 6,
            },
        },
    },
    "tiny_klein": {
        "transformer": {**_TINY_TRANSFORMER, "guidance_embeds": False},
        "vae": _TINY_VAE,
        "text_encoder": {  # Qwen3: 28 layers of width 16
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 28,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 512, "tie_word_embeddings": True,
        },
    },
    # black-forest-labs/FLUX.2-dev: transformer/config.json (= Flux2Transformer2DModel's
    # defaults), text_encoder/config.json (Mistral-Small-3.1-24B: 40 layers of 5120; 3 here).
    "dev": {
        "transformer": {
            "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
            "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
            "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32,) * 4,
            "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
        },
        "vae": _VAE,
        "text_encoder": {
            "text_config": {
                "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 3,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
                "sliding_window": None, "vocab_size": 131072,
            },
            "vision_config": {  # Pixtral's width, one of its 24 layers (never run for text)
                "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 1,
                "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14,
            },
        },
    },
    # black-forest-labs/FLUX.2-klein-4B: transformer/config.json, text_encoder/config.json
    # (Qwen3-4B, whole).
    "klein_4b": {
        "transformer": {
            "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
            "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": (32,) * 4,
            "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
        },
        "vae": _VAE,
        "text_encoder": {
            "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": True, "vocab_size": 151936,
        },
    },
}  # fmt: skip

# scheduler/scheduler_config.json of FLUX.2-dev and FLUX.2-klein: dynamic shifting on (the
# pipelines pass their own mu, compute_empirical_mu, so base/max shift are not used).
FLUX2_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}


def is_klein(size: str) -> bool:
    """Whether ``size`` (a ``FLUX2_CONFIGS`` key) is a Klein (Qwen3) model."""
    return "klein" in size


def flux2_scheduler() -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` FLUX.2 ships."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG)


def _randomise_batch_norm(vae: Any) -> None:
    """Random running statistics (mean ~ N(0, 0.5^2), var in [0.5, 1.5]) for the VAE's latent
    BatchNorm, drawn from the current RNG: a fresh one's 0 / 1 would make its de-normalisation
    the identity, and a decode that skipped it would still match."""
    bn = vae.bn
    with torch.no_grad():
        bn.running_mean.copy_(0.5 * torch.randn_like(bn.running_mean))
        bn.running_var.copy_(0.5 + torch.rand_like(bn.running_var))


def build_flux2_components(
    size: str = "tiny",
    *,
    tokenizer: Any = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Random-weight FLUX.2 pipeline components of ``size`` (``FLUX2_CONFIGS``): Mistral3 text
    encoder for "tiny" / "dev" (Flux2Pipeline), Qwen3 for "tiny_klein" / "klein_4b"
    (Flux2KleinPipeline). ``tokenizer`` defaults to the in-code tiny one of the family (for the
    real sizes too: a benchmark needs no real vocabulary). Each network is initialised right after
    ``torch.manual_seed(seed + i)`` inside ``fork_rng``: the weights are a pure function of
    ``seed`` and the caller's RNG is untouched. Returns {transformer, text_encoder, tokenizer, vae,
    scheduler}."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    if size not in FLUX2_CONFIGS:
        raise ValueError(f"size must be one of {sorted(FLUX2_CONFIGS)}, got {size!r}")
    configs = FLUX2_CONFIGS[size]
    klein = is_klein(size)
    if tokenizer is None:
        tokenizer = make_klein_tokenizer() if klein else make_mistral_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**configs["transformer"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, **configs["vae"])
        _randomise_batch_norm(vae)
        torch.manual_seed(seed + 2)
        if klein:
            from transformers import Qwen3ForCausalLM

            from diffloop.testing.tiny_zimage import qwen3_config

            text_encoder = Qwen3ForCausalLM(qwen3_config(configs["text_encoder"], tokenizer))
        else:
            from transformers import Mistral3ForConditionalGeneration

            config = mistral3_config(configs["text_encoder"], tokenizer)
            text_encoder = Mistral3ForConditionalGeneration(config)
    return {
        "transformer": transformer,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "vae": vae.eval(),
        "scheduler": flux2_scheduler(),
    }


def build_tiny_flux2(seed: int = 0) -> Any:
    """The tiny dev-style ``Flux2Pipeline`` in memory (guidance embedding, Mistral3 encoder)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline(**build_flux2_components("tiny", seed=seed))


def build_tiny_flux2_klein(is_distilled: bool = False, seed: int = 0) -> Any:
    """The tiny ``Flux2KleinPipeline`` in memory (Qwen3 encoder, no guidance embedding);
    ``is_distilled`` as the pipeline's config (True: CFG ignored; False: real CFG)."""
    from diffusers import Flux2KleinPipeline

    components = build_flux2_components("tiny_klein", seed=seed)
    return Flux2KleinPipeline(**components, is_distilled=is_distilled)


def make_tiny_flux2(path: str | Path, seed: int = 0) -> Path:
    """``save_pretrained`` the tiny dev-style pipeline to ``path``: FLUX.2-dev's layout
    (model_index.json with _class_name Flux2Pipeline, transformer/, text_encoder/, tokenizer/,
    vae/, scheduler/)."""
    path = Path(path)
    build_tiny_flux2(seed).save_pretrained(path)
    return path


def make_tiny_flux2_klein(path: str | Path, is_distilled: bool = False, seed: int = 0) -> Path:
    """``save_pretrained`` the tiny Klein pipeline to ``path``: FLUX.2-klein's layout
    (model_index.json with _class_name Flux2KleinPipeline and is_distilled, transformer/,
    text_encoder/, tokenizer/, vae/, scheduler/)."""
    path = Path(path)
    build_tiny_flux2_klein(is_distilled, seed).save_pretrained(path)
    return path


# ------------------------------------------------------------------------- reference harness


@dataclass
class ReferenceSample:
    """What the diffusers pipeline computed from given initial latents.

    trajectory: [x_T, x_{t_1}, ..., x_0] packed latents, each (N, L, 4C) with L = h/2 w/2
        (x_T as packed from the given latents, then the latents after each Euler step).
    images: (N, 3, H, W) in [0, 1] (``output_type="pt"``).
    """

    trajectory: list[torch.Tensor]
    images: torch.Tensor


def initial_latents_shape(pipe: Any, n: int, height: int, width: int) -> tuple[int, ...]:
    """(n, 4C, h/2, w/2): the shape of the pipeline's ``latents`` argument (patchified, not yet
    packed) for H x W images, as its ``prepare_latents`` draws it."""
    factor = pipe.vae_scale_factor * 2
    channels = pipe.transformer.config.in_channels
    return (n, channels, height // factor, width // factor)


@torch.no_grad()
def reference_sample(
    pipe: Any,
    prompts: list[str],
    latents: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    *,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
) -> ReferenceSample:
    """Run ``pipe`` (Flux2Pipeline or Flux2KleinPipeline) on ``prompts`` from ``latents``
    (``initial_latents_shape``) for ``num_steps`` deterministic Euler steps and record the packed
    latents after every step.

    ``guidance_scale``: dev: the guidance embedding's input; Klein: the CFG scale (used when > 1
    and the pipeline is not ``is_distilled``). ``negative_prompt``: Klein's negative branch text
    (the pipeline's own is ""), passed as embeddings the pipeline encodes.
    ``max_sequence_length`` defaults to the tokenizer's ``model_max_length`` capped at 512 (the
    pipelines' default).
    """
    from diffusers import Flux2KleinPipeline

    length = max_sequence_length or min(512, pipe.tokenizer.model_max_length)
    height = latents.shape[-2] * pipe.vae_scale_factor * 2
    width = latents.shape[-1] * pipe.vae_scale_factor * 2
    trajectory = [pipe._pack_latents(latents.float()).clone()]

    def record(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        trajectory.append(kwargs["latents"].clone())
        return {}

    kwargs: dict[str, Any] = {}
    if isinstance(pipe, Flux2KleinPipeline) and negative_prompt is not None:
        kwargs["negative_prompt_embeds"] = pipe.encode_prompt(
            [negative_prompt] * len(prompts), max_sequence_length=length
        )[0]
    out = pipe(
        prompt=list(prompts),
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        latents=latents,
        max_sequence_length=length,
        output_type="pt",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents"],
        **kwargs,
    )
    return ReferenceSample(trajectory=trajectory, images=out.images)
