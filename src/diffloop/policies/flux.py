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
is no negative branch: a non-empty ``sample.negative_prompt`` is refused (``check_guidance``, when
the policy is built and at every sampling call), as FluxPipeline ignores it without
``true_cfg_scale``. FLUX.1-schnell has no guidance embedding: the
guidance value is not used (and refused unless 1, so no setting is silently ignored).

Per-trajectory conditioning travels in ``Trajectories.extra``:
    pooled_prompt_embeds (N, P).
``img_ids`` and ``txt_ids`` are functions of the resolution and the T5 length, rebuilt per call.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from diffloop.config import ConfigError, FluxConfig, LoraConfig, ModelConfig, SampleConfig
from diffloop.policies.embedding_cache import Rows, each_alone
from diffloop.policies.families import family
from diffloop.policies.flow import FlowMatchPolicy
from diffloop.policies.loading import ModelLoadError

logger = logging.getLogger(__name__)

FLUX_COMPONENTS = tuple(family("flux").folders())
EXTRA_KEYS = ("pooled_prompt_embeds",)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default and upper limit of max_sequence_length


# ------------------------------------------------------------------------------ packing (pure)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4 C): each 2x2 patch becomes one token whose 4C features are
    ordered (c, dy, dx), patches row-major (FluxPipeline._pack_latents). h, w must be even."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"FLUX packs 2x2 patches: latent height and width must be even, got {h}x{w}"
        )
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h/2 * w/2, 4 C) -> (N, C, h, w), the inverse of ``pack_latents``; ``height``, ``width``
    are the *latent* h, w (FluxPipeline._unpack_latents takes pixels and the VAE factor)."""
    n, tokens, features = packed.shape
    if tokens != (height // 2) * (width // 2) or features % 4:
        raise ValueError(
            f"packed latents {tuple(packed.shape)} do not match a {height}x{width} "
            "latent of 2x2 patches"
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
    """(L, 3) zeros: FLUX's text tokens carry no position in the rope
    (FluxPipeline.encode_prompt)."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------- policy


