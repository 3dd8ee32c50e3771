"""Every random stream of diffloop, named: a seed is a pure function of (stream, parts).

Randomness is reproducible by construction: sample g of epoch e always gets the same noise, whichever
process draws it and whether or not the run was resumed, and evaluation image j of prompt i gets the
same noise for every model evaluated. Each use below is one named stream; call sites never build
seeds themselves.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


EVAL_RULE = "image j of prompt i: derive_seed(seed, i, j)"


def lora_init_seed(seed: int) -> int:
    """The global RNG before the adapter is initialised (same start on every process)."""
    return derive_seed(seed, 0xD1FF)


def training_noise_seed(seed: int, epoch: int, sample_index: int) -> int:
    """Sampling noise of global sample ``sample_index`` of ``epoch``."""
    return derive_seed(seed, epoch, sample_index)


def timestep_seed(seed: int, epoch: int, rank: int) -> int:
    """Minibatch order and trained-timestep choice of ``epoch`` on process ``rank``."""
    return derive_seed(seed, epoch, rank, 1)


def globals_seed(seed: int, epoch: int, rank: int) -> int:
    """Python / numpy / torch global RNGs (LoRA dropout, anything a reward draws) in ``epoch``."""
    return derive_seed(seed, epoch, rank, 2)


def eval_image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Evaluation noise of image ``image_index`` of prompt ``prompt_index`` (``eval.seed`` or --seed)."""
    return derive_seed(seed, prompt_index, image_index)


VARIANCE_TAG = 0x5A7


def variance_noise_seed(seed: int, estimate: int, sample_index: int) -> int:
    """``diffloop variance``: sampling noise of sample ``sample_index`` of estimate ``estimate``."""
    return derive_seed(VARIANCE_TAG, seed, estimate, sample_index)


def variance_timestep_seed(seed: int, estimate: int) -> int:
    """``diffloop variance``: trained-timestep choice of estimate ``estimate``."""
    return derive_seed(VARIANCE_TAG, seed, estimate, 1)


def sample_cli_seed(seed: int, image_index: int) -> int:
    """``diffloop sample``: noise of image ``image_index``."""
    return derive_seed(seed, image_index)
