"""The algorithms are rows of one table, not branches in the training loop.

Each row says how rewards become advantages, which per-element loss is minimised, how many samples
per prompt it needs, and whether it may reuse samples (importance ratio + clipping) or must make one
gradient step per batch. The trainer reads the row; it never asks for an algorithm by name.

| name          | samples / prompt | advantage                                   | loss                 | updates        |
|---------------|------------------|---------------------------------------------|----------------------|----------------|
| loop          | K >= 2           | leave-one-out                               | clipped surrogate    | inner epochs   |
| reinforce_loo | K >= 2           | leave-one-out                               | policy gradient      | one per batch  |
| grpo          | K >= 2           | (R - group mean) / (group std + eps)        | clipped surrogate    | inner epochs   |
| ppo (DDPO_IS) | 1 (or K)         | per-prompt running mean/std                 | clipped surrogate    | inner epochs   |
| reinforce     | 1 (or K)         | R - batch mean                              | policy gradient      | one per batch  |

All advantages are then optionally clipped to +-``train.adv_clip_max``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffloop.config import TrainConfig
from diffloop.core import (
    PerPromptStatTracker,
    batch_mean_advantages,
    clip_advantages,
    clipped_surrogate_loss,
    group_normalized_advantages,
    leave_one_out_advantages,
    policy_gradient_loss,
    scale_by_group_std,
)

# (rewards (P, K), prompts (P,), train config, stat tracker or None) -> advantages (P, K)
AdvantageFn = Callable[[torch.Tensor, list[str], TrainConfig, "PerPromptStatTracker | None"], torch.Tensor]
# (log_prob (M,), old_log_prob (M,), advantages (M,), clip_range) -> per-element loss (M,)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _leave_one_out(rewards, prompts, cfg, tracker):
    adv = leave_one_out_advantages(rewards)
    return scale_by_group_std(adv, rewards) if cfg.normalize_advantages else adv


def _group_normalized(rewards, prompts, cfg, tracker):
    return group_normalized_advantages(rewards, eps=cfg.grpo_eps)


def _per_prompt_running(rewards, prompts, cfg, tracker):
    # Every sample of prompt p carries prompt p's string; the tracker keeps one buffer per string.
    k = rewards.shape[1]
    flat_prompts = [p for p in prompts for _ in range(k)]
    return tracker.update(flat_prompts, rewards.reshape(-1)).reshape(rewards.shape)


def _batch_mean(rewards, prompts, cfg, tracker):
    return batch_mean_advantages(rewards)


def _clipped(log_prob, old_log_prob, adv, clip_range):
    return clipped_surrogate_loss(log_prob, old_log_prob, adv, clip_range)


def _policy_gradient(log_prob, old_log_prob, adv, clip_range):
    return policy_gradient_loss(log_prob, old_log_prob, adv)


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantage_fn: AdvantageFn
    loss_fn: LossFn
    min_samples_per_prompt: int
    why_min_samples: str
    one_update_per_batch: bool
    """No importance ratio: the whole epoch's samples make exactly one optimizer step."""
    uses_stat_tracker: bool = False

    def advantages(
        self,
        rewards: torch.Tensor,
        prompts: list[str],
        cfg: TrainConfig,
        tracker: PerPromptStatTracker | None,
    ) -> torch.Tensor:
        """rewards (P, K) -> clipped advantages (P, K); NaN marks samples left out of the loss."""
        adv = self.advantage_fn(rewards, prompts, cfg, tracker)
        return clip_advantages(adv, cfg.adv_clip_max)


_GROUP = "its baseline or normalisation uses the other samples of the same prompt"

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm("loop", _leave_one_out, _clipped, 2, _GROUP, one_update_per_batch=False),
        Algorithm("reinforce_loo", _leave_one_out, _policy_gradient, 2, _GROUP, one_update_per_batch=True),
        Algorithm("grpo", _group_normalized, _clipped, 2, _GROUP, one_update_per_batch=False),
        Algorithm(
            "ppo", _per_prompt_running, _clipped, 1, "", one_update_per_batch=False, uses_stat_tracker=True
        ),
        Algorithm("reinforce", _batch_mean, _policy_gradient, 1, "", one_update_per_batch=True),
    ]
}


def make_stat_tracker(algorithm: Algorithm, cfg: TrainConfig) -> PerPromptStatTracker | None:
    if not algorithm.uses_stat_tracker:
        return None
    return PerPromptStatTracker(buffer_size=cfg.stat_tracking_buffer, min_count=cfg.stat_tracking_min_count)
