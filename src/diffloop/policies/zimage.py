"""Z-Image (base and Turbo) as a flow-matching policy: Qwen3 captions of per-prompt length, the
reversed time, the negated model output and the pipeline's CFG, on ``FlowMatchPolicy``.

Follows diffusers 0.42 ``ZImagePipeline`` (``_encode_prompt``, ``__call__``) and Flow-Factory's
Z-Image adapter (X-GenGroup/Flow-Factory src/flow_factory/models/z_image/z_image.py):

    text    = chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
              enable_thinking=True), padded / truncated to L = max_sequence_length (512)
    caption = Qwen3(text).hidden_states[-2][attention_mask]            (L_i, D): per-prompt length
    out     = transformer([x_i (C, 1, h, w)], (1000 - t) / 1000, [caption_i])   (reversed time)
    guided  = pos + s (pos - neg),  s = w - 1  (the pipeline's guidance_scale s; diffloop's w),
              each sample's norm capped at k ||pos|| (cfg_normalization k > 0), and no CFG on
              samples whose (1000 - t) / 1000 > cfg_truncation c (c = 1, the default: never)
    v       = -guided                                   (``output_sign``: core.flow's v ~ e - x0)
    sigmas  = linspace(1, 1/T, T) through the scheduler's static shift (mu passed, unused), then 0

Captions are stored zero-padded to L in ``prompt_embeds`` / ``negative_prompt_embeds`` with their
lengths in ``extra`` ("prompt_lengths", "negative_lengths") and cut back to each sample's length
before every transformer call: the transformer pads each caption to a multiple of 32 with its
learned pad token, so a zero-padded caption would be another input. Each distinct prompt (and the
negative prompt) is encoded once per run (``DenoiserPolicy.encoded``); with
``model.text_encoder_device=offload`` the text encoder waits in CPU memory and comes to the device
only for that.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from diffloop.config import LoraConfig, ModelConfig, ZImageConfig
from diffloop.policies.embedding_cache import Rows, each_alone, repeat_rows
from diffloop.policies.flow import FlowMatchPolicy
from diffloop.policies.loading import ModelLoadError

logger = logging.getLogger(__name__)

EXTRA_KEYS = ("prompt_lengths", "negative_lengths")
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline.__call__'s default max_sequence_length
# No pipeline limit, but the caption (padded to a multiple of 32) and then the image take rope
# positions 1.. along the first axis, which has axes_lens[0] = 1024 positions.
MAX_SEQUENCE_LIMIT = 992
DEFAULT_IMAGE_SIZE = 1024  # ZImagePipeline's default height / width
# Flow-Factory's ZImageAdapter.default_target_modules: attention and feed-forward projections of
# the 30 main and the 4 refiner blocks.
LORA_TARGETS = [
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
]  # fmt: skip


def guide(pos: torch.Tensor, neg: torch.Tensor, scale: float, cap: float) -> torch.Tensor:
    """ZImagePipeline's CFG on float32 outputs (M, ...): pos + scale (pos - neg), each sample's
    norm scaled down to ``cap`` x ||pos|| where it exceeds it (``cap`` > 0; 0: no cap)."""
    guided = pos + scale * (pos - neg)
    if cap <= 0:
        return guided
    dims = tuple(range(1, pos.ndim))
    limit = cap * torch.linalg.vector_norm(pos, dim=dims, keepdim=True)
    norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
    return torch.where(norm > limit, guided * (limit / norm), guided)


class ZImageView(torch.nn.Module):
    """The Z-Image transformer called like a UNet, ``view(x, t, cap_feats=[...]).sample``: x (N, C,
    h, w), t the scheduler's 0-1000 timesteps; the output is the velocity (-transformer output),
    (N, C, h, w), for callers that run the denoiser directly (export checks, FLOP counts)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cap_feats: list) -> Any:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        t = torch.as_tensor(timestep, device=x.device).float().expand(len(x))
        out = call_transformer(self.transformer, x, t, cap_feats, self.transformer.dtype)
        return Transformer2DModelOutput(sample=-out.float())


def model_time(t: torch.Tensor) -> torch.Tensor:
    """Scheduler timesteps t (B,), 0-1000 -> Z-Image's time (1000 - t) / 1000 float32, as the
    pipeline computes it (1 - sigma: 0 is pure noise)."""
    return (1000 - t.float()) / 1000


