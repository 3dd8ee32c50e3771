"""The LAION improved aesthetic predictor, as DDPO uses it.

Adapted from kvablack/ddpo-pytorch, ddpo_pytorch/aesthetic_scorer.py (commit 1958463, MIT), itself
from christophschuhmann/improved-aesthetic-predictor, simple_inference.py. Changes: the CLIP
preprocessing runs in torch on the images' device (no CLIPProcessor / PIL round trip); the CLIP
model and the head file are parameters (hub id or local path); the head runs in float32 whatever
the CLIP dtype.

    e(x)         = visual_projection(CLIP-ViT-L/14 vision_model(T(x)).pooler_output)   (N, 768)
    aesthetic(x) = MLP(e(x) / |e(x)|_2)                                                 (N,)
    MLP          = Linear(768, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2)
                   Linear(128, 64) Dropout(0.1) Linear(64, 16) Linear(16, 1)

There is no nonlinearity between the layers (the published head, "linearMSE", was trained so):
the head is an affine map of the normalised embedding. The state-dict keys are those of the
published file sac+logos+ava1-l14-linearMSE.pth: layers.{0,2,4,6,7}.{weight,bias}. The prompt is
ignored. Scores are roughly 1-10 (the AVA rating scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffloop.rewards.clip import clip_image_embeds
from diffloop.rewards.model_loading import (
    ModelReward,
    load_pretrained,
    load_state_dict,
    resolve_file,
)
from diffloop.rewards.preprocess import ImageTransform

# A hub mirror of sac+logos+ava1-l14-linearMSE.pth (the one TRL's DDPO example downloads).
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


class AestheticMLP(nn.Module):
    """The predictor's head: (N, 768) normalised CLIP embedding -> (N, 1) score."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_aesthetic_head(spec: str, reward: str = "aesthetic") -> AestheticMLP:
    """The head from a .pth / .safetensors file path or a hub 'owner/repo/filename' spec."""
    state = load_state_dict(resolve_file(spec, reward=reward, kwarg="head_path"))
    weight = state.get("layers.0.weight")
    if weight is None:
        raise ValueError(
            f"reward {reward!r}: head_path={spec!r} is not an aesthetic-predictor head (no "
            f"'layers.0.weight'; keys: {sorted(state)[:8]})"
        )
    head = AestheticMLP(input_size=weight.shape[1])
    head.load_state_dict(state)  # strict: a wrong file fails here, not with silent garbage
    return head


class AestheticReward(ModelReward):
    """LAION aesthetic score of each image (the prompt is ignored); see the module docstring.

    Args:
        clip_model: hub id or directory of the CLIP model (a CLIPModel; its processor config is
                    read from the same place unless ``processor`` is given).
        head_path:  the MLP head: a .pth / .safetensors file, or 'owner/repo/filename' on the hub.
        processor:  where preprocessor_config.json lives (default: ``clip_model``).
        dtype:      CLIP weights' dtype on the device; the head stays float32.
        batch_size: images per CLIP forward pass.
    """

    name = "aesthetic"

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        head_path: str = DEFAULT_HEAD,
        processor: str | None = None,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
    ) -> None:
        super().__init__(dtype=dtype, batch_size=batch_size)
        from transformers import CLIPModel

        self.head = load_aesthetic_head(head_path, self.name)
        self.clip = load_pretrained(CLIPModel, clip_model, reward=self.name, kwarg="clip_model")
        self.transform = ImageTransform.from_pretrained(
            processor or clip_model, "shortest_edge", reward=self.name, kwarg="processor"
        )
        embed_dim = self.clip.config.projection_dim
        head_dim = self.head.layers[0].in_features
        if embed_dim != head_dim:
            raise ValueError(
                f"reward 'aesthetic': clip_model={clip_model!r} embeds images in {embed_dim} "
                f"dimensions but the head expects {head_dim} (the published head is for CLIP "
                "ViT-L/14: openai/clip-vit-large-patch14)"
            )
        self._set_modules(self.clip, float32=[self.head])

    def score_batch(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        embed = clip_image_embeds(self.clip, self.transform(images).to(self.dtype)).float()
        return self.head(F.normalize(embed, dim=-1)).squeeze(-1)
