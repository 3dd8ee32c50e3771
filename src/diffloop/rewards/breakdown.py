"""What an evaluation reward says beyond its mean: a breakdown of the held-out evaluation.

A reward may offer one (optional: a reward without it is evaluated by ``eval_reward_mean``
alone) through a method

    reward.eval_breakdown(images, prompts, metadata, scores) -> {key: BreakdownValues}

    images, prompts, metadata: as in the reward's own call (this process's evaluation images)
    scores:  (N,) float32 CPU, the reward's checked scores of those images (NaN = invalid)
    key:     the metrics.jsonl key its mean is logged under: ``eval_reward_<category>_mean``, the
             mean reward of one category of images (a GenEval tag, a T2I-CompBench category), or
             an exact key declared for a breakdown in ``diffloop.metrics`` (the shapes world's
             ``eval_binding_<attribute>_mean``)
    BreakdownValues(values (N,), members (N,) bool or None): a value per image, and the images
             the mean is over (None: every image)

The trainer gathers every process's values and logs, per key, ``nanmean(values[members])``
(``breakdown_means``); a key with no valid value among its members is left out, never written as
NaN. ``category_breakdown(scores, categories)`` builds the common case: the mean reward per
category, the category of each image read from its prompt or metadata.

Two optional attributes shape the end-of-run summary (``diffloop.summary.summary_lines``):
``breakdown_sections(prompts) -> [BreakdownSection]`` (headings, row labels, notes; without it the
summary lists the run's ``eval_reward_<category>_mean`` keys under "by category"), and
``summary_label`` (the reward's name in the verdict line; default "<reward name> reward").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffloop import metrics
from diffloop.rewards.registry import RewardError, reward_name

CATEGORY_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class BreakdownValues:
    """One breakdown key's per-image data: ``values`` (N,) float (NaN = no valid value) and
    ``members`` (N,) bool, the images its mean is over (None: all N)."""

    values: torch.Tensor
    members: torch.Tensor | None = None


@dataclass(frozen=True)
class BreakdownRow:
    """A line of the summary's breakdown: ``key``'s base -> trained change, named ``label``, with
    ``note`` appended (e.g. why it is empty)."""

    key: str
    label: str
    note: str = ""


@dataclass(frozen=True)
class BreakdownSection:
    """A heading of the summary's breakdown and its rows."""

    heading: str
    rows: tuple[BreakdownRow, ...]


def category_key(category: str) -> str:
    """The metrics.jsonl key of a category's mean reward: ``eval_reward_<category>_mean``."""
    if not CATEGORY_NAME.fullmatch(category):
        raise RewardError(
            f"breakdown category {category!r} must be letters, digits, '_' or '-' (it becomes the "
            f"key {metrics.EVAL_CATEGORY.key})"
        )
    return f"eval_reward_{category}_mean"


def category_breakdown(
    scores: torch.Tensor, categories: Sequence[str | None], names: Iterable[str] | None = None
) -> dict[str, BreakdownValues]:
    """The mean reward per category: scores (N,), categories N names (None: in none) ->
    {``eval_reward_<c>_mean``: the scores, members = the images of category c}, for the
    categories ``names`` (default: those present, in order of first appearance)."""
    if len(categories) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(categories)} categories")
    names = dict.fromkeys(c for c in categories if c is not None) if names is None else names
    return {
        category_key(c): BreakdownValues(
            scores, torch.tensor([x == c for x in categories], dtype=torch.bool)
        )
        for c in names
    }


def breakdown_means(breakdown: Mapping[str, BreakdownValues]) -> dict[str, float]:
    """{key: nanmean(values[members])} for each key with a valid value among its members."""
    out = {}
    for key, part in breakdown.items():
        values = part.values.cpu().float()
        if part.members is not None:
            values = values[part.members.cpu().bool()]
        if bool((~torch.isnan(values)).any()):
            out[key] = float(torch.nanmean(values))
    return out


def evaluation_breakdown(
    reward: Callable[..., Any],
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]],
    scores: torch.Tensor,
) -> dict[str, BreakdownValues]:
    """The reward's ``eval_breakdown`` of N images ({} when it offers none), checked: every key a
    breakdown may write (``metrics.is_breakdown_key``), every tensor (N,) on the CPU. RewardError
    (one line, naming the reward) otherwise."""
    method = getattr(reward, "eval_breakdown", None)
    if method is None:
        return {}
    name, n = reward_name(reward), len(prompts)
    out = {}
    for key, part in method(images, list(prompts), list(metadata), scores).items():
        if not metrics.is_breakdown_key(key):
            raise RewardError(
                f"reward {name!r}: eval_breakdown key {key!r} is not a breakdown key; name a "
                f"category's mean reward {metrics.EVAL_CATEGORY.key} (category_key)"
            )
        values = torch.as_tensor(part.values).detach().cpu().float()
        members = None if part.members is None else torch.as_tensor(part.members).cpu().bool()
        for what, tensor in (("values", values), ("members", members)):
            if tensor is not None and tuple(tensor.shape) != (n,):
                raise RewardError(
                    f"reward {name!r}: eval_breakdown[{key!r}].{what} has shape "
                    f"{tuple(tensor.shape)}; expected ({n},), one per image"
                )
        out[key] = BreakdownValues(values, members)
    return out


def summary_sections(
    reward: Any, prompts: list[str], keys: Iterable[str], label: str
) -> list[BreakdownSection]:
    """How the end-of-run summary shows ``reward``'s breakdown of the evaluation ``prompts``: its
    ``breakdown_sections(prompts)``, else one section "by category (``label``)" with a row per
    ``eval_reward_<category>_mean`` among ``keys`` (the keys the run logged); [] without a
    breakdown."""
    if getattr(reward, "eval_breakdown", None) is None:
        return []
    sections = getattr(reward, "breakdown_sections", None)
    if sections is not None:
        return list(sections(prompts))
    categories = sorted(k for k in set(keys) if metrics.lookup(k) is metrics.EVAL_CATEGORY)
    rows = tuple(
        BreakdownRow(k, k.removeprefix("eval_reward_").removesuffix("_mean")) for k in categories
    )
    return [BreakdownSection(f"by category ({label}):", rows)] if rows else []


def summary_label(reward: Any, name: str | None = None) -> str:
    """The reward's name in the summary: its ``summary_label``, else "<name> reward"."""
    label = getattr(reward, "summary_label", None)
    return label or f"{name or reward_name(reward)} reward"
