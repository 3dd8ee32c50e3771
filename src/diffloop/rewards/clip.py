"""CLIP image-text rewards through transformers' ``CLIPModel``: ``clip_score`` and ``pickscore``.

For images x (N, 3, H, W) in [0, 1] and prompts c (N,):
    u = visual_projection(vision_model(T(x)).pooler_output)          (N, E)  image embedding
    v = text_projection(text_model(tokens(c)).pooler_output)          (N, E)  text embedding
    cos(x, c) = <u, v> / (|u| |v|)
    clip_score(x, c) = scale * cos(x, c)                   (scale = 1 by default: the raw cosine)
    pickscore(x, c)  = exp(logit_scale) * cos(x, c)        (PickScore_v1's README; ~100 * cos)

T is :class:`~diffloop.rewards.preprocess.ImageTransform` read from the processor's
``preprocessor_config.json`` (CLIP: bicubic resize of the short side to 224, center crop 224, CLIP
mean / std), run on the images' device. Prompts are tokenized with the processor's tokenizer,
padded to the model's context length (77) and truncated there, so a prompt's embedding never
depends on the other prompts of its batch. Each distinct prompt of a batch is encoded once (LOOP
scores K images per prompt).

Weights: ``model`` and ``processor`` are hub ids or local directories (``save_pretrained``).
PickScore's weights (yuvalkirstain/PickScore_v1) ship without a processor; it uses
laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, as in its README.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from diffloop.rewards.model_loading import ModelReward, load_pretrained
from diffloop.rewards.preprocess import ImageTransform


def clip_image_embeds(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) model input -> (B, E) projected image embeddings (not normalised).

    Written against the submodules rather than ``get_image_features``, whose return type changed
    between transformers 4 (tensor) and 5 (output object).
    """
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def clip_text_embeds(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, L) token ids -> (B, E) projected text embeddings (not normalised)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def cosine_similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, E), (B, E) -> (B,) cosine, computed in float32."""
    return (F.normalize(u.float(), dim=-1) * F.normalize(v.float(), dim=-1)).sum(-1)


class ClipSimilarityReward(ModelReward):
    """``scale * cos(image, prompt)`` for a transformers CLIPModel; see the module docstring.

    Args:
        model:      hub id or directory of a CLIPModel.
        processor:  hub id or directory holding the tokenizer and preprocessor_config.json
                    (default: ``model``).
        scale:      a number, or "logit_scale" for the model's learned exp(logit_scale).
        dtype:      weights' dtype on the device ("float32", "bfloat16", "float16").
        batch_size: images per forward pass.
    """

    name = "clip_score"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        scale: float | str = 1.0,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
        name: str | None = None,
    ) -> None:
        super().__init__(dtype=dtype, batch_size=batch_size)
        from transformers import AutoTokenizer, CLIPModel

        self.name = name or self.name
        processor = processor or model
        self._setup(
            load_pretrained(CLIPModel, model, reward=self.name, kwarg="model"),
            load_pretrained(
                AutoTokenizer, processor, reward=self.name, kwarg="processor", what="tokenizer"
            ),
            ImageTransform.from_pretrained(
                processor, "shortest_edge", reward=self.name, kwarg="processor"
            ),
            scale,
        )

    def _setup(
        self, model: Any, tokenizer: Any, transform: ImageTransform, scale: float | str
    ) -> None:
        if isinstance(scale, str) and scale != "logit_scale":
            raise ValueError(f"scale must be a number or 'logit_scale', got {scale!r}")
        self.model, self.tokenizer, self.transform, self.scale = model, tokenizer, transform, scale
        self.max_length = min(
            model.config.text_config.max_position_embeddings,
            getattr(tokenizer, "model_max_length", 77),
        )
        self._set_modules(model)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) prompts -> (B, E); each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            unique,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        embeds = clip_text_embeds(self.model, tokens["input_ids"], tokens.get("attention_mask"))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return embeds[index]

    def score_batch(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        pixel_values = self.transform(images).to(self.dtype)
        cos = cosine_similarity(
            clip_image_embeds(self.model, pixel_values), self.text_embeds(prompts)
        )
        if self.scale == "logit_scale":
            return self.model.logit_scale.float().exp() * cos
        return float(self.scale) * cos


def clip_score(
    model: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    scale: float = 1.0,
    dtype: str = "float32",
    batch_size: int = 16,
) -> ClipSimilarityReward:
    """CLIP image-text cosine similarity (times ``scale``) for any transformers CLIP checkpoint."""
    return ClipSimilarityReward(model, processor, scale, dtype, batch_size, name="clip_score")


def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    dtype: str = "float32",
    batch_size: int = 16,
) -> ClipSimilarityReward:
    """PickScore v1: exp(logit_scale) * cos(image, prompt) on its fine-tuned CLIP ViT-H/14."""
    return ClipSimilarityReward(
        model, processor, "logit_scale", dtype, batch_size, name="pickscore"
    )