def call_transformer(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    captions: list[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The raw output (B, C, h, w) of ``transformer`` on latents x (B, C, h, w) at scheduler
    timesteps t (B,), as ZImagePipeline calls it: a list of (C, 1, h, w) latents in ``dtype``, the
    time ``model_time(t)``, one caption (L_i, D) per row."""
    frames = list(x.to(dtype).unsqueeze(2).unbind(0))
    out = transformer(frames, model_time(t), captions, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


class ZImagePolicy(FlowMatchPolicy):
    """``FlowMatchPolicy`` with Z-Image's captions, time, sign and CFG (module docstring).

    ``zimage``: ``model.zimage`` (text length, cfg_normalization, cfg_truncation);
    ``resolution``: ``model.resolution`` (null: 1024, the pipeline's default)."""

    family_name = "zimage"
    label = "Z-Image"
    lora_loader = "ZImageLoraLoaderMixin"
    DEFAULT_LORA_TARGETS = LORA_TARGETS
    text_encoder_names = ("text_encoder",)
    settings_field = "zimage"
    extra_keys = EXTRA_KEYS
    output_sign = -1.0  # the transformer predicts x0 - e: v = -output

    def __init__(
        self, components: dict, lora: LoraConfig, *, zimage: ZImageConfig | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(components, lora, **kwargs)
        zimage = zimage or ZImageConfig()
        self.max_sequence_length = self.text_length(
            zimage.max_sequence_length, MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LIMIT,
            "model.zimage.max_sequence_length", "ZImagePipeline",
        )  # fmt: skip
        self.cfg_normalization = float(zimage.cfg_normalization)
        self.cfg_truncation = float(zimage.cfg_truncation)

    # ------------------------------------------------------------------ model and resolution

    def finish_denoiser(self) -> None:
        self.unet = ZImageView(self.transformer)

    def default_image_size(self) -> int:
        return DEFAULT_IMAGE_SIZE

    def check_resolution(self) -> None:
        """The pipeline's check: the side a multiple of the VAE's downsampling x 2 (the patch)."""
        multiple = self.vae_scale_factor * self.transformer.config.all_patch_size[0]
        if self.image_size() % multiple:
            raise ModelLoadError(
                f"model.resolution={self.image_size()} must be a multiple of {multiple} (the "
                "VAE's downsampling x the transformer's patch size)"
            )

    def image_seq_len(self) -> int:
        return (self.latent_size() // self.transformer.config.all_patch_size[0]) ** 2

    def set_timesteps(self, num_steps: int) -> None:
        """ZImagePipeline's schedule: set_timesteps(sigmas=get_default_z_image_sigmas(T), mu)."""
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        self.set_shifted_timesteps(num_steps, get_default_z_image_sigmas(num_steps))

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Rows:
        """prompts (N,) -> {embeds: captions zero-padded (N, L, D), lengths (N,) long}, L =
        ``max_sequence_length``: ZImagePipeline._encode_prompt's hidden_states[-2] of the
        chat-templated text, its unmasked rows first."""
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                enable_thinking=True,
            )
            for p in prompts
        ]  # fmt: skip
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        mask = tokens.attention_mask.to(self.text_device).bool()
        hidden = self.text_encoder(
            input_ids=tokens.input_ids.to(self.text_device), attention_mask=mask,
            output_hidden_states=True,
        ).hidden_states[-2]  # fmt: skip
        captions = torch.zeros_like(hidden)  # the unmasked rows first, whatever the padding side
        for row, (h, m) in enumerate(zip(hidden, mask)):
            captions[row, : int(m.sum())] = h[m]
        return {"embeds": captions, "lengths": mask.sum(-1)}

    def encode_uncached(self, prompts: list[str]) -> Rows:
        """``_encode``, each prompt alone; a prompt filling all L tokens is warned about once."""
        rows = each_alone(prompts, self._encode)
        if bool((rows["lengths"] == self.max_sequence_length).any()):
            logger.warning(
                "zimage: a chat-templated prompt fills all %d tokens of "
                "model.zimage.max_sequence_length and may be truncated", self.max_sequence_length,
            )  # fmt: skip
        return rows

    def encode_captions(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (N,) -> (captions zero-padded (N, L, D), lengths (N,) long) (``encoded``: each
        distinct prompt encoded once)."""
        (rows,) = self.encoded(prompts)
        return rows["embeds"], rows["lengths"]

    def conditioning(
        self, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(captions (N, L, D), negative captions (N, L, D), {prompt_lengths (N,),
        negative_lengths (N,)}); the negative prompt ("" by default, as the pipeline) encoded
        once for all N."""
        rows, neg = self.encoded(list(prompts), [negative_prompt])
        n = len(prompts)
        extra = {"prompt_lengths": rows["lengths"],
                 "negative_lengths": repeat_rows(neg["lengths"], n)}  # fmt: skip
        return rows["embeds"], repeat_rows(neg["embeds"], n), extra

    def branch_kwargs(
        self, embeds: torch.Tensor, extra: dict[str, torch.Tensor] | None, negative: bool
    ) -> dict[str, Any]:
        """``cap_feats``: the branch's captions, each cut to its length [(L_i, D)]."""
        lengths = self.check_extra(extra)["negative_lengths" if negative else "prompt_lengths"]
        return {"cap_feats": [e[:n] for e, n in zip(embeds, lengths.tolist())]}

    # ------------------------------------------------------------------ the model call

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return model_time(t)

    def guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        negative: torch.Tensor,
        extra: dict[str, torch.Tensor] | None,
        guidance_scale: float,
        use: str = "training",
    ) -> torch.Tensor:
        """The pipeline's guided output (N, C, h, w) float32, before ``output_sign``: one call on
        [x; x[cfg]] with [positive captions; negative captions of the CFG rows] (the pipeline's
        order), where the CFG rows are those whose time (1000 - t) / 1000 <= cfg_truncation, then
        ``guide`` with s = guidance_scale - 1 on those rows."""
        pos = self.branch_kwargs(embeds, extra, negative=False)["cap_feats"]
        cfg = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if self.cfg_active(guidance_scale):
            cfg = self.model_timestep(t) <= self.cfg_truncation
        rows = cfg.nonzero().flatten().tolist()
        neg = self.branch_kwargs(negative, extra, negative=True)["cap_feats"] if rows else []
        with self._autocast():
            out = call_transformer(
                self.transformer, torch.cat([x, x[rows]]), torch.cat([t, t[rows]]),
                pos + [neg[i] for i in rows], self.weight_dtype,
            ).float()  # fmt: skip
        guided, uncond = out[: len(x)], out[len(x) :]
        if rows:
            guided = guided.clone()
            guided[rows] = guide(guided[rows], uncond, guidance_scale - 1, self.cfg_normalization)
        return guided


def load_zimage_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any) -> ZImagePolicy:
    """``load_policy`` for the zimage family: components from model.pretrained, settings from
    model.resolution and model.zimage."""
    return ZImagePolicy.from_model(model, lora, **kwargs)
