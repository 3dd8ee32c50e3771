"""Tiny random-weight reward models built from configs and saved to disk (nothing downloaded).

Each builder writes a directory that the rewards load by path exactly as they load the real
checkpoints: ``save_pretrained`` model + tokenizer + ``preprocessor_config.json``.

    CLIP:  vision 24 px, patch 8 (3x3 patches), width 32, 2 layers; text width 32, 2 layers;
           the committed CLIP BPE tokenizer (``diffloop.testing.tokenizer``: 914 tokens, EOT =
           913, the highest id, as in the real vocabulary); processor: short side -> 24, crop 24.
    BLIP:  BlipForQuestionAnswering, vision 24 px / patch 8 / width 32, text width 32, 2 layers,
           a BERT WordPiece tokenizer over VOCAB ([DEC] = bos, the last id, as in BLIP);
           processor: resize to 24x24.
    open_clip: a re-implementation of open_clip's CLIP (ViT image tower + causal text tower), with
           open_clip's module names so its ``state_dict()`` has open_clip's key names; used to test
           the open_clip -> transformers converter.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
)

from diffloop.testing.tokenizer import make_tiny_tokenizer

IMAGE_SIZE = 24
PATCH = 8
WIDTH = 32

# Every transformer tower (CLIP's and BLIP's text and vision ones): width 32, 2 layers of 4 heads.
TOWER = {
    "hidden_size": WIDTH,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
VISION = {**TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH}

# BERT vocabulary of the tiny BLIP: specials, the VQA answers, and the words of the test prompts.
VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "?", ",", ".", "a", "an", "the",
    "and", "with", "on", "in", "of", "green", "red", "blue", "brown", "white", "black", "yellow",
    "bench", "car", "cat", "dog", "bowl", "cake", "horse", "vase", "book", "chair", "table",
    "wooden", "metallic", "glass", "round", "square", "small", "big", "photo", "cup", "[DEC]",
]  # fmt: skip


def tiny_clip_config(tokenizer: CLIPTokenizer, projection_dim: int = 16) -> CLIPConfig:
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = {**TOWER, "vocab_size": len(tokenizer), "max_position_embeddings": 77, **ids}
    return CLIPConfig(text_config=text, vision_config=VISION, projection_dim=projection_dim)


def clip_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def make_tiny_clip(path: str | Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A CLIPModel directory with its tokenizer and image-processor config."""
    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config(tokenizer, projection_dim))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    clip_image_processor().save_pretrained(path)
    return path


def make_bert_tokenizer(path: Path) -> BertTokenizer:
    vocab_file = path / "vocab.txt"
    path.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(vocab_file), bos_token="[DEC]")


def make_tiny_blip_vqa(path: str | Path, seed: int = 0) -> Path:
    """A BlipForQuestionAnswering directory with a BERT tokenizer and image-processor config."""
    path = Path(path)
    tokenizer = make_bert_tokenizer(path / "_vocab")
    text = {
        **TOWER,
        "vocab_size": len(VOCAB),
        "encoder_hidden_size": WIDTH,
        "max_position_embeddings": 64,
        "bos_token_id": VOCAB.index("[DEC]"),
        "pad_token_id": VOCAB.index("[PAD]"),
        "sep_token_id": VOCAB.index("[SEP]"),
        "initializer_range": 0.3,  # BERT's 0.02 leaves a tiny model nearly blind to the image
    }
    vision = {**VISION, "initializer_range": 0.3}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def save_aesthetic_head(path: str | Path, input_size: int = 768, seed: int = 0) -> Path:
    """A random AestheticMLP state dict saved as .pth (torch.save) or .safetensors."""
    from diffloop.rewards.aesthetic import AestheticMLP

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticMLP(input_size)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(head.state_dict(), str(path))
    else:
        torch.save(head.state_dict(), path)
    return path


