"""FLUX.1 (dev and schnell) as a flow-matching policy: FLUX's conditioning, packing and schedule.

Follows diffusers 0.42.1 ``FluxPipeline`` (``encode_prompt``, ``_pack_latents``,
``_unpack_latents``, ``_prepare_latent_image_ids``, ``calculate_shift``, ``__call__``) and
Flow-GRPO's FLUX trainer (yifan123/flow_grpo scripts/train_flux.py, ``compute_log_prob``):

    pooled         = CLIP-L pooler_output(prompt)                         (N, 768)
    prompt_embeds  = T5 last hidden state(prompt, max_sequence_length)   (N, L, 4096)
    txt_ids        = zeros (L, 3);   img_ids = [0, row, col] per 2x2 patch   (h/2 w/2, 3)
    latents (N, C, h, w) -> 2x2 patches -> packed (N, h/2 w/2, 4C)   (the SDE step works on these)
    v = transformer(packed, timestep = t / 1000, guidance = g (dev) or None (schnell),
                    pooled_projections, encoder_hidden_states, txt_ids, img_ids)
    sigmas: linspace(1, 1/T, T) shifted by mu = calculate_shift(h/2 w/2, ...) (exponential time
            shift) when the scheduler has use_dynamic_shifting (dev), as set_timesteps(sigmas, mu)
    decode: unpack, latents / scaling_factor + shift_factor, VAE.

Guidance. FLUX.1-dev is guidance-distilled: ``sample.guidance_scale`` = g is an *input* of the
transformer (its guidance embedding; Flow-GRPO and diffusers use 3.5), one forward per step, the
same g when sampling and when log-probs are recomputed (both read ``sample.guidance_scale``). There
is no negative branch: a non-empty ``sample.negative_prompt`` is refused (``check_sampling``), as
FluxPipeline ignores it without ``true_cfg_scale``. FLUX.1-schnell has no guidance embedding: the
guidance value is not used (and refused unless 1, so no setting is silently ignored).

Per-trajectory conditioning travels in ``Trajectories.extra``:
    pooled_prompt_embeds (N, P).
``img_ids`` and ``txt_ids`` are functions of the resolution and the T5 length, rebuilt per call.
"""

from __future__ import annotations

from typing import Any

import torch

FLUX_COMPONENTS = (
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "vae",
)
EXTRA_KEYS = ("pooled_prompt_embeds",)

# Flow-GRPO's FLUX LoRA targets (scripts/train_flux.py): attention and feed-forward projections of
# the double-stream blocks (the single-stream blocks' attn.to_{q,k,v} match too, as there).
FLUX_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


# ------------------------------------------------------------------------------ packing (pure)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4 C): each 2x2 patch becomes one token whose 4C features are
    ordered (c, dy, dx), patches row-major (FluxPipeline._pack_latents). h, w must be even."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height and width must be even, got {h}x{w}")
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h/2 * w/2, 4 C) -> (N, C, h, w), the inverse of ``pack_latents``; ``height``, ``width``
    are the *latent* h, w (FluxPipeline._unpack_latents takes pixels and the VAE factor)."""
    n, tokens, features = packed.shape
    if tokens != (height // 2) * (width // 2) or features % 4:
        raise ValueError(
            f"packed latents {tuple(packed.shape)} do not match a {height}x{width} latent of 2x2 patches"
        )
    x = packed.view(n, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, features // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) positions [0, row, col] of the packed tokens of an h x w latent (rows of the
    2x2-patch grid first), FluxPipeline._prepare_latent_image_ids at (h/2, w/2)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(L, 3) zeros: FLUX's text tokens carry no position in the rope (FluxPipeline.encode_prompt)."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


def image_seq_len(height: int, width: int) -> int:
    """Packed tokens of an h x w latent: the sequence length FLUX's timestep shift mu depends on."""
    return (height // 2) * (width // 2)
