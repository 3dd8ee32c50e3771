"""FLUX.2 (dev and Klein) as flow-matching policies: conditioning, packing, schedule, decoding.

Follows diffusers 0.42.1 ``Flux2Pipeline`` and ``Flux2KleinPipeline`` (``encode_prompt``,
``prepare_latents``, ``_pack_latents``, ``_prepare_latent_ids``, ``_prepare_text_ids``,
``compute_empirical_mu``, ``__call__``):

    prompt_embeds = hidden states (dev: 10, 20, 30 of Mistral-Small-3.1 over the chat
                    [system: SYSTEM_MESSAGE, user: prompt]; Klein: 9, 18, 27 of Qwen3 over
                    [user: prompt] with the generation prompt, thinking off), stacked on the
                    feature axis                                            (N, L, 3 D_text)
    noise         = randn(N, 4C, h/2, w/2) (the VAE's 2x2 patchify is in the channels)
    packed        = (N, h/2 w/2, 4C), tokens row-major     (the SDE step works on these)
    img_ids       = (t, h, w, l) = (0, row, col, 0);   txt_ids = (0, 0, 0, l)   int64 (N, ., 4)
    v = transformer(packed, timestep = t / 1000, guidance = g (dev) or None (Klein),
                    encoder_hidden_states, txt_ids, img_ids)
    Klein base (not is_distilled), g > 1:  v = v_neg + g (v_pos - v_neg)
    sigmas: linspace(1, 1/T, T), mu = compute_empirical_mu(h/2 w/2, T) (the scheduler's dynamic
            exponential shift)
    decode: unpack, x sqrt(running_var + eps) + running_mean (the VAE's BatchNorm), unpatchify,
            VAE.

The prompt encoding calls the pipelines' own static encoders, so the chat formatting and the
layer selection are theirs. Position ids stay int64, as the pipelines pass them: the text's l runs
to 511, which bf16 cannot hold (it rounds above 256).

Guidance. dev is guidance-distilled: ``sample.guidance_scale`` is the guidance embedding's input
(the pipeline's default 4.0), one forward per step, no negative prompt (refused). Klein has no
guidance embedding; an ``is_distilled`` Klein (model_index.json) runs one branch and the pipeline
ignores any guidance scale, so guidance != 1 and a negative prompt are refused rather than
ignored; an undistilled (base) Klein runs real CFG with ``sample.negative_prompt``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from diffloop.config import ConfigError, Flux2Config, LoraConfig, ModelConfig, SampleConfig
from diffloop.policies.embedding_cache import Rows, each_alone, repeat_rows
from diffloop.policies.families import family
from diffloop.policies.flow import FlowMatchPolicy
from diffloop.policies.loading import ModelLoadError

MAX_SEQUENCE_LENGTH = 512  # the pipelines' default max_sequence_length
# Flow-Factory's FLUX.2 adapters (src/flow_factory/models/flux/flux2.py, flux2_klein.py,
# default_target_modules); their single-block "attn.to_out.0" matches no module (the single
# blocks' output projection is a plain Linear, attn.to_out), so it is left out, as it is in effect.
LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
]  # fmt: skip


# ------------------------------------------------------------------------------ packing (pure)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C', h', w') patchified latents -> (N, h' w', C') tokens, row-major
    (Flux2Pipeline._pack_latents)."""
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h * w).permute(0, 2, 1)