# --- open_clip's CLIP, re-implemented with its module names (mlfoundations/open_clip,
# src/open_clip/transformer.py and model.py: VisionTransformer, TextTransformer / CLIP with
# ResidualAttentionBlock = ln_1, nn.MultiheadAttention attn, ln_2, mlp.c_fc / gelu / c_proj) ---


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)  # (L, N, D): nn.MultiheadAttention is sequence-first, as open_clip uses it
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.transpose(0, 1)  # NLD -> LND
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x.transpose(0, 1)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, dim: int):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (N, grid^2, width)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipCLIP(nn.Module):
    """open_clip.model.CLIP (non-custom text tower): ``visual.*`` plus top-level text modules."""

    def __init__(self, vocab: int, context: int = 77, width: int = WIDTH, dim: int = 16) -> None:
        super().__init__()
        self.visual = VisionTransformer(IMAGE_SIZE, PATCH, width, 2, 4, dim)
        self.transformer = Transformer(width, 2, 4)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        for p in self.parameters():  # LayerNorms away from identity so the converter is tested
            p.data.add_(0.05 * torch.randn_like(p))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        # the EOT token has the highest id, so argmax finds it (as open_clip does)
        return F.normalize(
            x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection, dim=-1
        )


def make_open_clip_checkpoint(path: str | Path, seed: int = 0) -> tuple[Path, OpenClipCLIP]:
    """A tiny open_clip CLIP saved as HPS v2 does ({"state_dict": ...}, torch.save)."""
    path = Path(path)
    vocab = len(make_tiny_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OpenClipCLIP(vocab).eval()
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


# --- BLIP's ViT (salesforce/BLIP models/vit.py: patch_embed.proj, cls_token, pos_embed,
# blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; LayerNorm eps 1e-6) and an
# ImageReward.pt-format checkpoint (THUDM/ImageReward: blip.visual_encoder.*, blip.text_encoder.*,
# blip.vision_proj / text_proj, mlp.layers.*) ---


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _Mlp(width, width * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipViT(nn.Module):
    def __init__(self, image_size: int = IMAGE_SIZE, patch: int = PATCH, width: int = WIDTH):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList([_Block(width, 4) for _ in range(2)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def make_imagereward_checkpoint(path: str | Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """A tiny ImageReward.pt (plain state dict, BLIP/LAVIS key names) and a reference scorer.

    The reference is ``(image, input_ids, attention_mask) -> (N,)`` built from BlipViT and
    transformers' BlipTextModel (whose names are BLIP med.py's), following ImageReward.score.
    """
    from transformers import BlipTextConfig, BlipTextModel

    from diffloop.rewards.aesthetic import AestheticMLP
    from diffloop.rewards.imagereward import REWARD_MEAN, REWARD_STD

    path = Path(path)
    text_config = BlipTextConfig(
        vocab_size=len(VOCAB), hidden_size=WIDTH, encoder_hidden_size=WIDTH, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        layer_norm_eps=1e-12,
        bos_token_id=None, sep_token_id=None, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit, text, mlp = (
            BlipViT(),
            BlipTextModel(text_config, add_pooling_layer=False),
            AestheticMLP(WIDTH),
        )
        proj = nn.Linear(WIDTH, 8)
        for p in [*vit.parameters(), *mlp.parameters()]:  # LayerNorms away from identity
            p.data.add_(0.05 * torch.randn_like(p))
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    # med.py registers position_ids as a persistent buffer, so ImageReward.pt carries it
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1)
    state |= {f"blip.vision_proj.{k}": v for k, v in proj.state_dict().items()}
    state |= {f"blip.text_proj.{k}": v for k, v in proj.state_dict().items()}
    state |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, path)

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit, self.text, self.mlp = vit.eval(), text.eval(), mlp.eval()

        def forward(self, image, input_ids, attention_mask):
            embeds = self.vit(image)
            out = self.text(
                input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=embeds
            ).last_hidden_state
            return (self.mlp(out[:, 0]).squeeze(-1) - REWARD_MEAN) / REWARD_STD

    return path, Reference()
