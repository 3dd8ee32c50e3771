"""The algorithms are rows of one table, not branches in the training loop.

Each row says how rewards become advantages, which per-element loss is minimised, how many samples
per prompt it needs, and whether it may reuse samples (importance ratio + clipping) or must make one
gradient step per batch. The trainer reads the row; it never asks for an algorithm by name.

| name          | samples / prompt | advantage                            | adv. clip |
|---------------|------------------|--------------------------------------|-----------|
| loop          | K >= 2           | leave-one-out                        | none      |
| reinforce_loo | K >= 2           | leave-one-out                        | none      |
| grpo          | K >= 2           | (R - group mean) / (group std + eps) | none      |
| ppo (DDPO_IS) | 1 (or K)         | per-prompt running mean/std          | +-5       |
| reinforce     | 1 (or K)         | R - batch mean                       | none      |

| name          | loss              | updates       |
|---------------|-------------------|---------------|
| loop          | clipped surrogate | inner epochs  |
| reinforce_loo | policy gradient   | one per batch |
| grpo          | clipped surrogate | inner epochs  |
| ppo (DDPO_IS) | clipped surrogate | inner epochs  |
| reinforce     | policy gradient   | one per batch |

Advantage clipping: DDPO clips its normalised advantages to +-5, so ppo does by default; method.md
defaults LOOP to the plain leave-one-out form, and for unnormalised rewards (JPEG size in kB) a
+-5 clip would cut most leave-one-out advantages, so every other row does not clip.
``train.adv_clip_max`` null takes the row's default, 0 turns clipping off, a positive value is used
as given; the fraction of advantages clipped is logged as ``advantage_clipped_frac``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

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


class AdvantageOptions(Protocol):
    """The settings an advantage estimate reads (``diffloop.config.TrainConfig`` has them all)."""

    normalize_advantages: bool
    grpo_eps: float
    adv_clip_max: float | None
    stat_tracking_buffer: int
    stat_tracking_min_count: int


# (rewards (P, K), prompts (P,), options, stat tracker or None) -> advantages (P, K)
AdvantageFn = Callable[
    [torch.Tensor, list[str], AdvantageOptions, "PerPromptStatTracker | None"], torch.Tensor
]
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
    adv_clip_max: float | None = None
    """Default advantage clip (+-this; None: none), used when ``train.adv_clip_max`` is null."""

    def adv_clip(self, cfg: AdvantageOptions) -> float | None:
        """The clip in force: ``cfg.adv_clip_max`` if set (0 means none), else this row's
        default."""
        if cfg.adv_clip_max is None:
            return self.adv_clip_max
        return cfg.adv_clip_max or None

    def advantages(
        self,
        rewards: torch.Tensor,
        prompts: list[str],
        cfg: AdvantageOptions,
        tracker: PerPromptStatTracker | None,
    ) -> torch.Tensor:
        """rewards (P, K) -> clipped advantages (P, K); NaN marks samples left out of the loss."""
        return self.advantages_and_stats(rewards, prompts, cfg, tracker)[0]

    def advantages_and_stats(
        self,
        rewards: torch.Tensor,
        prompts: list[str],
        cfg: AdvantageOptions,
        tracker: PerPromptStatTracker | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """As :meth:`advantages`, plus ``{"advantage_clipped_frac": f}`` (see
        :func:`clipped_fraction`)."""
        adv = self.advantage_fn(rewards, prompts, cfg, tracker)
        max_abs = self.adv_clip(cfg)
        clipped = clip_advantages(adv, max_abs)
        return clipped, {"advantage_clipped_frac": clipped_fraction(adv, max_abs)}


def clipped_fraction(advantages: torch.Tensor, max_abs: float | None) -> float:
    """Fraction of the valid (non-NaN) advantages that clipping to +-max_abs changes.

    f = #{i : |A_i| > max_abs} / #{i : A_i not NaN}     (0 when max_abs is None or none is valid)
    """
    valid = ~torch.isnan(advantages)
    if max_abs is None or not bool(valid.any()):
        return 0.0
    return float((advantages[valid].abs() > max_abs).double().mean())


_GROUP = "its baseline or normalisation uses the other samples of the same prompt"

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm("loop", _leave_one_out, _clipped, 2, _GROUP, one_update_per_batch=False),
        Algorithm(
            "reinforce_loo", _leave_one_out, _policy_gradient, 2, _GROUP, one_update_per_batch=True
        ),
        Algorithm("grpo", _group_normalized, _clipped, 2, _GROUP, one_update_per_batch=False),
        Algorithm(
            "ppo",
            _per_prompt_running,
            _clipped,
            1,
            "",
            one_update_per_batch=False,
            uses_stat_tracker=True,
            adv_clip_max=5.0,  # DDPO's clip of its normalised advantages
        ),
        Algorithm("reinforce", _batch_mean, _policy_gradient, 1, "", one_update_per_batch=True),
    ]
}


def make_stat_tracker(algorithm: Algorithm, cfg: AdvantageOptions) -> PerPromptStatTracker | None:
    if not algorithm.uses_stat_tracker:
        return None
    return PerPromptStatTracker(
        buffer_size=cfg.stat_tracking_buffer, min_count=cfg.stat_tracking_min_count
    )
