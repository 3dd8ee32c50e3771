"""Model rewards (aesthetic, clip_score, pickscore, hpsv2, imagereward, blip_vqa) on tiny
random-weight models built from configs, saved to temp dirs and loaded by path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffloop.rewards import build_reward, score
from diffloop.rewards.aesthetic import AestheticMLP, load_aesthetic_head
from diffloop.rewards.blip_vqa import BlipVqaReward
from diffloop.rewards.hps import openclip_to_transformers
from diffloop.rewards.imagereward import imagereward_to_transformers
from diffloop.rewards.model_loading import MissingWeightsError
from diffloop.rewards.phrases import split_noun_phrases
from diffloop.rewards.preprocess import ImageTransform, center_crop
from diffloop.testing.tiny_reward_models import (
    VOCAB,
    make_bert_tokenizer,
    make_imagereward_checkpoint,
    make_open_clip_checkpoint,
    make_tiny_blip_vqa,
    make_tiny_clip,
    save_aesthetic_head,
)
from diffloop.testing.tokenizer import make_tiny_tokenizer

DATA = Path(__file__).resolve().parents[1] / "src" / "diffloop" / "data" / "t2i-compbench"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = [
    "a green bench and a red car",
    "a green bench and a red car",
    "a cat",
    "a dog on a table",
    "a round cake with a white cup",
]
MODEL_REWARDS = ["aesthetic", "clip_score", "pickscore", "hpsv2", "imagereward", "blip_vqa"]


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1], low-frequency content (like generated images), uint8-exact."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(height, width), mode="bilinear")
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in u8]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_models")
    clip_tok = root / "clip_tokenizer"
    make_tiny_tokenizer().save_pretrained(clip_tok)
    bert = root / "bert"
    make_bert_tokenizer(bert).save_pretrained(bert)
    hps_ckpt, hps_ref = make_open_clip_checkpoint(root / "HPS_v2.1_compressed.pt")
    ir_ckpt, ir_ref = make_imagereward_checkpoint(root / "ImageReward.pt")
    return {
        "clip": make_tiny_clip(root / "clip"),
        "clip768": make_tiny_clip(root / "clip768", projection_dim=768, seed=1),
        "blip": make_tiny_blip_vqa(root / "blip"),
        "head": save_aesthetic_head(root / "sac+logos+ava1-l14-linearMSE.pth"),
        "head_st": save_aesthetic_head(root / "head.safetensors"),
        "clip_tokenizer": clip_tok,
        "bert": bert,
        "hps": hps_ckpt,
        "imagereward": ir_ckpt,
        "_hps_ref": hps_ref,  # type: ignore[dict-item]
        "_ir_ref": ir_ref,  # type: ignore[dict-item]
    }


def reward_kwargs(name: str, paths: dict[str, Path]) -> dict:
    """Registry kwargs that point each reward at its tiny model (as a YAML config would)."""
    return {
        "aesthetic": {"clip_model": str(paths["clip768"]), "head_path": str(paths["head"])},
        "clip_score": {"model": str(paths["clip"])},
        "pickscore": {"model": str(paths["clip"]), "processor": str(paths["clip"])},
        "hpsv2": {
            "checkpoint": str(paths["hps"]),
            "tokenizer": str(paths["clip_tokenizer"]),
            "vision_heads": 4,
            "text_heads": 4,
        },
        "imagereward": {
            "checkpoint": str(paths["imagereward"]),
            "tokenizer": str(paths["bert"]),
            "vision_heads": 4,
            "text_heads": 4,
        },
        "blip_vqa": {"model": str(paths["blip"])},
    }[name]


@pytest.fixture(scope="module")
def rewards(paths) -> dict:
    """Each model reward built through the registry, batch_size=2 so that batches are chunked."""
    return {n: build_reward(n, batch_size=2, **reward_kwargs(n, paths)) for n in MODEL_REWARDS}


# ----------------------------------------------------------------------------- preprocessing


def test_resized_shape_and_center_crop_hand_computed():
    t = ImageTransform("shortest_edge", 24, (24, 24))
    assert t.resized_shape(40, 56) == (24, 33)  # long side floor(24 * 56 / 40) = floor(33.6)
    assert t.resized_shape(56, 40) == (33, 24)
    assert ImageTransform("exact", (20, 30), None).resized_shape(7, 9) == (20, 30)
    x = torch.arange(5 * 8, dtype=torch.float32).view(1, 1, 5, 8)
    # top = (5 - 2) // 2 = 1, left = (8 - 3) // 2 = 2
    assert center_crop(x, (2, 3)).flatten().tolist() == [10, 11, 12, 18, 19, 20]


def test_processor_config_old_and_new_formats():
    old = {"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3}
    clip = ImageTransform.from_processor_config(old, "shortest_edge")
    assert (clip.resize_mode, clip.size, clip.crop, clip.resample) == (
        "shortest_edge",
        224,
        (224, 224),
        "bicubic",
    )
    blip = ImageTransform.from_processor_config({"size": 384, "resample": 3}, "exact")
    assert (blip.resize_mode, blip.size, blip.crop) == ("exact", (384, 384), None)
    new = {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 28},
           "do_center_crop": True, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}  # fmt: skip
    t = ImageTransform.from_processor_config(new, "exact")
    assert (t.size, t.crop, t.mean, t.std) == (32, (30, 28), (0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("height,width", [(32, 32), (40, 56), (300, 257)])
def test_clip_transform_matches_clip_image_processor(height, width):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()  # openai CLIP: short side 224, crop 224, bicubic
    images = smooth_images(2, height, width)
    ours = ImageTransform.from_processor_config(processor.to_dict(), "shortest_edge")(images)
    theirs = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    diff = (ours - theirs).abs()
    # PIL rounds to uint8 after each separable pass; 1/255 / std ~ 0.015 in normalised units
    assert diff.mean() < 0.006 and diff.max() < 0.06


@pytest.mark.parametrize("height,width", [(64, 64), (512, 384)])
def test_blip_transform_matches_blip_image_processor(height, width):
    from transformers import BlipImageProcessorPil

    processor = BlipImageProcessorPil()  # 384 x 384, no crop, bicubic
    images = smooth_images(2, height, width)
    ours = ImageTransform.from_processor_config(processor.to_dict(), "exact")(images)
    theirs = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 384, 384)
    diff = (ours - theirs).abs()
    assert diff.mean() < 0.006 and diff.max() < 0.06


# ----------------------------------------------------------------------------- phrase splitting


@pytest.mark.parametrize(
    "prompt,phrases",
    [
        ("a green bench and a red car", ["a green bench", "a red car"]),
        ("an oblong cucumber and a teardrop plum", ["an oblong cucumber", "a teardrop plum"]),
        ("rubber sole shoes and fluffy clouds", ["rubber sole shoes", "fluffy clouds"]),
        ("a metallic door knob and a fabric pants", ["a metallic door knob", "a fabric pants"]),
        ("A black and white cat on a red mat.", ["A black and white cat", "a red mat"]),
        ("A brown kitchen counter with a big, white bowl on it.",
         ["A brown kitchen counter", "a big white bowl"]),
        ("A cat sitting next to a green bicycle on a white lawn.",
         ["A cat", "a green bicycle", "a white lawn"]),
        ("A bathroom has gold wall and brown counters.", ["A bathroom", "gold wall",
                                                          "brown counters"]),
        ("The glass figurine and metallic clock decorate the wooden mantel.",
         ["The glass figurine", "metallic clock", "the wooden mantel"]),
        ("a round bagel and a square piece of toast", ["a round bagel", "a square piece", "toast"]),
    ],
)  # fmt: skip
def test_split_noun_phrases_examples(prompt, phrases):
    assert split_noun_phrases(prompt) == phrases


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['\-][a-z0-9]+)*", text.lower())


@pytest.mark.parametrize("category", ["color", "shape", "texture"])
def test_split_noun_phrases_on_t2i_compbench_lists(category):
    pair = re.compile(r"((?:a|an) [a-z' -]+?) and ((?:a|an) [a-z' -]+)")
    inner = {"a", "an", "of", "with", "on", "in", "and"}  # halves with these are not one phrase
    for split in ("val", "train"):
        prompts = (DATA / f"{category}_{split}.txt").read_text(encoding="utf-8").splitlines()
        prompts = [p.strip() for p in prompts if p.strip()]
        counts = [len(split_noun_phrases(p)) for p in prompts]
        assert min(counts) >= 2, "every binding prompt names at least two objects"
        assert sum(c == 2 for c in counts) / len(prompts) >= 0.7  # measured 0.73-0.86
        for prompt in prompts:
            phrases = split_noun_phrases(prompt)
            # phrases are disjoint, in-order runs of the prompt's words
            flat = [w for p in phrases for w in _words(p)]
            words, i = _words(prompt), 0
            for w in flat:
                i = words.index(w, i) + 1
            m = pair.fullmatch(prompt)
            if m and not any(w in inner for g in m.groups() for w in g.split()[1:]):
                assert phrases == list(m.groups()), prompt


# ----------------------------------------------------------------------------- all model rewards


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_shape_finiteness_and_batch_invariance(name, rewards):
    reward = rewards[name]
    images = smooth_images(5, 32, 40, seed=1)
    metadata = [{} for _ in PROMPTS]
    batched = reward(images, PROMPTS, metadata)  # batch_size=2: chunks of 2, 2, 1
    assert batched.shape == (5,) and batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1], [{}]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=0, atol=2e-5)
    # the scores depend on the image (different images, same prompt)
    assert not torch.allclose(batched[0], batched[1], atol=1e-7)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_registry_score_policy(name, rewards):
    out = score(rewards[name], smooth_images(3, 24, 24), PROMPTS[:3], [{}] * 3)
    assert out.scores.shape == (3,) and out.num_invalid == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_follows_images_device_frozen_eval(name, device, rewards):
    reward = rewards[name]
    images = smooth_images(2, 32, 32).to(device)
    for module in reward._modules:
        module.train()  # the reward must score in eval mode whatever the caller did
    scores = reward(images, PROMPTS[:2], [{}, {}])
    assert scores.device.type == device and reward.device.type == device
    for module in reward._modules:
        assert not module.training
        assert all(p.device.type == device and not p.requires_grad for p in module.parameters())
    cpu_scores = reward(images.cpu(), PROMPTS[:2], [{}, {}])  # moves back
    assert reward.device.type == "cpu"
    torch.testing.assert_close(scores.cpu(), cpu_scores, rtol=0, atol=1e-4)


def test_bfloat16_weights(paths):
    reward = build_reward("clip_score", dtype="bfloat16", **reward_kwargs("clip_score", paths))
    reference = build_reward("clip_score", **reward_kwargs("clip_score", paths))
    assert reward.model.dtype == torch.bfloat16
    images = smooth_images(3, 32, 32)
    out = reward(images, PROMPTS[:3], [{}] * 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(images, PROMPTS[:3], [{}] * 3), rtol=0, atol=0.03)


# ----------------------------------------------------------------------------- missing weights


def test_missing_local_paths_name_what_was_looked_for(paths, tmp_path):
    missing = str(tmp_path / "no_such_model")
    cases = [
        ("clip_score", {"model": missing}, "model="),
        ("blip_vqa", {"model": missing}, "model="),
        ("aesthetic", {"clip_model": str(paths["clip768"]), "head_path": missing}, "head_path="),
        ("hpsv2", dict(reward_kwargs("hpsv2", paths), checkpoint=missing), "checkpoint="),
        (
            "imagereward",
            dict(reward_kwargs("imagereward", paths), checkpoint=missing),
            "checkpoint=",
        ),
    ]
    for name, kwargs, kwarg in cases:
        with pytest.raises(MissingWeightsError) as info:
            build_reward(name, **kwargs)
        assert missing in str(info.value) and kwarg in str(info.value) and name in str(info.value)


def test_uncached_hub_weights_say_how_to_get_them(paths):
    # HF_HUB_OFFLINE=1 (conftest): the hub cache is empty, so the default weights are missing
    with pytest.raises(MissingWeightsError, match=r"hf download trl-lib/ddpo-aesthetic-predictor"):
        build_reward("aesthetic", clip_model=str(paths["clip768"]))
    with pytest.raises(MissingWeightsError, match=r"model=/path/to/it"):
        build_reward("clip_score", model="openai/clip-vit-large-patch14")


# ----------------------------------------------------------------------------- aesthetic

PUBLISHED_AESTHETIC_HEAD = [  # sac+logos+ava1-l14-linearMSE.pth
    ("layers.0.weight", (1024, 768)), ("layers.0.bias", (1024,)),
    ("layers.2.weight", (128, 1024)), ("layers.2.bias", (128,)),
    ("layers.4.weight", (64, 128)), ("layers.4.bias", (64,)),
    ("layers.6.weight", (16, 64)), ("layers.6.bias", (16,)),
    ("layers.7.weight", (1, 16)), ("layers.7.bias", (1,)),
]  # fmt: skip


def test_aesthetic_head_matches_published_state_dict():
    state = AestheticMLP().state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == PUBLISHED_AESTHETIC_HEAD


def test_aesthetic_head_is_affine_and_loads_both_formats(paths):
    head = load_aesthetic_head(str(paths["head"])).eval()
    other = load_aesthetic_head(str(paths["head_st"]))
    for a, b in zip(head.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)  # same seed, .pth and .safetensors
    x, y = torch.randn(2, 768).double(), torch.randn(2, 768).double()
    head = head.double()
    # no nonlinearity between the layers: h(0.3 x + 0.7 y) = 0.3 h(x) + 0.7 h(y)
    torch.testing.assert_close(head(0.3 * x + 0.7 * y), 0.3 * head(x) + 0.7 * head(y))


def test_aesthetic_equals_ddpo_pipeline(paths, rewards):
    """DDPO: CLIPProcessor (PIL) -> get_image_features -> L2-normalise -> MLP."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    clip = CLIPModel.from_pretrained(paths["clip768"]).eval()
    processor = CLIPImageProcessorPil.from_pretrained(paths["clip768"])
    head = load_aesthetic_head(str(paths["head"])).eval()
    images = smooth_images(3, 48, 40)
    with torch.no_grad():
        pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        embed = clip.get_image_features(pixel_values=pixels)
        embed = getattr(embed, "pooler_output", embed)  # transformers 5 returns an output object
        expected = head(embed / embed.norm(dim=-1, keepdim=True)).squeeze(1)
    got = rewards["aesthetic"](images, ["ignored"] * 3, [{}] * 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)  # PIL's uint8 rounding