def unpack_latents(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(N, side^2, C') -> (N, C', side, side), the inverse of ``pack_latents`` (what
    Flux2Pipeline._unpack_latents_with_ids computes from the position ids)."""
    n, length, c = tokens.shape
    if length != side * side:
        raise ValueError(f"packed latents {tuple(tokens.shape)} are not a {side}x{side} grid")
    return tokens.permute(0, 2, 1).reshape(n, c, side, side)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """(N, 4C, h', w') -> (N, C, 2h', 2w'): channel (c, dy, dx) back to pixel (2y + dy, 2x + dx)
    of channel c (Flux2Pipeline._unpatchify_latents)."""
    n, c4, h, w = latents.shape
    x = latents.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c4 // 4, 2 * h, 2 * w)


def position_ids(n: int, rows: int, cols: int, length: int, device: Any) -> dict[str, Any]:
    """{img_ids (N, rows cols, 4), txt_ids (N, length, 4)} int64: (0, row, col, 0) per image
    token, (0, 0, 0, l) per text token (Flux2Pipeline._prepare_latent_ids, _prepare_text_ids)."""
    one = torch.arange(1)
    img = torch.cartesian_prod(one, torch.arange(rows), torch.arange(cols), one)
    txt = torch.cartesian_prod(one, one, one, torch.arange(length))
    return {
        "img_ids": img.to(device).expand(n, -1, -1),
        "txt_ids": txt.to(device).expand(n, -1, -1),
    }


# ------------------------------------------------------------------------------------- policy


class Flux2Policy(FlowMatchPolicy):
    """FLUX.2-dev: Mistral3 conditioning, the guidance embedding, FLUX.2's packing, schedule and
    BatchNorm'd latents (module docstring). ``flux2``: ``model.flux2`` (the text length)."""

    family_name = "flux2"
    label = "FLUX.2"
    lora_loader = "Flux2LoraLoaderMixin"
    settings_field = "flux2"
    DEFAULT_LORA_TARGETS = LORA_TARGETS
    guidance_distilled = True
    upcast_vae = False  # AutoencoderKLFlux2 has no force_upcast: the pipelines decode as loaded
    # the pipelines: timestep = t.expand(N).to(latents.dtype) / 1000 (the model multiplies by 1000)
    timestep_divisor = 1000.0
    timestep_in_weight_dtype = True
    text_encoder_names = ("text_encoder",)
    pack_factor = 2  # the resolution is a multiple of the VAE's factor x its 2x2 patchify
    eval_num_steps = 28  # Flow-Factory examples/grpo/lora/flux2/t2i.yaml: eval 28 steps
    eval_eta = 0.0
    out_layers: tuple[int, ...] = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers
    default_guidance = 4.0  # Flux2Pipeline's guidance_scale

    def __init__(
        self,
        components: dict,
        lora: LoraConfig,
        *,
        flux2: Flux2Config | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["sample"] = kwargs.get("sample") or SampleConfig(
            guidance_scale=self.default_guidance
        )
        settings = flux2 or Flux2Config()
        if settings.text_encoder_out_layers is not None:
            self.out_layers = tuple(settings.text_encoder_out_layers)
        super().__init__(components, lora, **kwargs)
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's own
        default = min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)
        self.max_sequence_length = self.text_length(
            settings.max_sequence_length, default, MAX_SEQUENCE_LENGTH,
            "model.flux2.max_sequence_length", family(self.family_name).pipeline_class,
        )  # fmt: skip
        self.check_guidance(self.guidance_scale, self.sample_settings.negative_prompt)

    def default_image_size(self) -> int:
        """The VAE's sample_size (1024: the pipelines' default 128 x 8)."""
        return self.vae.config.sample_size

    def check_model(self) -> None:
        """Refuse what this text-to-image policy would run wrongly, saying why: a transformer whose
        input is not the VAE's patchified latent, or a text encoder whose selected layers do not
        give the transformer's text width."""
        latent, inputs = self.vae.config.latent_channels, self.transformer.config.in_channels
        if inputs != 4 * latent:
            raise ModelLoadError(
                f"the {self.label} transformer takes {inputs} input channels but the VAE's "
                f"{latent} latent channels patchified 2x2 give {4 * latent}: not a text-to-image "
                f"{self.label} transformer"
            )
        text = self.text_config()
        if not self.out_layers or not 0 <= min(self.out_layers) <= max(self.out_layers) <= (
            text.num_hidden_layers
        ):
            raise ConfigError(
                f"model.flux2.text_encoder_out_layers={list(self.out_layers)}: give layers of "
                f"the text encoder's hidden states 0..{text.num_hidden_layers} (null: the "
                "pipeline's)"
            )
        width = len(self.out_layers) * text.hidden_size
        if width != self.transformer.config.joint_attention_dim:
            raise ModelLoadError(
                f"the text encoder's {len(self.out_layers)} selected layers give embeddings of "
                f"{width}, the transformer expects joint_attention_dim="
                f"{self.transformer.config.joint_attention_dim}: the text encoder is not this "
                "model's"
            )

    def text_config(self) -> Any:
        """The language model's config (Mistral3's text part)."""
        return self.text_encoder.config.text_config

    def check_guidance(self, guidance_scale: float, negative_prompt: str) -> None:
        """Refuse a negative prompt: dev has no negative branch (the pipeline takes none)."""
        if negative_prompt:
            raise ConfigError(
                f"sample.negative_prompt={negative_prompt!r}: FLUX.2-dev is guidance-distilled "
                "and has no negative branch (one transformer call per step); set "
                "sample.negative_prompt to ''"
            )

    # ------------------------------------------------------------------ family hooks

    def noise_shape(self) -> tuple[int, ...]:
        """(4C, h/2, w/2): the pipeline draws its noise patchified."""
        side = self.latent_size() // 2
        return (self.transformer.config.in_channels, side, side)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, self.latent_size() // 2)

    def set_timesteps(self, num_steps: int) -> None:
        """The pipelines' schedule: sigmas linspace(1, 1/T, T) and the empirical mu of the image
        tokens and T (``compute_empirical_mu``), shifted by the scheduler."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len=self.image_seq_len(), num_steps=num_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> the VAE decoder's input: unpack, undo the BatchNorm
        (x sqrt(running_var + eps) + running_mean), unpatchify."""
        x = self.unpack(latents.float())
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).float()
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps)
        return unpatchify(x * std + mean).to(self.vae.dtype)

    def encode_uncached(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds: (N, L, 3 D_text)} (``encode_text``), each prompt alone."""
        return each_alone(prompts, lambda batch: {"embeds": self.encode_text(batch)})

    def needs_negative_prompt(self, negative_prompt: str) -> bool:
        return self.cfg_active(self.guidance_scale)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N,) -> (N, L, 3 D_text) as Flux2Pipeline.encode_prompt."""
        from diffusers import Flux2Pipeline
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, device=self.text_device,
            max_sequence_length=self.max_sequence_length, system_message=SYSTEM_MESSAGE,
            hidden_states_layers=self.out_layers,
        )  # fmt: skip

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(prompt embeds (N, L, D), negative: the encoded negative prompt where CFG runs, else
        empty (N, 0, D), no extra)."""
        self.check_guidance(self.guidance_scale, negative_prompt)
        if not self.needs_negative_prompt(negative_prompt):
            embeds = self.encoded(list(prompts))[0]["embeds"]
            return embeds, embeds[:, :0].clone(), None
        rows, neg = self.encoded(list(prompts), [negative_prompt])
        return rows["embeds"], repeat_rows(neg["embeds"], len(prompts)), None

    def position_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """img_ids and txt_ids (int64, ``position_ids``) of a call on ``kwargs``' text."""
        text = kwargs["encoder_hidden_states"]
        side = self.latent_size() // 2
        return position_ids(len(text), side, side, text.shape[1], text.device)

    def guidance_kwargs(self, n: int, guidance_scale: float) -> dict[str, Any]:
        """guidance (n,) float32 = g, the guidance embedding's input (the same when sampling and
        when log-probs are recomputed)."""
        return {"guidance": torch.full((n,), guidance_scale, device=self.device)}


