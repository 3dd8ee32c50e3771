"""Stable Diffusion XL as a DDIM policy: SD's sampler and training step, SDXL's conditioning.

SDXL is a DDIM-sampled epsilon UNet like SD 1.x/2.x (``DDIMPolicy``); what differs is the
conditioning, which follows diffusers 0.42.1 ``StableDiffusionXLPipeline`` (``encode_prompt``,
``_get_add_time_ids``, ``__call__``):

    prompt_embeds = h_{-2}(CLIP-L)(prompt) ++ h_{-2}(CLIP-bigG)(prompt)       (N, 77, 768 + 1280)
    pooled        = text_embeds of CLIP-bigG (its projection head)             (N, 1280)
    time_ids      = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]  (N, 6)
    unet(x, t, prompt_embeds, added_cond_kwargs={text_embeds: pooled, time_ids: time_ids})

- No negative prompt (``sample.negative_prompt: ""``, diffusers' ``negative_prompt=None``) with
  the model's ``force_zeros_for_empty_prompt`` (true for base 1.0) makes the unconditional
  branch's embeddings and pooled embedding exact zeros. Whatever they are, they are stored with
  the trajectory (``negative_prompt_embeds``, ``extra``) and reused as stored when log-probs are
  recomputed.
- The negative branch uses the conditional branch's time ids (diffusers' default).
- SDXL ships an Euler scheduler; ``schedulers.to_ddim`` converts its config with
  set_alpha_to_one and clip_sample False (DDIM's own defaults give a zero-variance last step,
  hence NaN log-probs).
- The VAE decodes in fp32 when its config says ``force_upcast`` (SDXL's VAE overflows in fp16),
  else in the weight dtype; ``model.sdxl.vae`` names an fp16-safe replacement
  (madebyollin/sdxl-vae-fp16-fix).
- Images that go to rewards are decoded here, never through the pipeline's invisible
  watermarker.

Per-trajectory conditioning travels in ``Trajectories.extra``:
    pooled_prompt_embeds (N, P), negative_pooled_prompt_embeds (N, P), add_time_ids (N, 6).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffloop.config import LoraConfig, ModelConfig, PerformanceConfig, SDXLConfig
from diffloop.policies.diffusers_policy import (
    DDIMPolicy,
    ModelLoadError,
    cast_frozen,
)
from diffloop.policies.families import how_to_provide, looks_local, model_index, model_path
from diffloop.policies.loading import HubUnavailableError, locate_model
from diffloop.policies.schedulers import to_ddim

logger = logging.getLogger(__name__)

SDXL_COMPONENTS = (
    "unet",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "vae",
)
EXTRA_KEYS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds", "add_time_ids")


# ---------------------------------------------------------------------------------------- loading


def _how_to_provide(name: str) -> str:
    return how_to_provide("sdxl", name)


def _load_vae(model: ModelConfig, path: str):
    """The model's vae/, or ``model.sdxl.vae``: a VAE repo/directory (config.json at its root) or a
    whole pipeline directory (its vae/ subfolder)."""
    from diffusers import AutoencoderKL

    override = model.sdxl.vae
    if override is None:
        return AutoencoderKL.from_pretrained(
            path, subfolder="vae", variant=model.variant, revision=model.revision
        )
    # A hub id: its cached snapshot, or the id once the hub answered (one line if it cannot).
    override = locate_model(
        override, filename="config.json", field="model.sdxl.vae", what="a diffusers VAE"
    )
    subfolder = "vae" if (Path(override) / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(override, subfolder=subfolder)


def load_sdxl_components(model: ModelConfig) -> dict[str, Any]:
    """The SDXL pipeline's components from ``model.pretrained`` (hub id or local directory).

    Returns {unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler (DDIM), vae,
    force_zeros_for_empty_prompt}. Raises ModelLoadError naming the missing component and how to
    provide it."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = model_path(model)  # a hub id: its cached snapshot, or the id once the hub answered
    local = Path(path)
    if looks_local(path) and not local.is_dir():
        raise ModelLoadError(f"no directory at '{path}'. " + _how_to_provide(model.pretrained))
    if local.is_dir():
        required = [c for c in SDXL_COMPONENTS if not (c == "vae" and model.sdxl.vae)]
        missing = [c for c in required if not (local / c).is_dir()]
        if missing:
            refiner = "text_encoder" in missing and (local / "text_encoder_2").is_dir()
            refiner_hint = (
                " (an SDXL refiner has no text_encoder/: it is img2img; use a base model)"
            )
            hint = refiner_hint if refiner else ""
            raise ModelLoadError(
                f"'{path}' lacks the SDXL component folder(s) "
                f"{', '.join(m + '/' for m in missing)}{hint}. " + _how_to_provide(model.pretrained)
            )
    index = model_index(model.pretrained, model.revision) or {}
    kw = {"revision": model.revision}
    user_scheduler_kwargs = getattr(model, "scheduler_kwargs", None)  # the field may not exist yet
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", variant=model.variant, **kw
        ),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", variant=model.variant, **kw
        ),
        "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", variant=model.variant, **kw
        ),
        "tokenizer": lambda: AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        "tokenizer_2": lambda: AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
        # SDXL ships Euler: converted to DDIM from the config as stored, never DDIM's defaults.
        "scheduler": lambda: to_ddim(
            DDIMScheduler.load_config(path, subfolder="scheduler", **kw), user_scheduler_kwargs
        ),
        "vae": lambda: _load_vae(model, path),
    }
    components: dict[str, Any] = {
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))
    }
    for name, load in loaders.items():
        where = (
            f"'{model.sdxl.vae}' (model.sdxl.vae)"
            if name == "vae" and model.sdxl.vae
            else f"'{path}', {name}/"
        )
        try:
            components[name] = load()
        except HubUnavailableError:  # model.sdxl.vae's hub id: already one line with the fix
            raise
        except Exception as e:  # every loader failure gets the same how-to
            raise ModelLoadError(
                f"could not load the {name} of model.pretrained='{model.pretrained}' "
                f"(looked in {where}): {type(e).__name__}: {e}\n"
                + _how_to_provide(model.pretrained)
            ) from e
    return components


