"""The device a reward server computes on: ``--device`` checked at start, and the served reward
built for it.

``--device`` (any torch device string: cpu, cuda, cuda:1, mps, ...) is checked at start; the images
go there, a reward whose constructor takes ``device`` is built with it, and a model reward
(``ModelReward``) moves its networks there at start, so a wrong or full device fails at once.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from diffloop.rewards.model_loading import ModelReward
from diffloop.rewards.registry import build_reward, reward_factory


def resolve_device(text: str | torch.device, what: str = "device") -> torch.device:
    """A torch device string -> a device this process can allocate on; ValueError naming ``what``
    (e.g. ``--device``) if it does not parse, has no data (meta), or is not available here."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{what} {str(text)!r} is not a torch device ({exc}); e.g. cpu, cuda, cuda:1, mps"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")  # one CPU device: cpu:0 is cpu
    if device.type == "meta":
        raise ValueError(f"{what} {text}: the meta device holds no data; use cpu, cuda:N, ...")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what} {text}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{what} {text}: this machine has {count} CUDA device(s): cuda:0 to "
                f"cuda:{count - 1}"
            )
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001  (each backend raises its own type)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what} {text}: not available here ({first})") from None
    return device


def _takes_device(factory: Any) -> bool:
    try:
        return "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return False


def build_served_reward(name: str, kwargs: dict[str, Any], device: torch.device) -> Any:
    """``build_reward(name, **kwargs)`` for a server on ``device``: a constructor that takes
    ``device`` gets ``str(device)``; a model reward moves its networks to ``device`` now.

    ValueError if ``kwargs`` names another device than ``device`` (images and model would differ).
    """
    kwargs = dict(kwargs)
    if "device" in kwargs:
        if resolve_device(kwargs["device"], "--kwargs device") != device:
            raise ValueError(
                f"--kwargs sets device={kwargs['device']!r} but --device is {str(device)!r}: the "
                "images would be on another device than the reward; give the device once, as "
                "--device"
            )
    else:
        factory, constructed = reward_factory(name, kwargs)  # not: a function that is the reward
        if constructed and _takes_device(factory):
            kwargs["device"] = str(device)
    reward = build_reward(name, **kwargs)
    if isinstance(reward, ModelReward):
        reward.to(device)  # load onto the device at start: out of memory fails now, not later
    return reward


__all__ = ["build_served_reward", "resolve_device"]
