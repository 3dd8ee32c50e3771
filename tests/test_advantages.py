from __future__ import annotations

import json
import math

import pytest
import torch

from diffloop.core.advantages import (
    PerPromptStatTracker,
    batch_mean_advantages,
    clip_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
    scale_by_group_std,
)

NAN = math.nan


def close(a: torch.Tensor, b: torch.Tensor | list, atol: float = 1e-12) -> None:
    b = torch.as_tensor(b, dtype=a.dtype)
    torch.testing.assert_close(a, b, atol=atol, rtol=0, equal_nan=True)


# ----- leave-one-out ---------------------------------------------------------------------------


def test_loo_hand_computed() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    # A_i = R_i - mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3
    close(leave_one_out_advantages(r), [[-8 / 3, -4 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])


def test_loo_equals_scaled_centering_and_sums_to_zero() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 3, generator=g, dtype=torch.float64)
    a = leave_one_out_advantages(r)
    k = r.shape[1]
    close(a, k / (k - 1) * (r - r.mean(dim=1, keepdim=True)))
    close(a.sum(dim=1), torch.zeros(5, dtype=torch.float64))


def test_loo_k2_is_difference() -> None:
    r = torch.tensor([[3.0, 1.0]])
    close(leave_one_out_advantages(r), [[2.0, -2.0]], atol=0)


def test_loo_nan_left_out_of_baseline() -> None:
    r = torch.tensor([[1.0, NAN, 3.0, 5.0], [NAN, 2.0, NAN, NAN], [NAN, NAN, NAN, NAN]])
    a = leave_one_out_advantages(r)
    # Row 0: valid {1, 3, 5}: 1 - 4, 3 - 3, 5 - 2. Row 1: one valid sample, no baseline -> NaN.
    close(a, [[-3.0, NAN, 0.0, 3.0], [NAN, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]], atol=0)


def test_loo_preserves_dtype() -> None:
    for dtype in (torch.float32, torch.float64):
        assert leave_one_out_advantages(torch.zeros(2, 3, dtype=dtype)).dtype == dtype


def test_loo_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"K=1.*at least 2 samples per prompt|at least 2.*K=1"):
        leave_one_out_advantages(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="shape"):
        leave_one_out_advantages(torch.zeros(4))


# ----- GRPO, batch mean, std scaling, clipping ------------------------------------------------


def test_group_normalized_hand_computed() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    std = math.sqrt((4 + 1 + 0 + 9) / 4)  # population std around the mean 3
    expected = [[(x - 3.0) / (std + 1e-4) for x in (1.0, 2.0, 3.0, 6.0)]]
    close(group_normalized_advantages(r), expected)
    close(group_normalized_advantages(r, eps=0.0), [[(x - 3.0) / std for x in (1, 2, 3, 6)]])


def test_group_normalized_nan_excluded() -> None:
    r = torch.tensor([[1.0, NAN, 3.0], [2.0, NAN, NAN]], dtype=torch.float64)
    # Row 0: valid {1, 3}: mean 2, population std 1. Row 1: one valid, std 0 -> advantage 0.
    close(group_normalized_advantages(r), [[-1 / 1.0001, NAN, 1 / 1.0001], [0.0, NAN, NAN]])


def test_batch_mean() -> None:
    r = torch.tensor([1.0, NAN, 4.0, 7.0])
    close(batch_mean_advantages(r), [-3.0, NAN, 0.0, 3.0], atol=0)
    close(batch_mean_advantages(r.reshape(2, 2)), [[-3.0, NAN], [0.0, 3.0]], atol=0)


def test_scale_by_group_std() -> None:
    r = torch.tensor([[1.0, NAN, 3.0], [0.0, 4.0, 8.0]], dtype=torch.float64)
    a = leave_one_out_advantages(r)  # [[-2, nan, 2], [-6, 0, 6]]
    std1 = math.sqrt(32 / 3)
    close(scale_by_group_std(a, r, eps=0.0), [[-2.0, NAN, 2.0], [-6 / std1, 0.0, 6 / std1]])


def test_clip_advantages() -> None:
    a = torch.tensor([-7.0, -2.0, NAN, 0.5, 9.0])
    close(clip_advantages(a, 5.0), [-5.0, -2.0, NAN, 0.5, 5.0], atol=0)
    assert clip_advantages(a, None) is a
    with pytest.raises(ValueError):
        clip_advantages(a, 0.0)


# ----- DDPO per-prompt stat tracker ------------------------------------------------------------


def test_tracker_uses_batch_stats_below_min_count() -> None:
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    r = torch.tensor([1.0, 3.0, 5.0, NAN], dtype=torch.float64)
    adv = tr.update(["a", "a", "b", "b"], r)
    # Buffers: a=[1, 3] (2 < 3), b=[5]: both use this batch's valid rewards {1, 3, 5}.
    mean, std = 3.0, math.sqrt(8 / 3)
    close(adv, [(v - mean) / (std + 1e-6) for v in (1.0, 3.0, 5.0)] + [NAN])
    assert tr.stats() == {"num_prompts": 2, "mean_count": 1.5}