# ------------------------------------------------------------------------------------ the policy


class SDXLPolicy(DDIMPolicy):
    """``DDIMPolicy`` with SDXL's two text encoders, pooled/time-id conditioning and fp32-safe VAE.

    Parameters, LoRA, reference(), checkpoints and LoRA export are the parent's (the UNet is the
    only trained module). ``sample`` and ``step_distribution`` are the parent's loop with the
    conditioning of ``conditioning()`` threaded through to the UNet as ``added_cond_kwargs``.
    """

    lora_loader = "StableDiffusionXLLoraLoaderMixin"

    def __init__(
        self,
        components: dict[str, Any],
        lora: LoraConfig,
        *,
        sdxl: SDXLConfig | None = None,
        device: torch.device,
        weight_dtype: torch.dtype = torch.float32,
        logprob_reduction: str = "mean",
        gradient_checkpointing: bool = False,
        performance: PerformanceConfig | None = None,
    ) -> None:
        # The VAE is placed here, not by the parent: a force_upcast VAE must not pass through fp16.
        super().__init__(
            {**components, "vae": None},
            lora,
            device=device,
            weight_dtype=weight_dtype,
            logprob_reduction=logprob_reduction,
            gradient_checkpointing=gradient_checkpointing,
            performance=performance,
        )
        self.sdxl = sdxl or SDXLConfig()
        self.force_zeros_for_empty_prompt = components.get("force_zeros_for_empty_prompt", True)
        self.text_encoder_2 = cast_frozen(
            components["text_encoder_2"].requires_grad_(False), weight_dtype, device
        )
        self.tokenizer_2 = components["tokenizer_2"]
        vae = components["vae"]
        vae_dtype = torch.float32 if vae.config.force_upcast else weight_dtype
        if vae_dtype != weight_dtype:
            logger.info(
                "sdxl: VAE decodes in fp32 (its config sets force_upcast; model.sdxl.vae can name "
                "an fp16-safe VAE such as madebyollin/sdxl-vae-fp16-fix)"
            )
        self.vae = vae.requires_grad_(False).to(device)
        if vae.dtype != vae_dtype:  # cast only when needed: diffusers warns on every .to(dtype)
            self.vae.to(dtype=vae_dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._check_model()

    def _check_model(self) -> None:
        """Refuse models this policy would run wrongly, saying why (not a shape error later)."""
        unet, vae = self.unet.config, self.vae.config
        if unet.addition_embed_type != "text_time":
            raise ModelLoadError(
                f"the UNet's addition_embed_type is {unet.addition_embed_type!r}, not 'text_time': "
                "this is not an SDXL base UNet (model_index.json says StableDiffusionXL*)"
            )
        pooled = self.text_encoder_2.config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if unet.addition_time_embed_dim * 6 + pooled != expected:
            raise ModelLoadError(
                f"the UNet's added embedding takes {expected} inputs but 6 time ids x "
                f"{unet.addition_time_embed_dim} + text_encoder_2 projection_dim {pooled} = "
                f"{unet.addition_time_embed_dim * 6 + pooled}; the text encoders do not belong "
                "to this UNet"
            )
        if (
            getattr(vae, "latents_mean", None) is not None
            or getattr(vae, "latents_std", None) is not None
        ):
            raise ModelLoadError(
                "the VAE config sets latents_mean/latents_std (not an SDXL VAE); use SDXL's VAE"
            )
        side = self.image_size()
        if side % self.vae_scale_factor:
            raise ModelLoadError(
                f"model.sdxl.resolution={side} must be a multiple of the VAE's downsampling factor "
                f"{self.vae_scale_factor}"
            )

    # ------------------------------------------------------------------ conditioning

    def image_size(self) -> int:
        """Square image side (pixels): model.sdxl.resolution, else UNet sample_size x VAE factor."""
        if self.sdxl.resolution is not None:
            return self.sdxl.resolution
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size() // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    def add_time_ids(self, n: int) -> torch.Tensor:
        """(n, 6) float32: original (h, w) ++ crop (top, left) ++ target (h, w); sizes default to
        image size, as in diffusers' pipeline."""
        side = self.image_size()
        x = self.sdxl
        ids = [
            *(x.original_size or (side, side)),
            *x.crops_coords_top_left,
            *(x.target_size or (side, side)),
        ]
        return torch.tensor([ids], dtype=torch.float32, device=self.device).expand(n, -1).clone()

    @torch.no_grad()
    def encode_prompts_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (embeds (N, L, D1 + D2), pooled (N, P)) in the weight dtype: the
        penultimate hidden states of both encoders concatenated, and text_encoder_2's projected
        pooled output."""
        hidden = []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out.text_embeds

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """prompts (N,) -> cross-attention embeddings (N, L, D1 + D2)."""
        return self.encode_prompts_with_pooled(prompts)[0]

    @torch.no_grad()
    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(prompt_embeds, negative_prompt_embeds, extra) for ``Trajectories``.

        negative_prompt "" with force_zeros_for_empty_prompt: zero negative embeddings and pooled
        embedding (diffusers' negative_prompt=None); otherwise the negative prompt is encoded."""
        n = len(prompts)
        embeds, pooled = self.encode_prompts_with_pooled(prompts)
        if negative_prompt == "" and self.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = self.encode_prompts_with_pooled([negative_prompt] * n)
        extra = {
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
            "add_time_ids": self.add_time_ids(n),
        }
        return embeds, negative, extra

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """One CFG branch's UNet keyword arguments: encoder_hidden_states (N, L, D) and
        added_cond_kwargs {text_embeds (N, P): the (negative) pooled embedding, time_ids (N, 6)}."""
        if extra is None or any(k not in extra for k in EXTRA_KEYS):
            raise ValueError(
                f"SDXL trajectories need extra={list(EXTRA_KEYS)} (sampled by another policy?)"
            )
        pooled = extra["negative_pooled_prompt_embeds" if negative else "pooled_prompt_embeds"]
        added = {"text_embeds": pooled, "time_ids": extra["add_time_ids"]}
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}

    # ------------------------------------------------------------------ export

    def export(self, path: str | Path) -> None:
        """LoRA: the parent's diffusers LoRA file (UNet keys, which
        ``StableDiffusionXLPipeline.load_lora_weights`` reads). Full fine-tuning: a complete SDXL
        pipeline (``StableDiffusionXLPipeline.from_pretrained``)
        with the DDIM scheduler diffloop sampled with."""
        if self.lora_config is not None:
            super().export(path)
            return
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        pipe.save_pretrained(str(path))


def load_sdxl_policy(
    model: ModelConfig, lora: LoraConfig, sample: Any = None, **kwargs: Any
) -> SDXLPolicy:
    """``load_policy`` for the sdxl family: components from model.pretrained, settings from
    model.sdxl; ``sample`` (the flow-matching sampler settings) is not used by DDIM."""
    return SDXLPolicy(load_sdxl_components(model), lora, sdxl=model.sdxl, **kwargs)
