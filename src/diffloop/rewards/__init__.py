"""Rewards: ``reward(images, prompts, metadata) -> scores``.

See :mod:`diffloop.rewards.registry` for the protocol, how rewards are built by name or as
'package.module:attr', and the policy for rewards that raise or return invalid values; and
:mod:`diffloop.rewards.breakdown` for the optional breakdown of the held-out evaluation a reward
may offer (per category of images, e.g. GenEval's tags).
"""

from diffloop.rewards.images import to_pil_images, to_uint8
from diffloop.rewards.registry import (
    REWARDS,
    Reward,
    RewardError,
    RewardScores,
    available_rewards,
    build_reward,
    concat_scores,
    register_reward,
    reward_name,
    score,
)

__all__ = [
    "REWARDS",
    "Reward",
    "RewardError",
    "RewardScores",
    "available_rewards",
    "build_reward",
    "concat_scores",
    "register_reward",
    "reward_name",
    "score",
    "to_pil_images",
    "to_uint8",
]
