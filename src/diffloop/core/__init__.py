"""The algorithm core: pure functions for advantages, policy losses, and the DDIM and flow-matching
Gaussian steps."""

from __future__ import annotations

from diffloop.core.advantages import (
    PerPromptStatTracker,
    batch_mean_advantages,
    clip_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
    scale_by_group_std,
)
from diffloop.core.ddim import ddim_step_mean_std, ddim_step_with_logprob, gaussian_log_prob
from diffloop.core.flow import (
    exponential_time_shift,
    flow_grpo_kl,
    flow_grpo_std_dev,
    flow_sde_step_with_logprob,
    flow_step_mean_std,
    flux_calculate_shift,
    flux_sigmas,
    sd3_shift_sigmas,
)
from diffloop.core.losses import (
    approx_kl,
    clip_fraction,
    clipped_surrogate_loss,
    gaussian_kl,
    policy_gradient_loss,
)

__all__ = [
    "PerPromptStatTracker",
    "approx_kl",
    "batch_mean_advantages",
    "clip_advantages",
    "clip_fraction",
    "clipped_surrogate_loss",
    "ddim_step_mean_std",
    "ddim_step_with_logprob",
    "exponential_time_shift",
    "flow_grpo_kl",
    "flow_grpo_std_dev",
    "flow_sde_step_with_logprob",
    "flow_step_mean_std",
    "flux_calculate_shift",
    "flux_sigmas",
    "gaussian_kl",
    "gaussian_log_prob",
    "group_normalized_advantages",
    "leave_one_out_advantages",
    "policy_gradient_loss",
    "scale_by_group_std",
    "sd3_shift_sigmas",
]
