"""Advantage estimators: one scalar per trajectory, shared by all its denoising steps.

Shape notation:
    P  prompts in the batch
    K  samples (trajectories) per prompt; rewards are laid out (P, K), row p = prompt p's K samples
    N  samples in a flat batch (N = P * K when grouped)

Failed rewards. A reward call that failed is carried as NaN. Every estimator here leaves NaN rewards
out of every statistic (group means, stds, leave-one-out baselines, running buffers) and gives the
failed sample an advantage of NaN, so the caller can count and mask it; nothing is silently zeroed.

All functions are pure (except ``PerPromptStatTracker``, which is DDPO's stateful running baseline),
keep the input's floating dtype (float32 stays float32, float64 stays float64; integer rewards are
promoted to the default float dtype) and its device.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

__all__ = [
    "PerPromptStatTracker",
    "batch_mean_advantages",
    "clip_advantages",
    "group_normalized_advantages",
    "leave_one_out_advantages",
    "scale_by_group_std",
]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_groups(rewards: torch.Tensor, what: str) -> None:
    if rewards.ndim != 2:
        raise ValueError(
            f"{what} expects rewards of shape (P, K) (prompts x samples per prompt), "
            f"got shape {tuple(rewards.shape)}"
        )
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(
            f"{what} needs at least 2 samples per prompt, got K={k}; "
            "sample K >= 2 trajectories per prompt"
        )


def _group_mean_std(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population std and count of the valid (non-NaN) rewards of each group.

    rewards: (P, K) -> mean (P, 1), std (P, 1), count (P, 1) (same dtype as rewards).
    A group with no valid reward gets mean and std NaN.
    """
    valid = ~torch.isnan(rewards)
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)
    r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = r0.sum(dim=1, keepdim=True) / count  # 0/0 = NaN for an all-NaN group
    sq = torch.where(valid, (rewards - mean) ** 2, torch.zeros_like(rewards))
    std = torch.sqrt(sq.sum(dim=1, keepdim=True) / count)  # population std (unbiased=False)
    return mean, std, count


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """LOOP / RLOO leave-one-out advantages.

        b_i = 1/(K-1) * sum_{j != i} R_j
        A_i = R_i - b_i = K/(K-1) * (R_i - mean_j R_j)

    The baseline of sample i does not use R_i, so E[A_i grad log p(i)] is the unbiased REINFORCE
    gradient. Within a group with no failed reward the advantages sum to zero.

    Failed rewards (NaN): the baseline of sample i is the mean of the OTHER valid rewards of its
    group (with V valid samples, b_i = 1/(V-1) sum_{j != i, j valid} R_j). A NaN reward gets
    advantage NaN, and so does a valid sample with no other valid sample in its group (its
    baseline is undefined); the caller must mask NaN advantages out of the loss.

    Args:
        rewards: (P, K) float, K >= 2.
    Returns:
        (P, K) advantages, same dtype and device as ``rewards``.
    Raises:
        ValueError: rewards is not 2-D, or K < 2.
    """
    _check_groups(rewards, "leave_one_out_advantages (leave-one-out)")
    rewards = _as_float(rewards)
    valid = ~torch.isnan(rewards)
    r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
    total = r0.sum(dim=1, keepdim=True)  # (P, 1) sum of valid rewards
    n_others = valid.sum(dim=1, keepdim=True).to(rewards.dtype) - 1.0  # (P, 1) #valid j != i
    defined = valid & (n_others > 0)
    # Safe denominator: where n_others == 0 the value is replaced by NaN below anyway.
    baseline = (total - r0) / torch.where(n_others > 0, n_others, torch.ones_like(n_others))
    nan = torch.full_like(rewards, math.nan)
    return torch.where(defined, rewards - baseline, nan)


def group_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO group-normalised advantages.

        A_i = (R_i - mean_g R) / (std_g R + eps),   std the population std (unbiased=False)

    NaN rewards are excluded from the group's mean and std and get advantage NaN. A group with one
    valid reward has std 0 and gives that sample advantage 0.

    Args:
        rewards: (P, K) float, K >= 2.
        eps: added to the std, guards groups whose rewards are all equal.
    Returns:
        (P, K) advantages, same dtype and device as ``rewards``.
    """
    _check_groups(rewards, "group_normalized_advantages (GRPO)")
    rewards = _as_float(rewards)
    mean, std, _ = _group_mean_std(rewards)
    return (rewards - mean) / (std + eps)  # NaN rewards stay NaN


def batch_mean_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the batch-mean baseline.

        A_i = R_i - nanmean(R)   over all elements of ``rewards``

    The baseline includes R_i itself, so the gradient is biased by a factor (N-1)/N (negligible for
    large batches); use leave-one-out for an unbiased baseline. NaN rewards stay NaN.

    Args:
        rewards: any shape, e.g. (N,) or (P, K).
    Returns:
        advantages of the same shape, dtype and device.
    """
    rewards = _as_float(rewards)
    return rewards - torch.nanmean(rewards)


