"""A tiny random-weight SDXL pipeline for tests, built from configs (nothing downloaded).

The sizes are diffusers' own SDXL fast test (tests/pipelines/stable_diffusion_xl/
test_stable_diffusion_xl.py, ``get_dummy_components``), kept in
``diffloop.testing.tiny_sdxl.SDXL_CONFIGS["tiny"]``: a (2, 4)-channel UNet with
``addition_embed_type="text_time"`` (6 time ids x 8 + pooled 32 = 80 inputs), two 5-layer CLIP
text encoders of width 32 (the second with a 32-wide projection), a 2-level VAE. Both encoders
use the committed CLIP BPE fixture tokenizer (tests/fixtures/tiny_tokenizer), as diffusers' test
uses one tiny CLIP tokenizer twice.

Sizes: latents (4, 32, 32), images (3, 64, 64), text (77, 64), pooled (32,).
The scheduler is saved as diffusers' test and SDXL base 1.0 ship it, Euler
(``EulerDiscreteScheduler``), so loading exercises the conversion to DDIM.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from tiny_models import make_tiny_tokenizer

from diffloop.testing.tiny_sdxl import build_sdxl_components

IMAGE_SIZE = 64
LATENT_SHAPE = (4, 32, 32)


def make_euler_scheduler() -> EulerDiscreteScheduler:
    """diffusers' SDXL fast-test scheduler (its config has no clip_sample / set_alpha_to_one)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline in memory (Euler scheduler, no watermarker); weights are a pure
    function of ``seed`` and the caller's RNG is left untouched."""
    c = build_sdxl_components("tiny", seed=seed, tokenizer=make_tiny_tokenizer())
    return StableDiffusionXLPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"],
        tokenizer_2=make_tiny_tokenizer(),
        unet=c["unet"],
        scheduler=make_euler_scheduler(),
        add_watermarker=False,
    )


def make_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """``save_pretrained`` the tiny pipeline to ``path``: the real SDXL directory layout."""
    path = Path(path)
    build_tiny_sdxl(seed).save_pretrained(path)
    return path


def tiny_sdxl_dir(tmp_path_factory, seed: int = 0) -> Path:
    """For a session-scoped fixture: a fresh tiny SDXL directory under pytest's tmp root."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed)