class FluxPolicy(FlowMatchPolicy):
    """``FlowMatchPolicy`` with FLUX's CLIP-pooled + T5 conditioning, 2x2 latent packing, the
    resolution-dependent timestep shift and the guidance embedding (module docstring).

    ``flux``: ``model.flux`` (T5 length); ``resolution``: ``model.resolution`` (the base's).
    ``sample``: ``sample.*``; its guidance_scale is the guidance a direct transformer call
    (``unet_conditioning``) gets, and its negative prompt / guidance are checked here, before any
    sampling.
    """

    family_name = "flux"
    label = "FLUX"
    lora_loader = "FluxLoraLoaderMixin"
    guidance_distilled = True
    text_encoder_names = ("text_encoder", "text_encoder_2")
    settings_field = "flux"
    extra_keys = EXTRA_KEYS
    # FluxPipeline: timestep = t.expand(N).to(latents.dtype) / 1000 (the model multiplies by 1000)
    timestep_divisor = 1000.0
    timestep_in_weight_dtype = True
    pack_factor = 2  # 2x2 latent patches per token
    eval_num_steps = 28  # Flow-GRPO config/grpo.py: sample.eval_num_steps = 28 for FLUX configs
    eval_eta = 0.0  # Flow-GRPO scripts/train_flux.py eval: pipeline_with_logprob(noise_level=0)

    def __init__(
        self, components: dict, lora: LoraConfig, *, flux: FluxConfig | None = None, **kwargs: Any
    ) -> None:
        # Without sample settings: FluxPipeline's default guidance 3.5 (and Flow-GRPO's).
        kwargs["sample"] = kwargs.get("sample") or SampleConfig(guidance_scale=3.5)
        super().__init__(components, lora, **kwargs)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.max_sequence_length = self._max_sequence_length(flux or FluxConfig())
        self.height = self.width = self.latent_size()
        self.check_guidance(self.guidance_scale, self.sample_settings.negative_prompt)

    def _max_sequence_length(self, flux: FluxConfig) -> int:
        """T5 tokens: ``model.flux.max_sequence_length``, else the T5 tokenizer's length capped
        at 512."""
        default = min(MAX_SEQUENCE_LENGTH, self.tokenizer_2.model_max_length)
        return self.text_length(
            flux.max_sequence_length, default, MAX_SEQUENCE_LENGTH,
            "model.flux.max_sequence_length", "FluxPipeline",
        )  # fmt: skip

    def default_image_size(self) -> int:
        """The VAE's sample_size (FLUX's transformer has none; 1024 for FLUX.1 = FluxPipeline's
        default 128 x 8)."""
        return self.vae.config.sample_size

    def check_model(self) -> None:
        """Refuse FLUX variants this text-to-image policy would run wrongly (Fill, Depth, Kontext:
        extra conditioning channels), saying why, not with a shape error later."""
        latent_channels = self.vae.config.latent_channels
        in_channels = self.transformer.config.in_channels
        if in_channels != 4 * latent_channels:
            raise ModelLoadError(
                f"the FLUX transformer takes {in_channels} input channels but 2x2 packing of the "
                f"VAE's {latent_channels} latent channels gives {4 * latent_channels}: this is not "
                "a text-to-image FLUX.1 (dev / schnell) transformer (Fill / Depth / Canny models "
                "are not supported)"
            )

    def check_guidance(self, guidance_scale: float, negative_prompt: str) -> None:
        """Refuse what FLUX would silently ignore: a negative prompt (no negative branch;
        FluxPipeline uses one only with true_cfg_scale) and, for schnell (no guidance embedding),
        guidance != 1."""
        if negative_prompt:
            raise ConfigError(
                f"sample.negative_prompt={negative_prompt!r}: FLUX.1 is "
                "guidance-distilled and has no "
                "negative branch (one transformer call per step); set sample.negative_prompt to ''"
            )
        if not self.guidance_embeds and guidance_scale != 1.0:
            raise ConfigError(
                f"sample.guidance_scale={guidance_scale}: this FLUX transformer has no guidance "
                "embedding (FLUX.1-schnell), so guidance is not used; set sample.guidance_scale=1"
            )

    # ------------------------------------------------------------------ family hooks

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, self.height, self.width)

    def set_timesteps(self, num_steps: int) -> None:
        """FluxPipeline's schedule: the mu-shifted one (``set_shifted_timesteps``); the scheduler
        shifts by mu when its config has use_dynamic_shifting (dev)."""
        self.set_shifted_timesteps(num_steps)

    def _truncation_warning(self, ids: torch.Tensor, tokenizer: Any, prompts: list[str]) -> None:
        longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] > ids.shape[-1]:
            logger.warning(
                "flux: %d of %d prompts are longer than %d tokens of %s and were truncated",
                int((longest[:, ids.shape[-1] :] != tokenizer.pad_token_id).any(-1).sum()),
                len(prompts), ids.shape[-1], type(tokenizer).__name__,
            )  # fmt: skip

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Rows:
        clip_ids = self.tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenize(self.tokenizer_2, prompts, self.max_sequence_length)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return {
            "embeds": embeds.to(self.text_encoder_2.dtype),
            "pooled": pooled.to(self.text_encoder.dtype),
        }

    def encode_uncached(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds: T5 (N, max_sequence_length, D), pooled: CLIP (N, P)}, as
        FluxPipeline.encode_prompt (same text to both encoders), each prompt alone; prompts longer
        than either tokenizer's length are counted in one warning."""
        for tokenizer, length in ((self.tokenizer, self.tokenizer.model_max_length),
                                  (self.tokenizer_2, self.max_sequence_length)):  # fmt: skip
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids  # fmt: skip
            self._truncation_warning(ids, tokenizer, prompts)
        return each_alone(prompts, self._encode)

    def encode_prompts_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (T5 embeds (N, max_sequence_length, D), CLIP pooled (N, P))
        (``encoded``)."""
        (rows,) = self.encoded(prompts)
        return rows["embeds"], rows["pooled"]

    def needs_negative_prompt(self, negative_prompt: str) -> bool:
        return False  # no negative branch

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(T5 embeds (N, L, D), an empty (N, 0, D) negative (FLUX has no negative branch),
        {pooled_prompt_embeds (N, P)})."""
        self.check_guidance(self.guidance_scale, negative_prompt)
        embeds, pooled = self.encode_prompts_with_pooled(prompts)
        return embeds, embeds[:, :0].clone(), {"pooled_prompt_embeds": pooled}

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """encoder_hidden_states (N, L, D) and pooled_projections (N, P) of the conditional (the
        only) branch."""
        if negative:
            raise ValueError("FLUX.1 has no negative branch (guidance-distilled)")
        pooled = self.check_extra(extra)["pooled_prompt_embeds"]
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def position_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """txt_ids (L, 3) zeros and img_ids (h/2 w/2, 3) of a call whose text is
        ``kwargs["encoder_hidden_states"]`` (N, L, D) (FluxPipeline: in the latents' dtype)."""
        text = kwargs["encoder_hidden_states"]
        return {
            "txt_ids": text_ids(text.shape[1], text.device),
            "img_ids": latent_image_ids(self.height, self.width, text.device),
        }

    def guidance(self, n: int, guidance_scale: float) -> torch.Tensor | None:
        """(n,) float32 guidance g for the guidance embedding (FLUX.1-dev), None without one."""
        if not self.guidance_embeds:
            return None
        return torch.full((n,), guidance_scale, device=self.device, dtype=torch.float32)

    def guidance_kwargs(self, n: int, guidance_scale: float) -> dict[str, Any]:
        """guidance = g (``sample.guidance_scale``, the same when sampling and when log-probs are
        recomputed) for the guidance embedding: one forward per step, no CFG."""
        guidance = self.guidance(n, guidance_scale)
        return {} if guidance is None else {"guidance": guidance}


def load_flux_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> FluxPolicy:
    """``load_policy`` for the flux family: components from model.pretrained, settings from
    model.resolution and model.flux."""
    return FluxPolicy.from_model(model, lora, **kwargs)
