"""Frozen encoders in fp16 keep the weights transformers keeps in fp32 (T5's ``wo``), as
``from_pretrained(dtype=...)`` does, on a tiny random T5 (``diffloop.testing.tiny_flow``)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffloop.config import LoraConfig, ModelConfig
from diffloop.policies.sd3 import load_sd3_policy
from diffloop.testing.tiny_flow import SD3_CONFIGS, T5_TOKENS, make_t5_tokenizer, t5_config

CPU = torch.device("cpu")
PROMPTS = ["a cat on the moon", "two red dog", "a photo of an astronaut riding a horse"]
# fp16 T5 against the fp32 one on the same weights: fp16 rounding (2^-11 relative) through two
# layers of outputs of size ~3; measured 2.6e-3 (5e-3 with the enlarged wo outputs below).
FP16_ATOL = 2e-2


def tiny_t5(seed: int = 0):
    from transformers import T5EncoderModel

    tokenizer = make_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(t5_config(dict(SD3_CONFIGS["tiny"]["text_encoder_3"]), tokenizer))
    return model.eval(), tokenizer


def token_ids(tokenizer) -> torch.Tensor:
    return tokenizer(
        PROMPTS, padding="max_length", max_length=T5_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def fp16_policy(tiny_sd3):
    torch.manual_seed(0)
    return load_sd3_policy(
        ModelConfig(pretrained=str(tiny_sd3)), LoraConfig(), device=CPU, weight_dtype=torch.float16
    )


def test_fp16_freeze_keeps_t5_wo_in_fp32(fp16_policy, tiny_sd3):
    """The policy's T5 after its fp16 freeze: ``wo`` fp32, every other weight fp16, exactly as
    transformers loads it in fp16; its forward runs and equals that model's bit for bit, and the
    fp32 model's within FP16_ATOL."""
    from transformers import T5EncoderModel

    t5 = fp16_policy.text_encoder_3
    found = dtypes(t5)
    wo = [n for n in found if n.endswith("DenseReluDense.wo.weight")]
    assert len(wo) == 2  # the tiny T5's two blocks
    assert all(found[n] == torch.float32 for n in wo)
    assert {found[n] for n in found if n not in wo} == {torch.float16}
    reference = T5EncoderModel.from_pretrained(tiny_sd3 / "text_encoder_3", dtype=torch.float16)
    assert dtypes(reference) == found
    full = T5EncoderModel.from_pretrained(tiny_sd3 / "text_encoder_3").eval()
    ids = token_ids(fp16_policy.tokenizer_3)
    with torch.no_grad():
        ours, theirs, exact = t5(ids)[0], reference.eval()(ids)[0], full(ids)[0]
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(ours.float(), exact, atol=FP16_ATOL, rtol=0)
    # and the policy's own T5 conditioning runs on it
    assert torch.isfinite(fp16_policy._t5(PROMPTS).float()).all()


def test_fp16_freeze_keeps_large_wo_outputs_finite_and_right(fp16_policy):
    """Why: T5's wo output outgrows fp16's range (65504). With wo cast to fp16 T5 clamps it (the
    result is wrong by the output's own size); kept in fp32 the result matches fp32 within
    FP16_ATOL. wo x 1e4 and wi_1 x 100 make outputs ~3e6 with every weight inside fp16's range."""
    model, tokenizer = tiny_t5()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(
                1e4 if name.endswith("wo.weight") else 100 if name.endswith("wi_1.weight") else 1
            )
    assert max(p.abs().max() for p in model.parameters()) < torch.finfo(torch.float16).max
    ids = token_ids(tokenizer)
    with torch.no_grad():
        exact = model(ids)[0]
        frozen = fp16_policy._freeze(copy.deepcopy(model), torch.float16)
        ours = frozen(ids)[0].float()
        plain = copy.deepcopy(model).to(torch.float16)(ids)[0].float()
    assert (plain - exact).abs().max() > 1.0  # what a plain module.to(float16) gives
    torch.testing.assert_close(ours, exact, atol=FP16_ATOL, rtol=0)


def test_bf16_follows_transformers_rule(tiny_sd3):
    """bf16 has fp32's range: transformers keeps ``_keep_in_fp32_modules`` in fp32 only for fp16,
    ``_keep_in_fp32_modules_strict`` for fp16 and bf16; the freeze does the same."""
    from transformers import T5EncoderModel

    from diffloop.policies.diffusers_policy import cast_frozen, keep_in_fp32_patterns

    class StrictT5(T5EncoderModel):
        _keep_in_fp32_modules_strict = ("final_layer_norm",)

    model, _ = tiny_t5()
    assert keep_in_fp32_patterns(model, torch.bfloat16) == []
    assert keep_in_fp32_patterns(model, torch.float32) == []
    for dtype in (torch.float16, torch.bfloat16):
        ours = cast_frozen(copy.deepcopy(model), dtype, CPU)
        assert dtypes(ours) == dtypes(
            T5EncoderModel.from_pretrained(tiny_sd3 / "text_encoder_3", dtype=dtype)
        )
        strict = StrictT5.from_pretrained(tiny_sd3 / "text_encoder_3")
        found = dtypes(cast_frozen(strict, dtype, CPU))
        assert found == dtypes(StrictT5.from_pretrained(tiny_sd3 / "text_encoder_3", dtype=dtype))
        assert found["encoder.final_layer_norm.weight"] == torch.float32
    # fp32 everywhere when the weight dtype is fp32, whatever was loaded
    half = T5EncoderModel.from_pretrained(tiny_sd3 / "text_encoder_3", dtype=torch.float16)
    assert set(dtypes(cast_frozen(half, torch.float32, CPU)).values()) == {torch.float32}
