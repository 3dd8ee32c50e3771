"""Shared fixtures: offline hub, few threads, tiny random-weight pipelines saved to disk
(``diffloop.testing``), torchrun launches of tests/dist_worker.py."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a failed hub lookup costs ~50 s; tests never need the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TESTS = Path(__file__).resolve().parent
# The user-style reward modules (reward_fns, example_rewards) import by name, as a user's own do.
sys.path.insert(0, str(TESTS))

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
    from diffloop.testing.tiny import tiny_sd_dir

    return tiny_sd_dir(tmp_path_factory, "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny SD 2.x-style (v-prediction) pipeline directory."""
    from diffloop.testing.tiny import tiny_sd_dir

    return tiny_sd_dir(tmp_path_factory, "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline saved with the Euler scheduler config SDXL ships
    (``diffloop.testing.tiny_sdxl``)."""
    from diffloop.testing.tiny_sdxl import tiny_sdxl_dir

    return tiny_sdxl_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline (CLIP BPE fixture tokenizer, in-code T5) saved in diffusers layout
    (``diffloop.testing.tiny_flow``)."""
    from diffloop.testing.tiny_flow import make_tiny_sd3
    from diffloop.testing.tokenizer import make_tiny_tokenizer

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), clip_tokenizer=make_tiny_tokenizer())


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-style pipeline (guidance embedding; dev's scheduler with the dynamic
    shift) saved in diffusers layout (``diffloop.testing.tiny_flux``)."""
    from diffloop.testing.tiny_flux import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux"), guidance_embeds=True)


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> Path:
    """A tiny FLUX.2-dev-style pipeline (Mistral3 encoder, guidance embedding) saved in diffusers
    layout (``diffloop.testing.tiny_flux2``)."""
    from diffloop.testing.tiny_flux2 import make_tiny_flux2

    return make_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2"))


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory) -> Path:
    """A tiny FLUX.2-klein-base-style pipeline (Qwen3 encoder, real CFG: is_distilled false)."""
    from diffloop.testing.tiny_flux2 import make_tiny_flux2_klein

    return make_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_flux2_klein"))


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    """A tiny Z-Image (base) pipeline (in-code Qwen tokenizer with a chat template, Z-Image's
    shift-6 scheduler) saved in diffusers layout (``diffloop.testing.tiny_zimage``)."""
    from diffloop.testing.tiny_zimage import make_tiny_zimage

    return make_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"))


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> Path:
    """A tiny Qwen-Image pipeline (in-code Qwen2 tokenizer, Qwen-Image's scheduler) saved in
    diffusers layout (``diffloop.testing.tiny_qwen_image``)."""
    from diffloop.testing.tiny_qwen_image import make_tiny_qwen_image

    return make_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image"))


@pytest.fixture
def two_processes_and_one() -> Callable[..., tuple[dict, dict, dict]]:
    """``diffloop.testing.runs.two_processes_and_one`` with the torchrun worker
    tests/dist_worker.py: ``(model_dir, out, accumulation, **settings)`` -> the trainable weights
    of (rank 0, rank 1, the single process)."""
    from diffloop.testing.runs import two_processes_and_one as train

    return functools.partial(train, TESTS / "dist_worker.py")
