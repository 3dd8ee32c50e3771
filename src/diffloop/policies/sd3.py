"""Stable Diffusion 3 / 3.5 as a flow-matching policy: SD3's conditioning, on ``FlowMatchPolicy``.

Follows diffusers 0.42.1 ``StableDiffusion3Pipeline`` (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``, ``encode_prompt``, ``__call__``):

    clip    = h_{-2}(CLIP-L)(prompt) ++ h_{-2}(CLIP-G)(prompt)                (N, 77, 768 + 1280)
    t5      = T5(prompt), or zeros (N, L, joint_attention_dim) without T5, L = max_sequence_length
    prompt_embeds = [pad(clip, to t5's width) ; t5]  along the sequence        (N, 77 + L, 4096)
    pooled  = text_embeds(CLIP-L) ++ text_embeds(CLIP-G)                       (N, 768 + 1280)
    v       = transformer(x, timestep=t (0-1000), prompt_embeds, pooled)

- Real CFG with the negative prompt encoded the same way ("" when none, as the pipeline).
- Static timestep shift from the scheduler config
(``FlowMatchEulerDiscreteScheduler.set_timesteps``;
  ``core.sd3_shift_sigmas``); the transformer takes t on the 0-1000 scale.
- Decode: vae.decode(x / scaling_factor + shift_factor).
- T5 length L: ``model.sd3.max_sequence_length`` (the pipeline's ``max_sequence_length``); null: the
  pipeline's default 256, capped at the T5 tokenizer's model_max_length. Flow-GRPO uses 128.
- Evaluation (``eval.num_steps`` / ``eval.eta`` null): Flow-GRPO's SD3 evaluation, 40 steps at
  noise level 0 (the ODE) with the training guidance (scripts/train_sd3.py ``eval``,
  config/grpo.py ``eval_num_steps``).

Per-trajectory conditioning in ``Trajectories.extra``: pooled_prompt_embeds (N, P),
negative_pooled_prompt_embeds (N, P), besides the flow policy's sigmas and second_sigma.
"""

from __future__ import annotations

from typing import Any

import torch

from diffloop.config import ConfigError, LoraConfig, ModelConfig, SD3Config
from diffloop.policies.families import how_to_provide
from diffloop.policies.flow import FlowMatchPolicy, load_components
from diffloop.policies.loading import ModelLoadError

EXTRA_KEYS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default max_sequence_length
MAX_SEQUENCE_LIMIT = 512  # StableDiffusion3Pipeline.check_inputs refuses longer


def _how_to_provide(name: str) -> str:
    return how_to_provide("sd3", name)