class Flux2KleinPolicy(Flux2Policy):
    """FLUX.2-klein: Qwen3 conditioning, no guidance embedding; real CFG unless ``is_distilled``
    (module docstring)."""

    family_name = "flux2_klein"
    label = "FLUX.2-klein"
    guidance_distilled = False
    index_config: ClassVar[dict[str, Any]] = {"is_distilled": False}
    eval_num_steps = None  # Flow-Factory evaluates distilled at 10, base at 28: the configs say
    out_layers = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
    default_guidance = 4.0

    def __init__(self, components: dict, lora: LoraConfig, **kwargs) -> None:
        if components.get("is_distilled") and kwargs.get("sample") is None:
            kwargs["sample"] = SampleConfig(guidance_scale=1.0)
        super().__init__(components, lora, **kwargs)

    def text_config(self) -> Any:
        return self.text_encoder.config

    def check_guidance(self, guidance_scale: float, negative_prompt: str) -> None:
        """A distilled Klein runs one branch whatever the guidance (the pipeline ignores it):
        refuse guidance != 1 and a negative prompt rather than ignore them."""
        if not self.is_distilled:
            return
        if guidance_scale != 1.0 or negative_prompt:
            raise ConfigError(
                f"sample.guidance_scale={guidance_scale}, sample.negative_prompt="
                f"{negative_prompt!r}: this FLUX.2-klein model is step-distilled (is_distilled "
                "in model_index.json), so Flux2KleinPipeline runs no CFG and ignores both; set "
                "sample.guidance_scale=1 and sample.negative_prompt='' (a klein-base model runs "
                "CFG)"
            )

    def cfg_active(self, guidance_scale: float) -> bool:
        """The pipeline's do_classifier_free_guidance: guidance > 1 and not is_distilled."""
        return guidance_scale > 1.0 and not self.is_distilled

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N,) -> (N, L, 3 D_text) as Flux2KleinPipeline.encode_prompt."""
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, device=self.text_device,
            max_sequence_length=self.max_sequence_length, hidden_states_layers=self.out_layers,
        )  # fmt: skip

    def guidance_kwargs(self, n: int, guidance_scale: float) -> dict[str, Any]:
        return {}


def load_flux2_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> Flux2Policy:
    """``load_policy`` for the flux2 family (FLUX.2-dev)."""
    return Flux2Policy.from_model(model, lora, **kwargs)


def load_flux2_klein_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> Flux2Policy:
    """``load_policy`` for the flux2_klein family (is_distilled from model_index.json)."""
    return Flux2KleinPolicy.from_model(model, lora, **kwargs)