def scale_by_group_std(
    advantages: torch.Tensor, rewards: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """Divide each group's advantages by the std of its valid rewards (optional LOOP normalisation).

        A'_i = A_i / (std_g R + eps),   std the population std of the group's non-NaN rewards

    docs/method.md: whether LOOP divides its advantages by a std is not known from the paper; this
    is the option, the default is not to.

    Args:
        advantages: (P, K).
        rewards: (P, K), the rewards the advantages were computed from.
        eps: added to the std.
    Returns:
        (P, K) scaled advantages (NaN stays NaN).
    """
    if advantages.shape != rewards.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and rewards {tuple(rewards.shape)} must "
            "have the same (P, K) shape"
        )
    _check_groups(rewards, "scale_by_group_std")
    _, std, _ = _group_mean_std(_as_float(rewards))
    return advantages / (std.to(advantages.dtype) + eps)


def clip_advantages(advantages: torch.Tensor, max_abs: float | None) -> torch.Tensor:
    """Clamp advantages to [-max_abs, max_abs] (DDPO clips to +-5). ``None`` returns the input.

    NaN stays NaN (torch.clamp propagates NaN). Any shape.
    """
    if max_abs is None:
        return advantages
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0 (or None for no clipping), got {max_abs}")
    return advantages.clamp(-max_abs, max_abs)


class PerPromptStatTracker:
    """DDPO's per-prompt running reward normalisation (PPO / DDPO_IS baseline).

    Adapted from kvablack/ddpo-pytorch ``ddpo_pytorch/stat_tracking.py`` (commit 2fda3d4). Changes:
    torch tensors in and out; NaN rewards are not appended and get advantage NaN; the fallback batch
    statistics use only the batch's valid rewards; JSON-serialisable state for exact resume.

    For each prompt p in a batch, after appending the batch's valid rewards of p to p's FIFO buffer
    (at most ``buffer_size`` values, oldest dropped first):

        if len(buffer_p) < min_count:  mean, std = mean/std of all valid rewards of THIS batch
        else:                          mean, std = mean/std of buffer_p
        A_i = (R_i - mean) / (std + 1e-6)          (population std)

    In a multi-process run, call ``update`` with the prompts and rewards gathered from all processes
    (every process then holds the same state), and take this process's slice of the result.
    """

    STD_EPS = 1e-6

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Append this batch's rewards and return its advantages.

        Args:
            prompts: N prompt strings (repeats allowed: K samples of one prompt).
            rewards: (N,) float, NaN for a failed reward.
        Returns:
            (N,) advantages, same dtype and device as ``rewards``; NaN where the reward is NaN.
        """
        if rewards.ndim != 1 or len(prompts) != rewards.shape[0]:
            raise ValueError(
                f"update expects N prompts and rewards of shape (N,), got {len(prompts)} prompts "
                f"and rewards of shape {tuple(rewards.shape)}"
            )
        out_dtype = _as_float(rewards).dtype
        r = rewards.detach().to("cpu", torch.float64)  # statistics in float64, as numpy does
        valid = ~torch.isnan(r)
        batch = r[valid]
        batch_mean = batch.mean() if batch.numel() else torch.tensor(math.nan, dtype=torch.float64)
        batch_std = batch.std(unbiased=False) if batch.numel() else batch_mean

        index: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            index.setdefault(p, []).append(i)

        adv = torch.full_like(r, math.nan)
        for prompt, idx_list in index.items():
            idx = torch.tensor(idx_list, dtype=torch.long)
            r_p = r[idx]
            buf = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(float(v) for v in r_p[~torch.isnan(r_p)])
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                stats = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = stats.mean(), stats.std(unbiased=False)
            adv[idx] = (r_p - mean) / (std + self.STD_EPS)  # NaN rewards stay NaN
        return adv.to(device=rewards.device, dtype=out_dtype)

    def stats(self) -> dict[str, float]:
        """``num_prompts`` tracked and ``mean_count`` (average buffer fill), for logging."""
        n = len(self._buffers)
        mean_count = sum(len(b) for b in self._buffers.values()) / n if n else 0.0
        return {"num_prompts": n, "mean_count": mean_count}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state.

        ``{"buffer_size": int, "min_count": int, "buffers": {prompt: [floats, oldest first]}}``.
        """
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly the state written by ``state_dict`` (buffers replaced, not merged)."""
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self._buffers = {
            p: deque((float(v) for v in values), maxlen=self.buffer_size)
            for p, values in state["buffers"].items()
        }
