"""Tiny random-weight Stable Diffusion pipelines for tests: ``diffloop.testing.tiny`` with the CLIP
BPE tokenizer read from the committed fixture tests/fixtures/tiny_tokenizer (regenerate it with
make_tiny_tokenizer.py there).

Sizes: latents (4, 16, 16), images (3, 32, 32) (the VAE downsamples by 2), text (77, 32).

Use from a conftest::

    @pytest.fixture(scope="session")
    def tiny_sd(tmp_path_factory):
        return tiny_sd_dir(tmp_path_factory)              # or prediction_type="v_prediction"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup costs ~50 s; never needed

from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from diffloop.testing import tiny
from diffloop.testing.tiny import (  # noqa: F401 (re-exported)  # noqa: F401
    IMAGE_SIZE,
    LATENT_SIZE,
    MAX_TOKENS,
    TEXT_DIM,
    make_tiny_text_encoder,
    make_tiny_unet,
    make_tiny_vae,
)

TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "tiny_tokenizer"


def make_tiny_tokenizer() -> CLIPTokenizer:
    """CLIP BPE tokenizer from the committed vocab.json / merges.txt (914 tokens, max length 77)."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    # transformers 5's CLIPTokenizer takes merges as (a, b) tuples; skip the "#version" line
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def make_tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's DDIM schedule, every field explicit so the pipeline does not rewrite the config."""
    return tiny.sd_ddim_scheduler(prediction_type)


def build_tiny_sd(prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """The tiny pipeline in memory with the fixture tokenizer; weights are a pure function of
    ``seed``."""
    return tiny.build_tiny_sd(prediction_type, seed, make_tiny_tokenizer())


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path``; returns ``path`` as a
    Path."""
    return tiny.make_tiny_sd(path, prediction_type, seed, make_tiny_tokenizer())


def tiny_sd_dir(tmp_path_factory, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """For a session-scoped conftest fixture: a fresh tiny pipeline under pytest's tmp root."""
    path = tmp_path_factory.mktemp(f"tiny_sd_{prediction_type}")
    return make_tiny_sd(path, prediction_type, seed)
