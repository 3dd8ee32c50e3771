"""Qwen-Image as a flow-matching policy: its chat-template text encoding, packing, schedule and
"true CFG".

Follows diffusers 0.42.1 ``QwenImagePipeline`` (``_get_qwen_prompt_embeds``, ``encode_prompt``,
``_pack_latents``, ``_unpack_latents``, ``calculate_shift``, ``__call__``):

    text    = Qwen2.5-VL last hidden state of PROMPT_TEMPLATE.format(prompt), its first
              PROMPT_TEMPLATE_DROP = 34 tokens (the system message and "<|im_start|>user\\n")
              dropped, at most L = max_sequence_length kept: (N, L_i, 3584), zero-padded to L
              with a mask (prompt_embeds_mask, 1 = a token)
    latents (N, C, h, w) -> 2x2 patches -> packed (N, h/2 w/2, 4C)   (the 3-D VAE's one frame)
    v       = transformer(packed, timestep = t / 1000, encoder_hidden_states, its mask,
                          img_shapes = [(1, h/2, w/2)])
    true CFG (sample.guidance_scale = the pipeline's true_cfg_scale w > 1): one call per branch,
              v = v_neg + w (v_pos - v_neg), rescaled per token to the norm of v_pos (``true_cfg``)
    sigmas  linspace(1, 1/T, T), mu = calculate_shift(h/2 w/2, ...) from the scheduler config
            (exponential time shift; Qwen-Image's shift_terminal 0.02 stretches the end)
    decode  unpack to (N, C, 1, h, w), latents / (1 / latents_std) + latents_mean, VAE, frame 0.

A batch's text is run at the length of its longest prompt, the mask dropped when every token is
valid: the pipeline's call exactly. Trajectories store the embeddings at the fixed width L (the
sampling batches concatenate) with their masks in ``extra``: prompt_embeds_mask (N, L),
negative_prompt_embeds_mask (N, L).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from diffloop.config import LoraConfig, ModelConfig, QwenImageConfig
from diffloop.policies.base import iter_chunks
from diffloop.policies.embedding_cache import Rows
from diffloop.policies.families import family
from diffloop.policies.flow import ATTENTION_TARGETS, FlowMatchPolicy
from diffloop.policies.flux import pack_latents, unpack_latents
from diffloop.policies.loading import ModelLoadError

logger = logging.getLogger(__name__)

QWEN_IMAGE_COMPONENTS = tuple(family("qwen_image").folders())
EXTRA_KEYS = ("prompt_embeds_mask", "negative_prompt_embeds_mask")
# QwenImagePipeline.prompt_template_encode / prompt_template_encode_start_idx (set in its
# __init__; tests/test_qwen_image.py checks them against a loaded pipeline).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024  # QwenImagePipeline.tokenizer_max_length
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default max_sequence_length
MAX_SEQUENCE_LIMIT = 1024  # its check_inputs refuses longer
# The image and text streams' feed-forward projections (Flow-Factory's and verl-omni's targets).
FEED_FORWARD_TARGETS = [
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
]  # fmt: skip


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's guidance, (N, L, F) float32: the CFG combination rescaled so each token
    keeps the conditional branch's norm over its F channels,

        v = u + w (c - u),    v <- v ||c|| / ||v||.
    """
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, L, D), (N, L) -> the same cut to the longest row's tokens, and the mask, or None when
    every kept token is valid: what ``QwenImagePipeline.encode_prompt`` gives the transformer for
    these prompts (it pads a batch to its longest prompt and drops an all-ones mask)."""
    length = max(int(mask.sum(1).max()), 1)
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if bool(mask.all()) else mask)


class QwenImagePolicy(FlowMatchPolicy):
    """``FlowMatchPolicy`` with Qwen-Image's Qwen2.5-VL conditioning, 2x2 packing, mu-shifted
    schedule and true CFG (module docstring).

    ``qwen_image``: ``model.qwen_image`` (text length); ``resolution``: ``model.resolution``."""

    family_name = "qwen_image"
    label = "Qwen-Image"
    lora_loader = "QwenImageLoraLoaderMixin"
    text_encoder_names = ("text_encoder",)
    settings_field = "qwen_image"
    extra_keys = EXTRA_KEYS
    DEFAULT_LORA_TARGETS = ATTENTION_TARGETS + FEED_FORWARD_TARGETS
    # QwenImagePipeline: timestep = t.expand(N).to(latents.dtype) / 1000
    timestep_divisor = 1000.0
    timestep_in_weight_dtype = True
    pack_factor = 2
    batch_branches = False  # the two branches' texts have their own lengths and masks
    upcast_vae = False  # the pipeline decodes in the VAE's dtype
    eval_num_steps = 50  # QwenImagePipeline's default num_inference_steps (verl-omni's validation)
    eval_eta = 0.0  # the deterministic ODE

    def __init__(
        self,
        components: dict,
        lora: LoraConfig,
        *,
        qwen_image: QwenImageConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(components, lora, **kwargs)
        self.max_sequence_length = self.text_length(
            (qwen_image or QwenImageConfig()).max_sequence_length, MAX_SEQUENCE_LENGTH,
            MAX_SEQUENCE_LIMIT, "model.qwen_image.max_sequence_length", "QwenImagePipeline",
        )  # fmt: skip
        self.height = self.width = self.latent_size()

    def vae_downsampling(self) -> int:
        """QwenImagePipeline.vae_scale_factor: 2 per temporal-downsampling entry (8 for
        Qwen-Image)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    def default_image_size(self) -> int:
        """QwenImagePipeline's default: default_sample_size 128 x vae_scale_factor (1024 px)."""
        return 128 * self.vae_scale_factor

    def check_model(self) -> None:
        """Refuse transformers this text-to-image policy would run wrongly (edit / layered
        variants, a guidance embedding no released Qwen-Image has), saying why."""
        config, z_dim = self.transformer.config, self.vae.config.z_dim
        if config.in_channels != 4 * z_dim:
            raise ModelLoadError(
                f"the Qwen-Image transformer takes {config.in_channels} input channels but 2x2 "
                f"packing of the VAE's {z_dim} latent channels gives {4 * z_dim}: not a "
                "text-to-image Qwen-Image model"
            )
        variant = [k for k in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope",
                               "guidance_embeds") if getattr(config, k, False)]  # fmt: skip
        if variant:
            raise ModelLoadError(
                f"the Qwen-Image transformer has {variant[0]}=true (an edit / layered / "
                "guidance-distilled variant): only the text-to-image QwenImagePipeline's "
                "transformer is supported"
            )

    # ------------------------------------------------------------------ family hooks

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)  # QwenImagePipeline._pack_latents (frame axis 1)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, self.height, self.width)

    def set_timesteps(self, num_steps: int) -> None:
        """QwenImagePipeline's schedule: the mu-shifted one (``set_shifted_timesteps``)."""
        self.set_shifted_timesteps(num_steps)

    def encoding_settings(self) -> dict[str, Any]:
        """The base's, with the prompt template and its dropped tokens."""
        return {**super().encoding_settings(), "template": [PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP]}

    def encode_uncached(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds (N, L, D), mask (N, L)} (``encode``), each prompt alone: no
        padding at all, so no row depends on another prompt's length; the prompts cut to L are
        counted in one warning."""
        rows = [self.encode([p], warn=False) for p in prompts]
        self._truncation_warning(prompts)
        return {"embeds": torch.cat([r[0] for r in rows]), "mask": torch.cat([r[1] for r in rows])}

    @torch.no_grad()
    def encode(self, prompts: list[str], warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (embeds (N, L, D) in the text encoder's dtype, mask (N, L) long)
        (the text encoder must be on ``text_device``: ``text_encoders_on_device``),
        L = ``max_sequence_length``: ``QwenImagePipeline._get_qwen_prompt_embeds`` (the template,
        the last hidden state of the valid tokens, the first 34 dropped), each row cut to L and
        zero-padded to it (the pipeline pads to the batch's longest)."""
        drop, width = PROMPT_TEMPLATE_DROP, self.max_sequence_length
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE.format(p) for p in prompts],
            max_length=TOKENIZER_MAX_LENGTH + drop, padding=True, truncation=True,
            return_tensors="pt",
        ).to(self.text_device)  # fmt: skip
        hidden = self.text_encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            output_hidden_states=True,
        ).hidden_states[-1]
        valid = tokens.attention_mask.bool()
        rows = torch.split(hidden[valid], valid.sum(1).tolist())
        embeds = hidden.new_zeros(len(prompts), width, hidden.shape[-1])
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=self.text_device)
        for i, row in enumerate(rows):
            row = row[drop : drop + width]
            embeds[i, : len(row)], mask[i, : len(row)] = row, 1
        if warn:
            self._truncation_warning(prompts)
        return embeds.to(self.text_encoder.dtype), mask

    def _truncation_warning(self, prompts: list[str]) -> None:
        """One warning counting the prompts longer than ``max_sequence_length`` tokens (after the
        template's dropped ones)."""
        drop, width = PROMPT_TEMPLATE_DROP, self.max_sequence_length
        tokens = self.tokenizer(
            [PROMPT_TEMPLATE.format(p) for p in prompts],
            max_length=TOKENIZER_MAX_LENGTH + drop, padding=True, truncation=True,
        )  # fmt: skip
        cut = sum(sum(m) - drop > width for m in tokens["attention_mask"])
        if cut:
            logger.warning(
                "qwen_image: %d of %d prompts are longer than %d tokens and were truncated "
                "(model.qwen_image.max_sequence_length)", cut, len(prompts), width,
            )  # fmt: skip

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(embeds (N, L, D), the negative prompt's (N, L, D), {prompt_embeds_mask (N, L),
        negative_prompt_embeds_mask (N, L)}); the negative prompt is encoded once."""
        rows, neg = self.encoded(prompts, [negative_prompt])
        n = len(prompts)
        extra = {"prompt_embeds_mask": rows["mask"],
                 "negative_prompt_embeds_mask": neg["mask"].expand(n, -1)}  # fmt: skip
        return rows["embeds"], neg["embeds"].expand(n, -1, -1), extra

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """encoder_hidden_states (N, L', D) and encoder_hidden_states_mask (N, L') or None of one
        branch, cut to its longest prompt (``trim_text``)."""
        key = "negative_prompt_embeds_mask" if negative else "prompt_embeds_mask"
        embeds, mask = trim_text(embeds, self.check_extra(extra)[key])
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, branches: Any, guidance_scale: float, use: str
    ) -> torch.Tensor:
        """The base's call; a branch whose mask is None (every token valid) passes None, as the
        pipeline (one branch per call: ``batch_branches`` False)."""
        (branch,) = branches
        if branch["encoder_hidden_states_mask"] is not None:
            return super().denoise(x, t, branches, guidance_scale, use)
        kept = {k: v for k, v in branch.items() if k != "encoder_hidden_states_mask"}
        return super().denoise(x, t, [kept], guidance_scale, use)

    def position_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """img_shapes [[(1, h/2, w/2)]] x N: the packed image's frame, rows and columns for the
        transformer's RoPE (QwenImagePipeline's ``img_shapes``)."""
        n = len(kwargs["encoder_hidden_states"])
        return {"img_shapes": [[(1, self.height // 2, self.width // 2)]] * n}

    def combine_guidance(
        self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """QwenImagePipeline's true CFG (``true_cfg``): the combination rescaled to the
        conditional norm per token."""
        return true_cfg(cond, uncond, guidance_scale)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> (N, C, 1, h, w) de-normalised per channel, in the VAE's dtype:
        latents / (1 / latents_std) + latents_mean, as QwenImagePipeline."""
        config = self.vae.config
        z = self.unpack(latents.float()).unsqueeze(2).to(self.vae.dtype)
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(z.device, z.dtype)
        return z / inv_std + mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Final packed latents -> images (N, 3, H, W) float32 in [0, 1] (the VAE's frame 0)."""
        images = [
            self.vae.decode(self.vae_input(latents[chunk])).sample[:, :, 0].float()
            for chunk in iter_chunks(len(latents), batch_size)
        ]
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


def load_qwen_image_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> QwenImagePolicy:
    """``load_policy`` for the qwen_image family: components from model.pretrained, settings from
    model.resolution and model.qwen_image."""
    return QwenImagePolicy.from_model(model, lora, **kwargs)
