"""Converting whatever scheduler a model ships into the DDIM scheduler diffloop samples with.

Models ship the scheduler their authors sampled with: PNDM (SD 1.x), Euler / Euler-ancestral /
DPM-Solver (SDXL and most community exports), DDIM. ``DDIMScheduler.from_config`` fills every key
the source config lacks with DDIM's defaults, and two of those are wrong for a policy-gradient
sampler:

- ``set_alpha_to_one=True`` makes the last step's alpha_prev = 1, so that step's std is 0 and its
  Gaussian log-density is 0/0 = NaN (one epoch later every trained weight is NaN);
- ``clip_sample=True`` clamps the predicted x0 to [-1, 1], which in latent space is not the model.

So a config that is not already a DDIM config is converted with both set to False; a key the user
sets in ``model.scheduler_kwargs`` wins over both the source config and this rule. Every value the
conversion chose is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# The keys whose DDIM defaults are wrong for a stochastic-policy sampler (see the module docstring).
SAFE_DDIM_DEFAULTS = {"set_alpha_to_one": False, "clip_sample": False}


def ddim_config_from(
    source: Mapping[str, Any], user_kwargs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The DDIMScheduler config for a model whose scheduler config is ``source``.

    A DDIM source keeps its own values for the keys it sets; any other source (or a DDIM config that
    omits them) gets ``SAFE_DDIM_DEFAULTS``; ``user_kwargs`` override everything. Returns a plain
    dict for ``DDIMScheduler.from_config``.
    """
    config = {k: v for k, v in source.items() if not k.startswith("_")}
    is_ddim = source.get("_class_name") == "DDIMScheduler"
    chosen = {}
    for key, value in SAFE_DDIM_DEFAULTS.items():
        if not (is_ddim and key in config):
            chosen[key] = value
    config.update(chosen)
    config.update(user_kwargs or {})
    shown = {k: v for k, v in chosen.items() if k not in (user_kwargs or {})}
    if shown:
        logger.info(
            "scheduler: converted %s config to DDIM with %s (model.scheduler_kwargs overrides)",
            source.get("_class_name", "an unnamed"),
            ", ".join(f"{k}={v}" for k, v in shown.items()),
        )
    if user_kwargs:
        logger.info("scheduler: model.scheduler_kwargs set %s", dict(user_kwargs))
    return config


def to_ddim(source: Mapping[str, Any], user_kwargs: Mapping[str, Any] | None = None):
    """A ``DDIMScheduler`` built from ``ddim_config_from(source, user_kwargs)``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(ddim_config_from(source, user_kwargs))
