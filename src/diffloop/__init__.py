"""diffloop: reinforcement-learning fine-tuning of text-to-image diffusion models with LOOP.

The Python API (docs/python_api.md), loaded on first use::

    from diffloop import Config, Trainer, register_reward, read_metrics

    config = Config()                     # exactly what `diffloop train` runs with no arguments
    Trainer(config, reward=my_score, prompts=["a red circle", ...]).train()

and the algorithm core (pure functions of tensors: advantages, losses, DDIM log-probabilities).
Everything loads lazily (PEP 562), so ``import diffloop.cli`` for ``--help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffloop.config import Config, load_config
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
    from diffloop.rewards.registry import register_reward
    from diffloop.run_dir import read_metrics
    from diffloop.trainer import Trainer

__version__ = "0.1.0"

# name -> the module it is loaded from on first use (the rest of __all__ is diffloop.core's).
_API = {
    "Config": "diffloop.config",
    "load_config": "diffloop.config",
    "Trainer": "diffloop.trainer",
    "register_reward": "diffloop.rewards.registry",
    "read_metrics": "diffloop.run_dir",
}

__all__ = [
    "Config",
    "PerPromptStatTracker",
    "Trainer",
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
    "load_config",
    "policy_gradient_loss",
    "read_metrics",
    "register_reward",
    "scale_by_group_std",
]


def __getattr__(name: str) -> Any:
    """The API and the core functions load on first use (PEP 562): ``import diffloop.cli`` for
    ``--help`` or ``--version`` must not import torch."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in __all__:
        return getattr(importlib.import_module("diffloop.core"), name)
    raise AttributeError(f"module 'diffloop' has no attribute {name!r}")
