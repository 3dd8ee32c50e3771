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
from diffloop.policies.diffusers_policy import cat_branches
from diffloop.policies.families import how_to_provide
from diffloop.policies.flow import FlowMatchPolicy, load_components
from diffloop.policies.loading import ModelLoadError

logger = logging.getLogger(__name__)

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


def image_seq_len(height: int, width: int) -> int:
    """Packed tokens of an h x w latent: the sequence length FLUX's timestep shift mu depends on."""
    return (height // 2) * (width // 2)


# ------------------------------------------------------------------------------------ loading


def _how_to_provide(name: str) -> str:
    return how_to_provide("flux", name)


def load_flux_components(model: ModelConfig) -> dict[str, Any]:
    """The FLUX.1 pipeline's components from ``model.pretrained`` (hub id or local directory):
    {transformer, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, vae}; every one
    is required (FLUX has no T5-less mode). Raises ModelLoadError naming what is missing."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    kw = {"revision": model.revision}
    weights = {"variant": model.variant, **kw}
    loaders = {
        "transformer": lambda p: FluxTransformer2DModel.from_pretrained(
            p, subfolder="transformer", **weights
        ),
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(
            p, subfolder="text_encoder", **weights
        ),
        "text_encoder_2": lambda p: T5EncoderModel.from_pretrained(
            p, subfolder="text_encoder_2", **weights
        ),
        "tokenizer": lambda p: AutoTokenizer.from_pretrained(p, subfolder="tokenizer", **kw),
        "tokenizer_2": lambda p: AutoTokenizer.from_pretrained(p, subfolder="tokenizer_2", **kw),
        "scheduler": lambda p: FlowMatchEulerDiscreteScheduler.from_pretrained(
            p, subfolder="scheduler", **kw
        ),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, subfolder="vae", **weights),
    }
    return load_components(model, loaders, _how_to_provide(model.pretrained))


# ------------------------------------------------------------------------------------- policy


class FluxPolicy(FlowMatchPolicy):
    """``FlowMatchPolicy`` with FLUX's CLIP-pooled + T5 conditioning, 2x2 latent packing, the
    resolution-dependent timestep shift and the guidance embedding (module docstring).

    ``flux``: ``model.flux`` (T5 length); ``resolution``: ``model.resolution`` (the base's).
    ``sample``: ``sample.*``; its guidance_scale is the guidance a direct transformer call
    (``unet_conditioning``) gets, and its negative prompt / guidance are checked here, before any
    sampling.
    """

    lora_loader = "FluxLoraLoaderMixin"
    guidance_distilled = True

    text_encoder_names = ("text_encoder", "text_encoder_2")
    timestep_scale = 1 / 1000  # FLUX's transformer takes t / 1000 (it multiplies by 1000 inside)
    pack_factor = 2  # 2x2 latent patches per token
    eval_num_steps = 28  # Flow-GRPO config/grpo.py: sample.eval_num_steps = 28 for FLUX configs
    eval_eta = 0.0  # Flow-GRPO scripts/train_flux.py eval: pipeline_with_logprob(noise_level=0)

    @property
    def pipeline_class(self) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def __init__(
        self,
        components: dict[str, Any],
        lora: LoraConfig,
        *,
        flux: FluxConfig | None = None,
        sample: SampleConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(components, lora, sample=sample, **kwargs)
        flux = flux or FluxConfig()
        sample = sample or SampleConfig(guidance_scale=3.5)
        self.tokenizer = components["tokenizer"]
        self.tokenizer_2 = components["tokenizer_2"]
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.guidance_scale = sample.guidance_scale
        self.max_sequence_length = self._max_sequence_length(flux)
        self.height = self.width = self.image_size() // self.vae_scale_factor  # latent h, w
        self._check_model()
        self.check_guidance(sample.guidance_scale, sample.negative_prompt)

    def _max_sequence_length(self, flux: FluxConfig) -> int:
        length = flux.max_sequence_length
        if length is None:
            return min(MAX_SEQUENCE_LENGTH, self.tokenizer_2.model_max_length)
        if not 1 <= length <= MAX_SEQUENCE_LENGTH:
            raise ConfigError(
                f"model.flux.max_sequence_length={length} must be in 1..{MAX_SEQUENCE_LENGTH} "
                "(FluxPipeline's limit); Flow-GRPO uses 128"
            )
        return length

    def image_size(self) -> int:
        """Square image side (pixels): model.resolution, else the VAE's sample_size (FLUX's
        transformer has no sample_size; 1024 for FLUX.1 = FluxPipeline's default 128 x 8)."""
        return self.resolution if self.resolution is not None else self.vae.config.sample_size

    def _check_model(self) -> None:
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
        """FluxPipeline's schedule: set_timesteps(sigmas=linspace(1, 1/T, T), mu) with mu from the
        packed image sequence length (``core.flux_sigmas``); the scheduler shifts by mu when its
        config has use_dynamic_shifting (dev) and refuses to set timesteps without mu then."""
        from diffloop.core import flux_sigmas

        sigmas, mu = flux_sigmas(
            num_steps, image_seq_len(self.height, self.width), self.scheduler.config
        )
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)

    def _truncation_warning(self, ids: torch.Tensor, tokenizer: Any, prompts: list[str]) -> None:
        longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] > ids.shape[-1]:
            logger.warning(
                "flux: %d of %d prompts are longer than %d tokens of %s and were truncated",
                int((longest[:, ids.shape[-1] :] != tokenizer.pad_token_id).any(-1).sum()),
                len(prompts), ids.shape[-1], type(tokenizer).__name__,
            )  # fmt: skip

    def _ids(self, tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self._truncation_warning(ids, tokenizer, prompts)
        return ids.to(self.device)

    @torch.no_grad()
    def encode_prompts_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (T5 embeds (N, max_sequence_length, D), CLIP pooled (N, P)), as
        FluxPipeline.encode_prompt (same text to both encoders)."""
        clip_ids = self._ids(self.tokenizer, prompts, self.tokenizer.model_max_length)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._ids(self.tokenizer_2, prompts, self.max_sequence_length)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return embeds.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_prompts_with_pooled(prompts)[0]

    @torch.no_grad()
    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(T5 embeds (N, L, D), an empty (N, 0, D) negative (FLUX has no negative branch),
        {pooled_prompt_embeds (N, P)})."""
        self.check_guidance(self.guidance_scale, negative_prompt)
        embeds, pooled = self.encode_prompts_with_pooled(prompts)
        return embeds, embeds[:, :0].clone(), {"pooled_prompt_embeds": pooled}

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor], negative: bool
    ) -> dict[str, Any]:
        """encoder_hidden_states (N, L, D), pooled_projections (N, P), txt_ids (L, 3) zeros,
        img_ids (h/2 w/2, 3) of the conditional (the only) branch."""
        if negative:
            raise ValueError("FLUX.1 has no negative branch (guidance-distilled)")
        if extra is None or any(k not in extra for k in EXTRA_KEYS):
            raise ValueError(
                f"FLUX trajectories need extra={list(EXTRA_KEYS)} (sampled by another policy?)"
            )
        return {
            "encoder_hidden_states": embeds,
            "pooled_projections": extra["pooled_prompt_embeds"],
            "txt_ids": text_ids(embeds.shape[1], embeds.device),
            "img_ids": latent_image_ids(self.height, self.width, embeds.device),
        }

    def guidance(self, n: int, guidance_scale: float) -> torch.Tensor | None:
        """(n,) float32 guidance g for the guidance embedding (FLUX.1-dev), None without one."""
        if not self.guidance_embeds:
            return None
        return torch.full((n,), guidance_scale, device=self.device, dtype=torch.float32)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        extra: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """v (N, L, 4C) float32 = transformer(x, t / 1000, guidance g): one forward, no CFG; the
        same g (``sample.guidance_scale``) at sampling and at log-prob recomputation."""
        dtype = self.weight_dtype
        kwargs = cat_branches([self.branch_kwargs(prompt_embeds, extra, negative=False)], dtype)
        with self._autocast():
            out = self.transformer(
                hidden_states=x.to(dtype),
                timestep=t.to(dtype) / 1000,  # FluxPipeline: t.expand(N).to(latents.dtype) / 1000
                guidance=self.guidance(len(x), guidance_scale),
                **kwargs,
                return_dict=False,
            )[0]
        return out.float()

    def unet_conditioning(self, prompts: list[str]) -> dict[str, Any]:
        """The transformer's keyword arguments for ``self.unet`` (export checks, FLOP counts),
        with guidance ``sample.guidance_scale`` for a guidance-distilled model."""
        embeds, _, extra = self.conditioning(prompts, "")
        kwargs = self.branch_kwargs(embeds, extra, negative=False)
        guidance = self.guidance(len(prompts), self.guidance_scale)
        return kwargs if guidance is None else {**kwargs, "guidance": guidance}


def load_flux_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> FluxPolicy:
    """``load_policy`` for the flux family: components from model.pretrained, settings from
    model.resolution and model.flux."""
    return FluxPolicy(
        load_flux_components(model), lora, flux=model.flux, resolution=model.resolution, **kwargs
    )
