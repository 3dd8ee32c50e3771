"""diffloop: reinforcement-learning fine-tuning of text-to-image diffusion models with LOOP.

The algorithm core (pure functions of tensors) is importable from here, loaded on first use; the
trainer, policies, rewards and prompt sources live in their submodules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """The core functions load on first use (PEP 562): ``import diffloop.cli`` for ``--help`` or
    ``--version`` must not import torch."""
    if name in __all__:
        return getattr(importlib.import_module("diffloop.core"), name)
    raise AttributeError(f"module 'diffloop' has no attribute {name!r}")