def test_aesthetic_rejects_a_clip_of_the_wrong_width(paths):
    with pytest.raises(ValueError, match="expects 768"):
        build_reward("aesthetic", clip_model=str(paths["clip"]), head_path=str(paths["head"]))


# ----------------------------------------------------------------------------- CLIP, PickScore


def test_clip_score_is_the_cosine_of_transformers_clip(paths, rewards):
    from transformers import CLIPModel

    reward = rewards["clip_score"]
    model = CLIPModel.from_pretrained(paths["clip"]).eval()
    images = smooth_images(3, 32, 40)
    tokens = reward.tokenizer(PROMPTS[2:], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=reward.transform(images), **tokens)
    # logits_per_image = exp(logit_scale) * cos; the matching pairs are on the diagonal
    expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(reward(images, PROMPTS[2:], [{}] * 3), expected, atol=1e-5, rtol=0)


def test_pickscore_is_logit_scale_times_cosine(rewards):
    images = smooth_images(4, 32, 32)
    cos = rewards["clip_score"](images, PROMPTS[:4], [{}] * 4)
    pick = rewards["pickscore"](images, PROMPTS[:4], [{}] * 4)
    scale = rewards["pickscore"].model.logit_scale.exp().item()  # exp(2.6592) = 14.29 at init
    assert scale == pytest.approx(14.2857, abs=1e-3)
    torch.testing.assert_close(pick, scale * cos, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- HPS v2

OPEN_CLIP_KEYS = {  # as open_clip's CLIP (transformer.py / model.py) writes them
    "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
    "ln_final.weight", "ln_final.bias", "visual.class_embedding", "visual.positional_embedding",
    "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias",
    "visual.ln_post.weight", "visual.ln_post.bias",
} | {
    f"{tower}transformer.resblocks.{i}.{name}"
    for tower in ("", "visual.")
    for i in range(2)
    for name in (
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    )
}  # fmt: skip


def test_open_clip_converter_covers_every_key(paths):
    from transformers import CLIPModel

    from diffloop.rewards.hps import openclip_config

    state = torch.load(paths["hps"], weights_only=True)["state_dict"]
    assert set(state) == OPEN_CLIP_KEYS
    converted = openclip_to_transformers(state)
    model = CLIPModel(openclip_config(state, 4, 4, eos_token_id=913))
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    assert set(converted) == expected
    for key, value in converted.items():
        assert value.shape == model.state_dict()[key].shape, key
    with pytest.raises(ValueError, match="visual.transformer.resblocks.0.ls_1.gamma"):
        openclip_to_transformers(
            {**state, "visual.transformer.resblocks.0.ls_1.gamma": state["logit_scale"]}
        )


def test_hpsv2_equals_open_clip_forward(paths, rewards):
    """HPS: diag(normalise(f_img) @ normalise(f_txt).T) of the open_clip model itself."""
    reward, reference = rewards["hpsv2"], paths["_hps_ref"]
    images = smooth_images(4, 40, 32)
    ids = reward.tokenizer(PROMPTS[:4], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.no_grad():
        expected = (
            reference.encode_image(reward.transform(images)) * reference.encode_text(ids)
        ).sum(-1)
    torch.testing.assert_close(reward(images, PROMPTS[:4], [{}] * 4), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- ImageReward


def test_imagereward_checkpoint_keys_map_strictly(paths):
    state = torch.load(paths["imagereward"], weights_only=True)
    for key in [  # BLIP / ImageReward names (vit.py, med.py, ImageReward.py)
        "blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
        "blip.visual_encoder.patch_embed.proj.weight",
                "blip.visual_encoder.blocks.1.attn.qkv.weight",
        "blip.visual_encoder.blocks.1.mlp.fc2.bias", "blip.visual_encoder.norm.weight",
        "blip.text_encoder.embeddings.word_embeddings.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "blip.text_encoder.encoder.layer.1.output.LayerNorm.bias", "mlp.layers.7.weight",
    ]:  # fmt: skip
        assert key in state
    converted = imagereward_to_transformers(state)
    assert not any("proj" in k and k.startswith("blip") for k in converted)
    with pytest.raises(ValueError, match="blip.visual_encoder.blocks.0.ls1"):
        imagereward_to_transformers(
            {**state, "blip.visual_encoder.blocks.0.ls1.weight": state["mlp.layers.7.bias"]}
        )


def test_imagereward_equals_blip_reference(paths, rewards):
    """ImageReward.score: (MLP(BERT(prompt | ViT(image))[:, 0]) - mean) / std."""
    reward, reference = rewards["imagereward"], paths["_ir_ref"]
    images = smooth_images(3, 32, 32)
    tokens = reward.tokenizer(PROMPTS[:3], padding="max_length", max_length=35, truncation=True,
                              return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        expected = reference(
            reward.transform(images), tokens["input_ids"], tokens["attention_mask"]
        )
    torch.testing.assert_close(reward(images, PROMPTS[:3], [{}] * 3), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- BLIP-VQA


def _decoder_prob(model, pixel_values, question_ids, answer_id, bos) -> float:
    """P(answer | image, question) as BlipForQuestionAnswering's own training loss sees it:
    labels [bos, answer] -> loss = -log P(answer | bos) (one predicted token)."""
    labels = torch.tensor([[bos, answer_id]])
    with torch.no_grad():
        loss = model(input_ids=question_ids, pixel_values=pixel_values, labels=labels).loss
    return float(torch.exp(-loss))


def test_blip_vqa_yes_probability_matches_model_loss(paths, rewards):
    reward: BlipVqaReward = rewards["blip_vqa"]
    assert reward.model.config.text_config.label_smoothing == 0.0
    image = smooth_images(1, 24, 24)
    pixels = reward.transform(image)
    question = reward.tokenizer("a red car?", return_tensors="pt")["input_ids"]
    bos = VOCAB.index("[DEC]")
    p_yes = _decoder_prob(reward.model, pixels, question, VOCAB.index("yes"), bos)
    p_no = _decoder_prob(reward.model, pixels, question, VOCAB.index("no"), bos)
    got = reward(image, ["ignored"], [{"phrases": ["a red car"]}])
    assert got.item() == pytest.approx(p_yes / (p_yes + p_no), abs=1e-5)
    raw = BlipVqaReward(str(paths["blip"]), answer_prob="yes")
    assert raw(image, ["ignored"], [{"phrases": ["a red car"]}]).item() == pytest.approx(
        p_yes, abs=1e-6
    )


def test_blip_vqa_is_the_product_over_phrases(rewards):
    reward = rewards["blip_vqa"]
    image = smooth_images(1, 32, 32)
    whole = reward(image, ["a green bench and a red car"], [{}])
    parts = [reward(image, ["x"], [{"phrases": [p]}]) for p in ("a green bench", "a red car")]
    torch.testing.assert_close(whole, parts[0] * parts[1], atol=1e-6, rtol=0)
    assert 0 < whole.item() < min(p.item() for p in parts) <= 1
    # metadata["phrases"] replaces the splitter
    given = reward(image, ["a green bench and a red car"], [{"phrases": ["a red car"]}])
    torch.testing.assert_close(given, parts[1], atol=1e-6, rtol=0)


def test_blip_vqa_questions_of_different_lengths_are_not_padded(rewards):
    """Batch-invariance with question lengths 3..9 tokens in one batch (a padded question would
    cross-attend to its padding in transformers 5's BLIP)."""
    reward = rewards["blip_vqa"]
    images = smooth_images(3, 24, 24).repeat(2, 1, 1, 1)
    prompts = ["a cat", "a small white cup on a wooden table", "a dog"] * 2
    together = reward(images, prompts, [{}] * 6)
    alone = torch.cat([reward(images[i : i + 1], prompts[i : i + 1], [{}]) for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    assert np.allclose(together[:3].numpy(), together[3:].numpy(), atol=1e-6)
