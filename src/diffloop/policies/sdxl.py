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

from pathlib import Path
from typing import Any, ClassVar

import torch

from diffloop.config import LoraConfig, ModelConfig, SDXLConfig
from diffloop.policies.denoiser import DenoiserPolicy
from diffloop.policies.diffusers_policy import DDIMPolicy
from diffloop.policies.embedding_cache import Rows, each_alone, repeat_rows
from diffloop.policies.families import family
from diffloop.policies.loading import ModelLoadError

SDXL_COMPONENTS = tuple(family("sdxl").folders())
EXTRA_KEYS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds", "add_time_ids")


class SDXLPolicy(DDIMPolicy):
    """``DDIMPolicy`` with SDXL's two text encoders, pooled/time-id conditioning and fp32-safe VAE.

    Parameters, LoRA, reference(), checkpoints and LoRA export are the parent's (the UNet is the
    only trained module). ``sample`` and ``step_distribution`` are the parent's loop with the
    conditioning of ``conditioning()`` threaded through to the UNet as ``added_cond_kwargs``.
    ``sdxl``: ``model.sdxl`` (micro-conditioning; the VAE is loaded from its ``vae``).
    """

    family_name = "sdxl"
    label = "SDXL"
    lora_loader = "StableDiffusionXLLoraLoaderMixin"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    settings_field = "sdxl"
    index_config: ClassVar[dict[str, Any]] = {"force_zeros_for_empty_prompt": True}
    pipeline_kwargs: ClassVar[dict[str, Any]] = {"add_watermarker": False}
    upcast_vae = True  # StableDiffusionXLPipeline upcasts a force_upcast VAE
    vae_note = "; model.sdxl.vae can name an fp16-safe VAE such as madebyollin/sdxl-vae-fp16-fix"
    extra_keys = EXTRA_KEYS

    def __init__(
        self, components: dict, lora: LoraConfig, *, sdxl: SDXLConfig | None = None, **kwargs: Any
    ) -> None:
        self.sdxl = sdxl or SDXLConfig()
        super().__init__(components, lora, **kwargs)

    def check_model(self) -> None:
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

    # ------------------------------------------------------------------ conditioning

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
    def encode_uncached(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds (N, L, D1 + D2), pooled (N, P)} in the weight dtype, each
        prompt alone: the penultimate hidden states of both encoders concatenated, and
        text_encoder_2's projected pooled output."""

        def encode(batch: list[str]) -> Rows:
            hidden = []
            for tokenizer, encoder in (
                (self.tokenizer, self.text_encoder),
                (self.tokenizer_2, self.text_encoder_2),
            ):
                out = encoder(self.tokenize(tokenizer, batch), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
            return {"embeds": torch.cat(hidden, dim=-1), "pooled": out.text_embeds}

        return each_alone(prompts, encode)

    def encode_prompts_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (embeds (N, L, D1 + D2), pooled (N, P)) (``encoded``)."""
        (rows,) = self.encoded(prompts)
        return rows["embeds"], rows["pooled"]

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
        if not self.needs_negative_prompt(negative_prompt):
            (rows,) = self.encoded(prompts)
            embeds, pooled = rows["embeds"], rows["pooled"]
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            rows, neg = self.encoded(prompts, [negative_prompt])
            embeds, pooled = rows["embeds"], rows["pooled"]
            negative, negative_pooled = (repeat_rows(neg[k], n) for k in ("embeds", "pooled"))
        extra = {
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
            "add_time_ids": self.add_time_ids(n),
        }
        return embeds, negative, extra

    def needs_negative_prompt(self, negative_prompt: str) -> bool:
        """No encoding for "" with force_zeros_for_empty_prompt (zero embeddings)."""
        return not (negative_prompt == "" and self.force_zeros_for_empty_prompt)

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """One CFG branch's UNet keyword arguments: encoder_hidden_states (N, L, D) and
        added_cond_kwargs {text_embeds (N, P): the (negative) pooled embedding, time_ids (N, 6)}."""
        extra = self.check_extra(extra)
        pooled = extra["negative_pooled_prompt_embeds" if negative else "pooled_prompt_embeds"]
        added = {"text_embeds": pooled, "time_ids": extra["add_time_ids"]}
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}

    def save_pipeline(self, path: Path) -> None:
        """A complete SDXL pipeline (``StableDiffusionXLPipeline.from_pretrained``) with the DDIM
        scheduler diffloop sampled with, no watermarker (not SD's folder-wise export)."""
        DenoiserPolicy.save_pipeline(self, path)


def load_sdxl_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> SDXLPolicy:
    """``load_policy`` for the sdxl family: components from model.pretrained (the VAE from
    model.sdxl.vae when set), settings from model.resolution and model.sdxl; ``sample`` (the
    flow-matching sampler settings) is not used by DDIM."""
    return SDXLPolicy.from_model(model, lora, **kwargs)
