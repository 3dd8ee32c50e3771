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

from diffloop.config import LoraConfig, ModelConfig, SD3Config
from diffloop.policies.embedding_cache import Rows, each_alone, repeat_rows
from diffloop.policies.flow import FlowMatchPolicy

EXTRA_KEYS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default max_sequence_length
MAX_SEQUENCE_LIMIT = 512  # StableDiffusion3Pipeline.check_inputs refuses longer


class SD3Policy(FlowMatchPolicy):
    """``FlowMatchPolicy`` with SD3's three text encoders, pooled embeddings and real CFG.

    ``sd3``: ``model.sd3`` (T5 length); ``resolution``: ``model.resolution``."""

    family_name = "sd3"
    label = "SD3"
    lora_loader = "SD3LoraLoaderMixin"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    settings_field = "sd3"
    extra_keys = EXTRA_KEYS
    timestep_divisor = 1.0  # SD3's transformer takes the 0-1000 timestep
    eval_num_steps = 40  # Flow-GRPO config/grpo.py: sample.eval_num_steps = 40 for every SD3 config
    eval_eta = 0.0  # Flow-GRPO scripts/train_sd3.py eval: pipeline_with_logprob(noise_level=0)

    def __init__(
        self, components: dict, lora: LoraConfig, *, sd3: SD3Config | None = None, **kwargs: Any
    ) -> None:
        super().__init__(components, lora, **kwargs)
        self.max_sequence_length = self._max_sequence_length(sd3 or SD3Config())

    def _max_sequence_length(self, sd3: SD3Config) -> int:
        """T5 tokens L: ``model.sd3.max_sequence_length`` as given (the pipeline pads or truncates
        to it), else 256 capped at the T5 tokenizer's model_max_length (a shorter tokenizer, as in
        the tests, sets the length)."""
        default = MAX_SEQUENCE_LENGTH
        if self.tokenizer_3 is not None:
            default = min(MAX_SEQUENCE_LENGTH, self.tokenizer_3.model_max_length)
        return self.text_length(
            sd3.max_sequence_length, default, MAX_SEQUENCE_LIMIT, "model.sd3.max_sequence_length",
            "StableDiffusion3Pipeline",
        )  # fmt: skip

    @torch.no_grad()
    def _clip(
        self, prompts: list[str], tokenizer: Any, encoder: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = encoder(self.tokenize(tokenizer, prompts), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    @torch.no_grad()
    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width,
                               device=self.text_device, dtype=self.weight_dtype)  # fmt: skip
        ids = self.tokenize(self.tokenizer_3, prompts, self.max_sequence_length)
        return self.text_encoder_3(ids)[0]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Rows:
        h1, p1 = self._clip(prompts, self.tokenizer, self.text_encoder)
        h2, p2 = self._clip(prompts, self.tokenizer_2, self.text_encoder_2)
        t5 = self._t5(prompts)
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "embeds": torch.cat([clip.to(t5.dtype), t5], dim=-2),
            "pooled": torch.cat([p1, p2], dim=-1),
        }

    def encode_uncached(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds (N, 77 + L, D_t5), pooled (N, P1 + P2)}, each prompt alone; L
        = ``max_sequence_length``, as ``StableDiffusion3Pipeline.encode_prompt(...,
        max_sequence_length=L)``."""
        return each_alone(prompts, self._encode)

    def encode_prompts_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (prompt_embeds (N, 77 + L, D_t5), pooled (N, P1 + P2)) (``encoded``)."""
        (rows,) = self.encoded(prompts)
        return rows["embeds"], rows["pooled"]

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        rows, neg = self.encoded(prompts, [negative_prompt])
        embeds, pooled = rows["embeds"], rows["pooled"]
        n = len(prompts)
        negative, negative_pooled = (repeat_rows(neg[k], n) for k in ("embeds", "pooled"))
        extra = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
        return embeds, negative, extra

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """encoder_hidden_states (N, L, D) and pooled_projections (N, P) of one CFG branch."""
        extra = self.check_extra(extra)
        pooled = extra["negative_pooled_prompt_embeds" if negative else "pooled_prompt_embeds"]
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def load_sd3_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> SD3Policy:
    """``load_policy`` for the sd3 family: components from model.pretrained (T5 optional: its
    folders listed as [null, null] give None), settings from model.resolution and model.sd3."""
    return SD3Policy.from_model(model, lora, **kwargs)
