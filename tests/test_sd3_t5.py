"""``model.sd3.max_sequence_length``: SD3's T5 length, against
StableDiffusion3Pipeline.encode_prompt on the tiny SD3 (``diffloop.testing.tiny_flow``, conftest
``tiny_sd3``)."""

from __future__ import annotations

import pytest
import torch

from diffloop.config import ConfigError, LoraConfig, ModelConfig, SD3Config, load_config
from diffloop.policies.sd3 import load_sd3_policy
from diffloop.testing.tiny_flow import T5_TOKENS

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a dog on a bench", "a red ball and a photo of an astronaut riding a horse"]
CLIP_TOKENS = 77


def policy_for(path, sd3: SD3Config | None = None):
    torch.manual_seed(0)
    model = ModelConfig(pretrained=str(path), sd3=sd3 or SD3Config())
    return load_sd3_policy(model, LoraConfig(enabled=False), device=CPU)


@pytest.mark.parametrize("length", [8, 24])  # shorter and longer than the tokenizer's 16
def test_t5_part_has_the_configured_length_and_equals_the_pipeline(tiny_sd3, length):
    from diffusers import StableDiffusion3Pipeline

    policy = policy_for(tiny_sd3, SD3Config(max_sequence_length=length))
    assert policy.max_sequence_length == length
    embeds, pooled = policy.encode_prompts_with_pooled(PROMPTS)
    assert embeds.shape[:2] == (len(PROMPTS), CLIP_TOKENS + length)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with torch.no_grad():  # as the policy encodes (attention kernels differ with autograd on)
        # each prompt alone, as the policy (a cached embedding never depends on its batch)
        alone = [pipe.encode_prompt([p], None, None, do_classifier_free_guidance=False,
                                    max_sequence_length=length) for p in PROMPTS]  # fmt: skip
    ref, ref_pooled = (torch.cat([a[i] for a in alone]) for i in (0, 2))
    torch.testing.assert_close(embeds, ref, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=0, rtol=0)
    # the conditioning a trajectory stores (and the negative branch) has the same length
    positive, negative, _ = policy.conditioning(PROMPTS[:1], "blurry")
    assert positive.shape[1] == negative.shape[1] == CLIP_TOKENS + length


def test_default_length_is_unchanged(tiny_sd3):
    """null: the pipeline's 256 capped at the T5 tokenizer's model_max_length (the tiny one's
    16)."""
    assert SD3Config().max_sequence_length is None
    assert policy_for(tiny_sd3).max_sequence_length == T5_TOKENS


def test_length_is_range_checked():
    with pytest.raises(ConfigError, match=r"model.sd3.max_sequence_length=513 must be"):
        load_config(None, ["model.sd3.max_sequence_length=513"])
    with pytest.raises(ConfigError, match=r"model.sd3.max_sequence_length=0 must be"):
        load_config(None, ["model.sd3.max_sequence_length=0"])
    assert (
        load_config(None, ["model.sd3.max_sequence_length=128"]).model.sd3.max_sequence_length
        == 128
    )


@pytest.mark.parametrize(
    "name", ["sd35_geneval_blip_vqa.yaml", "sd35_pickscore.yaml", "sd35_fast_cps.yaml"]
)
def test_shipped_sd35_configs_use_flow_grpos_t5_length(name):
    from diffloop.config import packaged_config

    assert load_config(packaged_config(name)).model.sd3.max_sequence_length == 128
