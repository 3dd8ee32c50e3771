"""ImageReward (THUDM/ImageReward v1.0) without the ``image-reward`` package: its BLIP checkpoint
mapped onto transformers' ``BlipVisionModel`` + ``BlipTextModel``.

Follows THUDM/ImageReward, ImageReward/ImageReward.py (``ImageReward.score``):

    v      = ViT-L/16(T(x))                                  (N, 197, 1024) image tokens
    h      = BERT-base(tokens(c), cross-attending to v)       (N, 35, 768), first token h[:, 0]
    reward = (MLP(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072
    MLP    = the aesthetic predictor's layer list (768-1024-128-64-16-1, no nonlinearity)

T = Resize(224, bicubic) of the short side, CenterCrop(224), CLIP mean / std (on the images'
device); c is tokenized by BERT's uncased WordPiece, padded / truncated to 35 tokens, starting
with [CLS] as in ImageReward.

Checkpoint (ImageReward.pt, a plain state dict of LAVIS/BLIP names) -> transformers names
(:func:`imagereward_to_transformers`):
    blip.visual_encoder.cls_token / pos_embed / patch_embed.proj.* ->
        vision_model.embeddings.class_embedding / position_embedding / patch_embedding.*
    blip.visual_encoder.blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2} ->
        vision_model.encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection,
        layer_norm2, mlp.fc1, mlp.fc2}        (BLIP's fused qkv has HF's (3, heads, dim) layout)
    blip.visual_encoder.norm.* -> vision_model.post_layernorm.*
    blip.text_encoder.* -> text_encoder.*  (BLIP's med.py and transformers' BlipText share names;
        the persistent embeddings.position_ids buffer is dropped)
    mlp.layers.* -> mlp.layers.*;  blip.vision_proj / blip.text_proj: unused by the score, dropped.
The ViT's LayerNorms use eps 1e-6 (BLIP's vit.py), BERT's 1e-12. Head counts (16 vision, 12 text)
are not in the state dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffloop.rewards.aesthetic import AestheticMLP
from diffloop.rewards.model_loading import (
    ModelReward,
    load_pretrained,
    load_state_dict,
    resolve_file,
)
from diffloop.rewards.preprocess import clip_transform

DEFAULT_CHECKPOINT = "THUDM/ImageReward/ImageReward.pt"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35

_VISION = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DROPPED = ("blip.vision_proj.", "blip.text_proj.")


def imagereward_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt state dict -> :class:`ImageRewardModel` state dict (module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key == f"{_TEXT}embeddings.position_ids":
            continue
        if key.startswith("mlp."):
            out[key] = value
        elif key.startswith(_TEXT):
            out["text_encoder." + key.removeprefix(_TEXT)] = value
        elif key.startswith(_VISION):
            rest = key.removeprefix(_VISION)
            if rest in _VISION_TOP:
                out["vision_model." + _VISION_TOP[rest]] = value
            elif (m := _BLOCK.match(rest)) and m.group(2) in _VISION_BLOCK:
                layer, module, param = m.groups()
                out[f"vision_model.encoder.layers.{layer}.{_VISION_BLOCK[module]}.{param}"] = value
            else:
                raise ValueError(f"ImageReward key {key!r} has no transformers BLIP counterpart")
        else:
            raise ValueError(f"ImageReward key {key!r} has no transformers BLIP counterpart")
    return out


def _num_layers(state: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return 1 + max(int(m.group(1)) for k in state if (m := regex.match(k)))


def imagereward_configs(
    state: dict[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 12
) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) with the sizes of an ImageReward.pt state dict."""
    from transformers import BlipTextConfig, BlipVisionConfig

    patch = state[f"{_VISION}patch_embed.proj.weight"]  # (width, 3, p, p)
    grid = math.isqrt(state[f"{_VISION}pos_embed"].shape[1] - 1)
    vision = BlipVisionConfig(
        hidden_size=patch.shape[0],
        intermediate_size=state[f"{_VISION}blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_num_layers(state, rf"^{re.escape(_VISION)}blocks\.(\d+)\."),
        num_attention_heads=vision_heads,
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        layer_norm_eps=1e-6,  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
    )
    words = state[f"{_TEXT}embeddings.word_embeddings.weight"]
    layer0 = f"{_TEXT}encoder.layer.0."
    text = BlipTextConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        encoder_hidden_size=state[f"{layer0}crossattention.self.key.weight"].shape[1],
        intermediate_size=state[f"{layer0}intermediate.dense.weight"].shape[0],
        num_hidden_layers=_num_layers(state, rf"^{re.escape(_TEXT)}encoder\.layer\.(\d+)\."),
        num_attention_heads=text_heads,
        max_position_embeddings=state[f"{_TEXT}embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=1e-12,
        is_decoder=True,  # transformers builds the cross-attention layers only for decoders
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head; ``forward`` -> (N,) normalised reward."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        reward = self.mlp(text[:, 0].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def load_imagereward(
    checkpoint: str, vision_heads: int = 16, text_heads: int = 12, reward: str = "imagereward"
) -> ImageRewardModel:
    """ImageRewardModel with the checkpoint's weights, strictly loaded."""
    state = load_state_dict(resolve_file(checkpoint, reward=reward, kwarg="checkpoint"))
    model = ImageRewardModel(*imagereward_configs(state, vision_heads, text_heads))
    model.load_state_dict(imagereward_to_transformers(state))  # strict: every weight accounted
    return model


class ImageRewardReward(ModelReward):
    """ImageReward v1.0 score of (image, prompt); see the module docstring.

    Args:
        checkpoint: ImageReward.pt, a local path or 'owner/repo/filename' on the hub.
        tokenizer:  hub id or directory of BERT's uncased tokenizer.
        vision_heads, text_heads: attention heads (ViT-L: 16, BERT-base: 12).
        dtype, batch_size: see ModelReward (the MLP head stays float32).
    """

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        tokenizer: str = DEFAULT_TOKENIZER,
        vision_heads: int = 16,
        text_heads: int = 12,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
    ) -> None:
        super().__init__(dtype=dtype, batch_size=batch_size)
        from transformers import AutoTokenizer

        self.tokenizer = load_pretrained(
            AutoTokenizer, tokenizer, reward=self.name, kwarg="tokenizer", what="tokenizer"
        )
        self.model = load_imagereward(checkpoint, vision_heads, text_heads, reward=self.name)
        self.transform = clip_transform(self.model.vision_model.config.image_size)
        self._set_modules(
            self.model.vision_model, self.model.text_encoder, float32=[self.model.mlp]
        )

    def score_batch(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        return self.model(
            self.transform(images).to(self.dtype), tokens["input_ids"], tokens["attention_mask"]
        )