def test_tracker_uses_buffer_and_fifo() -> None:
    tr = PerPromptStatTracker(buffer_size=3, min_count=3)
    tr.update(["a", "a"], torch.tensor([0.0, 10.0], dtype=torch.float64))
    # Buffer a = [0, 10, 2, 4] -> FIFO keeps [10, 2, 4]: mean 16/3, population std.
    adv = tr.update(["a", "a", "b"], torch.tensor([2.0, 4.0, 100.0], dtype=torch.float64))
    buf = torch.tensor([10.0, 2.0, 4.0], dtype=torch.float64)
    m, s = buf.mean(), buf.std(unbiased=False)
    batch = torch.tensor([2.0, 4.0, 100.0], dtype=torch.float64)
    bm, bs = batch.mean(), batch.std(unbiased=False)
    close(adv, [(2 - m) / (s + 1e-6), (4 - m) / (s + 1e-6), (100 - bm) / (bs + 1e-6)])
    assert tr.state_dict()["buffers"]["a"] == [10.0, 2.0, 4.0]


def test_tracker_state_roundtrip_json_exact() -> None:
    g = torch.Generator().manual_seed(1)
    prompts = ["x", "y", "z", "x", "y", "x"]
    a = PerPromptStatTracker(buffer_size=5, min_count=2)
    for _ in range(3):
        a.update(prompts, torch.rand(6, generator=g))
    b = PerPromptStatTracker()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert (b.buffer_size, b.min_count) == (5, 2)
    r = torch.rand(6, generator=g)
    out_a, out_b = a.update(prompts, r), b.update(prompts, r)
    assert out_a.dtype == torch.float32
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    assert a.state_dict() == b.state_dict()


# ----- per-algorithm advantage clipping (the algorithms table's adv_clip_max column) --------------


def _cfg(**kw):
    from diffloop.config import TrainConfig

    return TrainConfig(**kw)


def test_only_ppo_clips_advantages_by_default() -> None:
    from diffloop.algorithms import ALGORITHMS

    defaults = {name: algo.adv_clip(_cfg()) for name, algo in ALGORITHMS.items()}
    assert defaults == {
        "loop": None,
        "reinforce_loo": None,
        "grpo": None,
        "ppo": 5.0,
        "reinforce": None,
    }
    assert ALGORITHMS["loop"].adv_clip(_cfg(adv_clip_max=2.0)) == 2.0  # explicit beats the default
    assert ALGORITHMS["ppo"].adv_clip(_cfg(adv_clip_max=0.0)) is None  # 0 turns clipping off


def test_loop_keeps_kilobyte_advantages_unclipped_by_default() -> None:
    from diffloop.algorithms import ALGORITHMS

    # JPEG sizes in kB: A_i = R_i - mean of the other three = -80/3, -40/3, 0, 40.
    r = torch.tensor([[10.0, 20.0, 30.0, 60.0]], dtype=torch.float64)
    adv, stats = ALGORITHMS["loop"].advantages_and_stats(r, ["p"], _cfg(), None)
    close(adv, [[-80 / 3, -40 / 3, 0.0, 40.0]])
    assert stats == {"advantage_clipped_frac": 0.0}
    # With DDPO's +-5 three of the four are cut to the clip: the leave-one-out signal is mostly
    # lost.
    adv, stats = ALGORITHMS["loop"].advantages_and_stats(r, ["p"], _cfg(adv_clip_max=5.0), None)
    close(adv, [[-5.0, -5.0, 0.0, 5.0]])
    assert stats == {"advantage_clipped_frac": 0.75}


def test_ppo_clips_an_outlier_to_five_and_counts_it() -> None:
    from diffloop.algorithms import ALGORITHMS

    # 31 distinct prompts, one sample each: every buffer is below min_count, so the batch statistics
    # apply: mean 1/31, std sqrt(30)/31. The outlier's z-score is 30/sqrt(30) = sqrt(30) = 5.48 > 5.
    r = torch.zeros(31, 1, dtype=torch.float64)
    r[0, 0] = 1.0
    tracker = PerPromptStatTracker(buffer_size=32, min_count=16)
    prompts = [f"p{i}" for i in range(31)]
    adv, stats = ALGORITHMS["ppo"].advantages_and_stats(r, prompts, _cfg(), tracker)
    std = math.sqrt(30) / 31
    assert adv[0, 0].item() == 5.0
    close(adv[1:, 0], torch.full((30,), -(1 / 31) / (std + 1e-6), dtype=torch.float64))
    assert stats["advantage_clipped_frac"] == pytest.approx(1 / 31, abs=1e-15)


def test_clipped_fraction_counts_valid_advantages_only() -> None:
    from diffloop.algorithms import clipped_fraction

    a = torch.tensor([NAN, 6.0, 1.0, -7.0])
    assert clipped_fraction(a, 5.0) == pytest.approx(2 / 3)
    assert clipped_fraction(a, None) == 0.0
    assert clipped_fraction(torch.tensor([NAN, NAN]), 5.0) == 0.0
    assert clipped_fraction(torch.tensor([5.0, -5.0]), 5.0) == 0.0  # at the bound: unchanged
