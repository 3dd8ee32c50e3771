"""diffloop: reinforcement-learning fine-tuning of text-to-image diffusion models with LOOP.

The algorithm core (pure functions of tensors) is importable from here; the trainer, policies,
rewards and prompt sources live in their submodules.
"""

from __future__ import annotations

from diffloop.core import (
    PerPromptStatTracker,
    approx_kl,
    batch_mean_advantages,
    clip_advantages,
    clip_fraction,
    clipped_surrogate_loss,
    ddim_step_mean_std,
    ddim_step_with_logprob,
    flow_sde_step_with_logprob,
    flow_step_mean_std,
    gaussian_kl,
    gaussian_log_prob,
    group_normalized_advantages,
    leave_one_out_advantages,
    policy_gradient_loss,
    scale_by_group_std,
)

__version__ = "0.1.0"

__all__ = [
    "PerPromptStatTracker",
    "approx_kl",
    "batch_mean_advantages",
    "clip_advantages",
    "clip_fraction",
    "clipped_surrogate_loss",
    "ddim_step_mean_std",
    "ddim_step_with_logprob",
    "flow_sde_step_with_logprob",
    "flow_step_mean_std",
    "gaussian_kl",
    "gaussian_log_prob",
    "group_normalized_advantages",
    "leave_one_out_advantages",
    "policy_gradient_loss",
    "scale_by_group_std",
]
