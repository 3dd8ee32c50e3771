"""HPS v2 / v2.1 (Human Preference Score) without open_clip: its checkpoint converted to a
transformers ``CLIPModel``.

HPS v2 (tgxs002/HPSv2, hpsv2/img_score.py) is open_clip's ViT-H-14 fine-tuned on human
preferences; its score is the cosine of the normalised open_clip image and text features:

    hps(x, c) = <f_img(T(x)), f_txt(c)> / (|f_img| |f_txt|)          (about 0.2-0.35)

T = open_clip's eval transform (bicubic resize of the short side to 224, center crop, CLIP mean
/ std), run on the images' device; c is tokenized with CLIP's BPE (laion/CLIP-ViT-H-14-laion2B-
s32B-b79K's tokenizer is open_clip's), 77 tokens.

open_clip -> transformers (:func:`openclip_to_transformers`), per transformer block
``{visual.,}transformer.resblocks.i`` -> ``{vision,text}_model.encoder.layers.i``:
    ln_1 -> layer_norm1, ln_2 -> layer_norm2, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2,
    attn.in_proj_{weight,bias} (3D, D) -> self_attn.{q,k,v}_proj (split in that order),
    attn.out_proj -> self_attn.out_proj;
and visual.conv1 -> vision_model.embeddings.patch_embedding, visual.class_embedding /
positional_embedding -> vision_model.embeddings.class_embedding / position_embedding.weight,
visual.ln_pre / ln_post -> vision_model.pre_layrnorm / post_layernorm, token_embedding /
positional_embedding -> text_model.embeddings.token_embedding / position_embedding.weight,
ln_final -> text_model.final_layer_norm, visual.proj / text_projection (D, E) ->
visual_projection / text_projection weight (E, D) (transposed: open_clip computes x @ proj),
logit_scale -> logit_scale. Head counts are not in a state dict: ViT-H-14 has 16 and 16.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from diffloop.rewards.clip import ClipSimilarityReward
from diffloop.rewards.model_loading import (
    ModelReward,
    load_pretrained,
    load_state_dict,
    resolve_file,
)
from diffloop.rewards.preprocess import clip_transform

DEFAULT_CHECKPOINT = "xswu/HPSv2/HPS_v2.1_compressed.pt"  # v2.0: xswu/HPSv2/HPS_v2_compressed.pt
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def _num_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def openclip_config(
    state: dict[str, torch.Tensor],
    vision_heads: int = 16,
    text_heads: int = 16,
    eos_token_id: int = 49407,
    bos_token_id: int = 49406,
    pad_token_id: int = 0,
    quick_gelu: bool = False,
) -> Any:
    """The transformers ``CLIPConfig`` of an open_clip ViT CLIP state dict (sizes read from it)."""
    from transformers import CLIPConfig

    conv = state["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    act = "quick_gelu" if quick_gelu else "gelu"  # OpenAI's own weights use QuickGELU
    vision = {
        "hidden_size": conv.shape[0],
        "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _num_blocks(state, "visual."),
        "num_attention_heads": vision_heads,
        "image_size": grid * conv.shape[-1],
        "patch_size": conv.shape[-1],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }
    text = {
        "vocab_size": state["token_embedding.weight"].shape[0],
        "hidden_size": state["token_embedding.weight"].shape[1],
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _num_blocks(state, ""),
        "num_attention_heads": text_heads,
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        # pool at the first EOT token (open_clip: argmax of the ids, the EOT having the top id)
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "pad_token_id": pad_token_id,  # open_clip pads with 0; causal attention never sees pads
    }
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1]
    )


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict -> transformers CLIPModel state dict (mapping in module doc).

    Raises ValueError on keys of open_clip variants this mapping does not cover (layer scale,
    attentional pooling, a text projection with bias, custom text towers).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("attn_mask", "visual.attn_mask"):  # non-persistent buffers in newer open_clip
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # "weight" or "bias"
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_RENAMES:
                raise ValueError(f"open_clip key {key!r} has no transformers CLIP counterpart")
            out[f"{prefix}{_BLOCK_RENAMES[module]}.{param}"] = value
        else:
            raise ValueError(f"open_clip key {key!r} has no transformers CLIP counterpart")
    return out


def load_openclip_as_transformers(
    checkpoint: str,
    vision_heads: int = 16,
    text_heads: int = 16,
    tokenizer: Any = None,
    reward: str = "hpsv2",
) -> Any:
    """A transformers CLIPModel holding an open_clip checkpoint's weights (strictly loaded);
    the special-token ids come from ``tokenizer`` when given (else CLIP's)."""
    from transformers import CLIPModel

    state = load_state_dict(resolve_file(checkpoint, reward=reward, kwarg="checkpoint"))
    ids = {}
    if tokenizer is not None:
        ids = {
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    config = openclip_config(state, vision_heads, text_heads, **ids)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(openclip_to_transformers(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers, not weights
    if missing or unexpected:
        raise ValueError(
            f"reward {reward!r}: checkpoint {checkpoint!r} does not fill a CLIPModel: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}"
        )
    return model


class HpsV2Reward(ClipSimilarityReward):
    """HPS v2 / v2.1 score = cos(image, prompt) of the converted checkpoint; module docstring.

    Args:
        checkpoint: the HPS .pt file (open_clip state dict, optionally under "state_dict"), a
                    local path or 'owner/repo/filename' on the hub (v2.1 by default).
        tokenizer:  hub id or directory of a CLIP tokenizer (open_clip's BPE).
        vision_heads, text_heads: attention heads (ViT-H-14: 16, 16).
        scale:      multiplies the cosine (1: HPS's own numbers).
        dtype, batch_size: see ModelReward.
    """

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str = DEFAULT_CHECKPOINT,
        tokenizer: str = DEFAULT_TOKENIZER,
        vision_heads: int = 16,
        text_heads: int = 16,
        scale: float = 1.0,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
    ) -> None:
        ModelReward.__init__(self, dtype=dtype, batch_size=batch_size)
        from transformers import AutoTokenizer

        tok = load_pretrained(
            AutoTokenizer, tokenizer, reward=self.name, kwarg="tokenizer", what="tokenizer"
        )
        model = load_openclip_as_transformers(
            checkpoint, vision_heads, text_heads, tok, reward=self.name
        )
        self._setup(model, tok, clip_transform(model.config.vision_config.image_size), scale)
