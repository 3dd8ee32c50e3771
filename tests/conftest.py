"""Shared fixtures: offline hub, few threads, tiny random-weight SD pipelines saved to disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a failed hub lookup costs ~50 s; tests never need the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # tests/tiny_models.py, tests/helper modules

import pytest
import torch

# One thread: OpenMP spin-waiting makes two threads 10-40x slower whenever the CPU is shared.
torch.set_num_threads(1)
# ... and cpu_threads: auto (the default) resolves to OMP_NUM_THREADS, so Trainers keep that one
# thread.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD 1.x-style (epsilon) pipeline directory, loaded by diffloop through
    model.pretrained."""
    from tiny_models import tiny_sd_dir

    return tiny_sd_dir(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny SD 2.x-style (v-prediction) pipeline directory."""
    from tiny_models import tiny_sd_dir

    return tiny_sd_dir(tmp_path_factory, "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline saved with the Euler scheduler config SDXL ships
    (tests/tiny_sdxl.py)."""
    from tiny_sdxl import tiny_sdxl_dir

    return tiny_sdxl_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline (CLIP BPE fixture tokenizer, in-code T5) saved in diffusers layout
    (``diffloop.testing.tiny_flow``)."""
    from tiny_models import make_tiny_tokenizer

    from diffloop.testing.tiny_flow import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), clip_tokenizer=make_tiny_tokenizer())


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-style pipeline (guidance embedding; dev's scheduler with the dynamic
    shift) saved in diffusers layout (``diffloop.testing.tiny_flux``)."""
    from diffloop.testing.tiny_flux import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), guidance_embeds=True)
