"""Every random stream of diffloop, named: a seed is a pure function of (stream, parts).

Randomness is reproducible by construction: sample g of epoch e always gets the same noise,
whichever process draws it and whether or not the run was resumed, and evaluation image j of prompt
i gets the same noise for every model evaluated. Each use is one named stream below; call sites
never build seeds themselves.

Streams are distinct by construction. ``np.random.SeedSequence`` alone is not injective on tuples:
it pads short entropy with zeros, so SeedSequence([s, e, 0]) == SeedSequence([s, e]) -- which made
the training noise of epoch e's sample 0 equal evaluation image e whenever seed == eval.seed. Here
the entropy is the fixed-length word string

    [stream tag, number of parts, lo(p_1), hi(p_1), ..., lo(p_n), hi(p_n)]      (uint32 words)

(each part 0 <= p < 2^64 as two words), so two different (stream, parts) give two different entropy
strings of which neither is a zero-padded copy of the other: distinct seeds, up to a 2^-63 hash
collision.
"""

from __future__ import annotations

import numpy as np

STREAMS: dict[str, int] = {
    "lora_init": 1,  # global RNG before the adapter is initialised
    "train_noise": 2,  # sampling noise of a training sample
    "timesteps": 3,  # minibatch order and trained-timestep choice
    "globals": 4,  # python / numpy / torch global RNGs during an epoch
    "eval_noise": 5,  # evaluation images (trainer and ``diffloop eval``)
    "variance_noise": 6,  # ``diffloop variance`` samples
    "variance_timesteps": 7,  # ``diffloop variance`` trained-timestep choice
    "sample_cli": 8,  # ``diffloop sample`` images
}


def stream_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed, a pure function of (stream, parts); distinct (stream, parts) give distinct
    streams (module docstring). parts: integers in [0, 2^64)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(STREAMS)}")
    words = [STREAMS[stream], len(parts)]
    for p in parts:
        p = int(p)
        if not 0 <= p < 2**64:
            raise ValueError(
                f"seed parts must be integers in [0, 2^64), got {p} (a seed must be >= 0)"
            )
        words += [p & 0xFFFFFFFF, p >> 32]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


EVAL_RULE = "image j of prompt i: seeding.stream_seed('eval_noise', seed, i, j)"


def lora_init_seed(seed: int) -> int:
    """The global RNG before the adapter is initialised (same start on every process)."""
    return stream_seed("lora_init", seed)


def training_noise_seed(seed: int, epoch: int, sample_index: int) -> int:
    """Sampling noise of global sample ``sample_index`` of ``epoch``."""
    return stream_seed("train_noise", seed, epoch, sample_index)


def timestep_seed(seed: int, epoch: int, rank: int) -> int:
    """Minibatch order and trained-timestep choice of ``epoch`` on process ``rank``."""
    return stream_seed("timesteps", seed, epoch, rank)


def globals_seed(seed: int, epoch: int, rank: int) -> int:
    """Python / numpy / torch global RNGs (LoRA dropout, anything a reward draws) in ``epoch``."""
    return stream_seed("globals", seed, epoch, rank)


def eval_image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Evaluation noise of image ``image_index`` of prompt ``prompt_index`` (``eval.seed`` or
    --seed)."""
    return stream_seed("eval_noise", seed, prompt_index, image_index)


def variance_noise_seed(seed: int, estimate: int, sample_index: int) -> int:
    """``diffloop variance``: sampling noise of sample ``sample_index`` of estimate ``estimate``."""
    return stream_seed("variance_noise", seed, estimate, sample_index)


def variance_timestep_seed(seed: int, estimate: int) -> int:
    """``diffloop variance``: trained-timestep choice of estimate ``estimate``."""
    return stream_seed("variance_timesteps", seed, estimate)


def sample_cli_seed(seed: int, image_index: int) -> int:
    """``diffloop sample``: noise of image ``image_index``."""
    return stream_seed("sample_cli", seed, image_index)
