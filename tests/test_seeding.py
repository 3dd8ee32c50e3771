"""Defect 6: named seed streams are distinct by construction (no training/evaluation noise
collision)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffloop import seeding

SEEDS = [0, 1, 7, 12345, 2**32, 2**40 + 3]


def test_seedsequence_alone_collides_which_is_why_streams_exist():
    # The defect: trailing zeros vanish, so (s, e, 0) and (s, e) are one stream.
    a = np.random.SeedSequence([5, 3, 0]).generate_state(2)
    b = np.random.SeedSequence([5, 3]).generate_state(2)
    assert (a == b).all()


@pytest.mark.parametrize("seed, eval_seed", list(itertools.product(SEEDS[:4], SEEDS[:4])))
def test_training_and_evaluation_noise_never_coincide(seed, eval_seed):
    train = {seeding.training_noise_seed(seed, e, g) for e in range(4) for g in range(8)}
    evals = {seeding.eval_image_seed(eval_seed, i, j) for i in range(8) for j in range(4)}
    assert len(train) == 32 and len(evals) == 32  # distinct within each stream
    assert not train & evals
    # The old collision exactly: epoch e's sample 0 against evaluation image e (of prompt e, index
    # 0).
    assert seeding.training_noise_seed(seed, 2, 0) != seeding.eval_image_seed(seed, 2, 0)


def test_every_named_stream_is_distinct_from_every_other():
    uses = [  # (stream, function, number of arguments)
        ("lora_init", seeding.lora_init_seed, 1),
        ("train_noise", seeding.training_noise_seed, 3),
        ("timesteps", seeding.timestep_seed, 3),
        ("globals", seeding.globals_seed, 3),
        ("eval_noise", seeding.eval_image_seed, 3),
        ("variance_noise", seeding.variance_noise_seed, 3),
        ("variance_timesteps", seeding.variance_timestep_seed, 2),
        ("sample_cli", seeding.sample_cli_seed, 2),
    ]
    assert {name for name, _, _ in uses} == set(seeding.STREAMS)
    draws: dict[int, tuple] = {}
    for name, fn, arity in uses:
        for args in {(s, a, b)[:arity] for s, a, b in itertools.product(SEEDS, range(3), range(3))}:
            value = fn(*args)
            assert 0 <= value < 2**63
            assert draws.setdefault(value, (name, *args)) == (name, *args), (
                f"{(name, *args)} == {draws[value]}"
            )


def test_part_count_and_word_boundaries_are_part_of_the_stream():
    # (2^32,) is the word pair (0, 1): it must differ from the two parts (0, 1), and (x, 0) from
    # (x,).
    assert seeding.stream_seed("train_noise", 2**32) != seeding.stream_seed("train_noise", 0, 1)
    assert seeding.stream_seed("train_noise", 5, 0) != seeding.stream_seed("train_noise", 5)
    assert seeding.stream_seed("train_noise", 0) != seeding.stream_seed("train_noise")


def test_bad_parts_and_streams_are_errors():
    with pytest.raises(ValueError, match="must be >= 0"):
        seeding.training_noise_seed(-1, 0, 0)
    with pytest.raises(ValueError, match="unknown seed stream"):
        seeding.stream_seed("training", 0)