def load_sd3_components(model: ModelConfig) -> dict[str, Any]:
    """The SD3 pipeline's components from ``model.pretrained``; text_encoder_3 / tokenizer_3 are
    None when model_index.json lists T5 as [null, null] (the T5 part of the embeddings is zeros)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    kw = {"revision": model.revision}
    weights = {"variant": model.variant, **kw}
    loaders = {
        "transformer": lambda p: SD3Transformer2DModel.from_pretrained(
            p, subfolder="transformer", **weights
        ),
        "text_encoder": lambda p: CLIPTextModelWithProjection.from_pretrained(
            p, subfolder="text_encoder", **weights
        ),
        "text_encoder_2": lambda p: CLIPTextModelWithProjection.from_pretrained(
            p, subfolder="text_encoder_2", **weights
        ),
        "text_encoder_3": lambda p: T5EncoderModel.from_pretrained(
            p, subfolder="text_encoder_3", **weights
        ),
        "tokenizer": lambda p: AutoTokenizer.from_pretrained(p, subfolder="tokenizer", **kw),
        "tokenizer_2": lambda p: AutoTokenizer.from_pretrained(p, subfolder="tokenizer_2", **kw),
        "tokenizer_3": lambda p: AutoTokenizer.from_pretrained(p, subfolder="tokenizer_3", **kw),
        "scheduler": lambda p: FlowMatchEulerDiscreteScheduler.from_pretrained(
            p, subfolder="scheduler", **kw
        ),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, subfolder="vae", **weights),
    }
    components = load_components(
        model,
        loaders,
        _how_to_provide(model.pretrained),
        optional=("text_encoder_3", "tokenizer_3"),
    )
    if (components["text_encoder_3"] is None) != (components["tokenizer_3"] is None):
        raise ModelLoadError(
            "text_encoder_3 and tokenizer_3 (T5) come together: give both or neither. "
            + _how_to_provide(model.pretrained)
        )
    return components


class SD3Policy(FlowMatchPolicy):
    """``FlowMatchPolicy`` with SD3's three text encoders, pooled embeddings and real CFG."""

    lora_loader = "SD3LoraLoaderMixin"

    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    timestep_scale = 1.0  # SD3's transformer takes the 0-1000 timestep
    eval_num_steps = 40  # Flow-GRPO config/grpo.py: sample.eval_num_steps = 40 for every SD3 config
    eval_eta = 0.0  # Flow-GRPO scripts/train_sd3.py eval: pipeline_with_logprob(noise_level=0)

    @property
    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def __init__(
        self,
        components: dict[str, Any],
        lora: LoraConfig,
        *,
        sd3: SD3Config | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(components, lora, **kwargs)
        self.tokenizer = components["tokenizer"]
        self.tokenizer_2 = components["tokenizer_2"]
        self.tokenizer_3 = components.get("tokenizer_3")
        self.max_sequence_length = self._max_sequence_length(sd3 or SD3Config())

    def _max_sequence_length(self, sd3: SD3Config) -> int:
        """T5 tokens L: ``model.sd3.max_sequence_length`` as given (the pipeline pads or truncates
        to it), else 256 capped at the T5 tokenizer's model_max_length (a shorter tokenizer, as in
        the tests, sets the length)."""
        length = sd3.max_sequence_length
        if length is None:
            if self.tokenizer_3 is None:
                return MAX_SEQUENCE_LENGTH
            return min(MAX_SEQUENCE_LENGTH, self.tokenizer_3.model_max_length)
        if not 1 <= length <= MAX_SEQUENCE_LIMIT:
            raise ConfigError(
                f"model.sd3.max_sequence_length={length} must be in 1..{MAX_SEQUENCE_LIMIT} "
                "(StableDiffusion3Pipeline's limit); Flow-GRPO uses 128"
            )
        return length

    @torch.no_grad()
    def _clip(
        self, prompts: list[str], tokenizer: Any, encoder: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    @torch.no_grad()
    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width,
                               device=self.device, dtype=self.weight_dtype)  # fmt: skip
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=self.max_sequence_length,
            truncation=True, add_special_tokens=True, return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        return self.text_encoder_3(ids)[0]

    @torch.no_grad()
    def encode_prompts_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (prompt_embeds (N, 77 + L, D_t5), pooled (N, P1 + P2)); L =
        ``max_sequence_length``, as ``StableDiffusion3Pipeline.encode_prompt(...,
        max_sequence_length=L)``."""
        h1, p1 = self._clip(prompts, self.tokenizer, self.text_encoder)
        h2, p2 = self._clip(prompts, self.tokenizer_2, self.text_encoder_2)
        t5 = self._t5(prompts)
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_prompts_with_pooled(prompts)[0]

    @torch.no_grad()
    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        embeds, pooled = self.encode_prompts_with_pooled(prompts)
        negative, negative_pooled = self.encode_prompts_with_pooled(
            [negative_prompt] * len(prompts)
        )
        extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
        return embeds, negative, extra

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor], negative: bool
    ) -> dict[str, Any]:
        """encoder_hidden_states (N, L, D) and pooled_projections (N, P) of one CFG branch."""
        if extra is None or any(k not in extra for k in EXTRA_KEYS):
            raise ValueError(
                f"SD3 trajectories need extra={list(EXTRA_KEYS)} (sampled by another policy?)"
            )
        pooled = extra["negative_pooled_prompt_embeds" if negative else "pooled_prompt_embeds"]
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def unet_conditioning(self, prompts: list[str]) -> dict[str, Any]:
        """The conditional branch's keyword arguments for ``self.unet`` (export checks, FLOPs)."""
        embeds, _, extra = self.conditioning(prompts, "")
        return self.branch_kwargs(embeds, extra, negative=False)


def load_sd3_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> SD3Policy:
    """``load_policy`` for the sd3 family: components from model.pretrained, settings from
    model.resolution and model.sd3."""
    return SD3Policy(
        load_sd3_components(model), lora, sd3=model.sd3, resolution=model.resolution, **kwargs
    )
