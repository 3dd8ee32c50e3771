"""Weighted sums of rewards (``reward: [{name: aesthetic, weight: 1.0}, {name: clip_score, weight:
0.5}]``).

    total(x) = sum_i w_i (s_i(x) - mean_i) / std_i          s_i: (N,) scores of component i

Normalisation uses a FIXED, user-given ``mean_i`` and ``std_i`` per component (defaults 0 and 1,
i.e. none), never running statistics: the total is then a pure function of the images, so it is
exact and deterministic under resume, across processes and across asynchronous scoring, and nothing
needs to be checkpointed. Set them to a component's typical mean and spread (e.g. from a base-model
evaluation) to put components on a common scale before weighting.

NaN policy: each component is checked by :func:`~diffloop.rewards.registry.score` (inf becomes NaN,
a wrong shape or a raising component is a RewardError naming that component). If ANY component is
NaN for a sample, the total for that sample is NaN (IEEE arithmetic): the trainer then counts it as
invalid and leaves it out, rather than scoring the sample on the remaining components.

Each component's raw (unnormalised, unweighted) scores of the latest call are exposed as
``last_components`` = {component name: (N,) float32}; ``score()`` copies them into
``RewardScores.components`` and the trainer logs ``reward_<name>_mean``. Duplicate names are
disambiguated in order as ``name``, ``name_1``, ``name_2``, ...
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch

from diffloop.config import validate_reward_form
from diffloop.rewards.registry import Reward, build_reward, score

if TYPE_CHECKING:
    from diffloop.config import RewardConfig

COMPONENT_KEYS = ("name", "weight", "kwargs", "mean", "std")


@dataclass(frozen=True)
class ComponentSpec:
    """One validated component: ``weight * (score - mean) / std`` of ``build_reward(name,
    **kwargs)``."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] | None = None
    mean: float = 0.0
    std: float = 1.0


def _number(value: Any, where: str, key: str) -> float:
    """A finite real number (bools are refused: ``weight: yes`` is a typo, not 1.0)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: {key}={value!r} must be a finite number")
    return float(value)


def parse_components(components: Any) -> list[ComponentSpec]:
    """Validate ``[{name, weight=1, kwargs={}, mean=0, std=1}, ...]``; ValueError naming the
    fault."""
    if not isinstance(components, (list, tuple)) or not components:
        raise ValueError(
            "reward components must be a non-empty list like "
            "[{name: jpeg_compressibility, weight: 1.0}, {name: shapes_binding, weight: 0.5}], "
            f"got {components!r}"
        )
    specs = []
    for i, item in enumerate(components):
        where = f"reward component {i}"
        if not isinstance(item, dict):
            # ValueError, like every config mistake, so callers catch one type
            raise ValueError(f"{where}: expected a mapping with a 'name', got {item!r}")  # noqa: TRY004
        unknown = sorted(set(item) - set(COMPONENT_KEYS))
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(COMPONENT_KEYS)}"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: needs a 'name' (a registry reward or package.module:attr)")
        where = f"reward component {i} ({name})"
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{where}: kwargs must be a mapping, got {kwargs!r}")  # noqa: TRY004
        std = _number(item.get("std", 1.0), where, "std")
        if std <= 0:
            raise ValueError(f"{where}: std={std} must be > 0")
        specs.append(
            ComponentSpec(
                name=name,
                weight=_number(item.get("weight", 1.0), where, "weight"),
                kwargs=dict(kwargs),
                mean=_number(item.get("mean", 0.0), where, "mean"),
                std=std,
            )
        )
    return specs


def unique_names(names: list[str]) -> list[str]:
    """["a", "b", "a", "a"] -> ["a", "b", "a_1", "a_2"] (first keeps its name; order preserved)."""
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for name in names:
        if name not in seen:
            seen[name] = 0
            out.append(name)
            continue
        k = seen[name]
        while True:  # skip suffixes that are another component's literal name
            k += 1
            candidate = f"{name}_{k}"
            if candidate not in taken:
                break
        seen[name] = k
        taken.add(candidate)
        out.append(candidate)
    return out


def weighted_total(
    scores: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor
) -> torch.Tensor:
    """total_n = sum_i w_i (s_in - mean_i) / std_i.

    scores (C, N); weights, means, stds (C,). Returns (N,). NaN in any s_in gives NaN total_n.
    """
    normalised = (scores - means[:, None]) / stds[:, None]  # (C, N)
    return (weights[:, None] * normalised).sum(dim=0)  # (N,); sum (not nansum) keeps NaN


class CompositeReward:
    """A weighted sum of normalised component rewards (see the module docstring for the equation).

    Args:
        components: ``[{name, weight=1, kwargs={}, mean=0, std=1}, ...]``; each is built with
            ``build_reward(name, **kwargs)``. Unknown keys, a missing name, a non-numeric weight or
            ``std <= 0`` raise ValueError.
        name: the name used in logs (default ``multi``).

    ``last_components`` is per thread (asynchronous scoring calls from a worker thread, and
    ``score()`` reads it on the thread that made the call), so concurrent calls cannot mix batches.
    """

    def __init__(self, components: list[dict[str, Any]], name: str = "multi") -> None:
        self.specs = parse_components(components)
        self.name = name
        self.rewards: list[Reward] = [build_reward(s.name, **(s.kwargs or {})) for s in self.specs]
        self.component_names = unique_names([s.name for s in self.specs])
        self._weights = torch.tensor([s.weight for s in self.specs], dtype=torch.float64)
        self._means = torch.tensor([s.mean for s in self.specs], dtype=torch.float64)
        self._stds = torch.tensor([s.std for s in self.specs], dtype=torch.float64)
        self._local = threading.local()

    @property
    def last_components(self) -> dict[str, torch.Tensor] | None:
        """{component name: (N,) float32 raw scores} of this thread's latest call (None before
        one)."""
        return getattr(self._local, "components", None)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) float32 weighted total (NaN where any component is
        NaN)."""
        raw = [score(r, images, prompts, metadata).scores for r in self.rewards]  # C x (N,) float32
        # float64 so the weighted sum does not depend on float32 rounding of intermediate terms
        total = weighted_total(torch.stack(raw).double(), self._weights, self._means, self._stds)
        self._local.components = dict(zip(self.component_names, raw))
        return total.to(torch.float32)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: w={s.weight:g}, mean={s.mean:g}, std={s.std:g}"
            for n, s in zip(self.component_names, self.specs)
        )
        return f"CompositeReward({parts})"


def build_reward_from_config(cfg: RewardConfig) -> Reward:
    """``reward:`` config -> reward: ``multi`` combines ``cfg.components``; else ``build_reward``.
    The form is checked by the same ``validate_reward_form`` that ``config.validate`` runs."""
    validate_reward_form(cfg)
    if cfg.name == "multi":
        return CompositeReward(cfg.components)  # type: ignore[arg-type]  (None -> ValueError)
    return build_reward(cfg.name, **cfg.kwargs)


__all__ = [
    "ComponentSpec",
    "CompositeReward",
    "build_reward_from_config",
    "parse_components",
    "unique_names",
    "weighted_total",
]
