"""The tiny Stable Diffusion pipeline of ``diffloop.testing.tiny`` (with the committed CLIP BPE
tokenizer): offline round trip, shapes, determinism, prediction types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffloop.testing.tiny import (
    IMAGE_SIZE,
    LATENT_SIZE,
    build_tiny_sd,
    make_tiny_sd,
    tiny_sd_dir,
)
from diffloop.testing.tokenizer import make_tiny_tokenizer

PROMPTS = [
    "a green bench and a red car",
    "The rectangular mirror was hung above the marble sink.",
    "naïve café, 3 dogs & 2½ cats! 😀 — CAPS and\ttabs",
]


def _generate(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    out = pipe(
        prompts,
        num_inference_steps=2,
        guidance_scale=3.0,
        eta=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


@pytest.fixture(scope="module")
def saved_eps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_dir(tmp_path_factory)


def test_round_trip_generates_same_images_offline(saved_eps: Path) -> None:
    loaded = StableDiffusionPipeline.from_pretrained(saved_eps)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.safety_checker is None
    sched = loaded.scheduler.config
    assert (sched.prediction_type, sched.steps_offset, sched.clip_sample) == ("epsilon", 1, False)
    assert sched.set_alpha_to_one is False
    assert loaded.unet.config.sample_size == LATENT_SIZE
    assert loaded.vae_scale_factor * LATENT_SIZE == IMAGE_SIZE

    images = _generate(loaded, PROMPTS[:2])
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.min() >= 0.0 and images.max() <= 1.0
    # the save lost nothing: weights are bit-identical to a fresh build with the same seed ...
    built = build_tiny_sd()
    for name in ("unet", "vae", "text_encoder"):
        saved, fresh = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert saved.keys() == fresh.keys()
        assert all(torch.equal(saved[k], fresh[k]) for k in saved), name
    # ... and so are the images, up to CPU kernel choice (a 1x1 conv on mmap-loaded weights
    # differs from the in-memory one by ~1e-6 at batch 2; bit-equal at batch 1)
    torch.testing.assert_close(_generate(built, PROMPTS[:2]), images, rtol=0, atol=1e-5)


def test_tokenizer_round_trips_and_never_uses_unk(saved_eps: Path) -> None:
    fixture_tok = make_tiny_tokenizer()
    loaded_tok = StableDiffusionPipeline.from_pretrained(saved_eps).tokenizer
    for prompt in PROMPTS:
        ids = fixture_tok(prompt).input_ids
        assert loaded_tok(prompt).input_ids == ids
        # unk == eos for CLIP, so "no unk" means eos appears exactly once, at the end
        assert ids[0] == fixture_tok.bos_token_id and ids[-1] == fixture_tok.eos_token_id
        assert ids.count(fixture_tok.eos_token_id) == 1
    # byte-level BPE is lossless up to CLIP's normalisation (lowercase, whitespace collapsed)
    decoded = fixture_tok.decode(fixture_tok("a green bench").input_ids, skip_special_tokens=True)
    assert decoded == "a green bench"
    padded = fixture_tok(PROMPTS[1], padding="max_length", max_length=77, truncation=True)
    assert len(padded.input_ids) == 77


def test_same_seed_same_weights_other_seed_differs() -> None:
    state = torch.get_rng_state()
    a, b, c = build_tiny_sd(seed=3), build_tiny_sd(seed=3), build_tiny_sd(seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_v_prediction_variant(tmp_path: Path) -> None:
    path = make_tiny_sd(tmp_path / "v", prediction_type="v_prediction")
    loaded = StableDiffusionPipeline.from_pretrained(path)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert _generate(loaded, PROMPTS[2:]).shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_unknown_prediction_type_raises() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_sd(prediction_type="sample")
