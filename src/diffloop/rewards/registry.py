"""Reward registry, and the one place where reward outputs are checked.

The reward protocol
-------------------
A reward is any callable ``reward(images, prompts, metadata) -> scores`` with
    images:   (N, 3, H, W) float tensor in [0, 1], on whatever device the policy runs on;
    prompts:  list[str] of length N;
    metadata: list[dict] of length N (per-prompt extras, e.g. the objects a binding prompt names);
    scores:   anything array-like of length N (torch tensor, numpy array, list of numbers).
A DDPO-style ``(scores, info_dict)`` pair is also accepted; the dict is dropped. Rewards that are
objects carry a ``name`` attribute (used in logs and errors). A reward used for the held-out
evaluation may also offer a breakdown of it (an ``eval_breakdown`` method: per category of images,
a mean logged beside ``eval_reward_mean`` and shown in the end-of-run summary), see
:mod:`diffloop.rewards.breakdown`.

Building a reward
-----------------
``build_reward(name, **kwargs)`` takes either a registered name (``available_rewards()``), whose
factory is called with ``kwargs``, or a user reward written as ``"package.module:attr"``: a class is
instantiated with ``kwargs``; a function is used as the reward itself (``kwargs`` must be empty).
Registered entries may be lazy ``"module:attr"`` strings, so heavy rewards import only when built.

Before anything is built (``diffloop check-config`` and ``diffloop train`` alike), the kwargs are
checked against the factory's signature (``check_reward_kwargs``: unknown names with the closest
accepted one, required ones left out; a factory taking ``**kwargs`` accepts any), and against the
factory's ``check_kwargs(kwargs)`` if it has one (values that need no model: ``remote``'s url).

Invalid-value policy (``score``)
--------------------------------
- The reward RAISES: ``RewardError`` naming the reward, with the original exception chained. The
  run stops there; it keeps its last checkpoint: fix the reward and resume with ``resume=true``.
- The output has the wrong length or shape, or is not numeric: ``RewardError`` saying
  "expected (N,) ... got ...". Scores are never broadcast, squeezed or truncated.
- Some values are NaN or +-inf: they are kept as NaN (inf becomes NaN), counted in
  ``RewardScores.num_invalid`` and logged with a warning. The trainer leaves NaN samples out of
  baselines, advantages and the loss. An invalid score is never silently replaced by zero.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from diffloop.errors import DiffloopError, did_you_mean

logger = logging.getLogger(__name__)


class RewardSpecError(DiffloopError, ValueError):
    """A reward name or ``package.module:attr`` spec that does not resolve (a config mistake)."""


class RewardImportError(RewardSpecError, ImportError):
    """The module of a ``package.module:attr`` reward spec could not be imported."""


class RewardTypeError(RewardSpecError, TypeError):
    """A reward spec resolved to something that is neither a function nor a class."""


class Reward(Protocol):
    """``reward(images (N, 3, H, W) in [0, 1], prompts [N], metadata [N]) -> scores (N,)``."""

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> Any: ...


# name -> factory(**kwargs) -> Reward, or a lazy "module:attr" naming such a factory (or class).
REWARDS: dict[str, str | Callable[..., Reward]] = {
    "jpeg_compressibility": "diffloop.rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "diffloop.rewards.jpeg:jpeg_incompressibility",
    "shapes_binding": "diffloop.shapes.reward:BindingReward",
    "shapes_binding_mean": "diffloop.shapes.reward:PhraseMeanBindingReward",
    "multi": "diffloop.rewards.composite:CompositeReward",
    "remote": "diffloop.rewards.remote:RemoteReward",
    "aesthetic": "diffloop.rewards.aesthetic:AestheticReward",
    "clip_score": "diffloop.rewards.clip:clip_score",
    "pickscore": "diffloop.rewards.clip:pickscore",
    "hpsv2": "diffloop.rewards.hps:HpsV2Reward",
    "imagereward": "diffloop.rewards.imagereward:ImageRewardReward",
    "blip_vqa": "diffloop.rewards.blip_vqa:BlipVqaReward",
}

_SPEC_HELP = (
    "A reward of your own can be given as 'package.module:function' (a function used as the "
    "reward) or 'package.module:Class' (instantiated with the reward's kwargs)."
)


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(REWARDS)


class ScoringFunction:
    """The registry entry of a plain scoring function: a factory taking no kwargs that returns
    it."""

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        self.function, self.name = function, name

    def __call__(self, **kwargs: Any) -> Callable[..., Any]:
        if kwargs:
            raise RewardSpecError(
                f"reward {self.name!r} is a scoring function registered with "
                "register_reward(name, fn), "
                f"so it takes no kwargs (got {sorted(kwargs)}); register a class to configure it"
            )
        return self.function


def register_reward(
    name: str, fn: Callable[..., Any] | None = None, *, replace: bool = False
) -> Any:
    """Register a reward under ``name`` (then ``reward.name=<name>`` in a config builds it).

    ``register_reward(name, fn)``: ``fn`` is a plain scoring function ``(images, prompts,
    metadata) -> scores``, used as the reward itself (it takes no kwargs); returns ``fn``.
    ``@register_reward(name)``: decorates a factory (a class, or a function returning a reward)
    called with reward.kwargs.

    Re-registering the same object is allowed, and so is replacing a lazy entry that names it
    (a module that decorates its own class, already listed lazily here); any other clash raises
    unless ``replace=True`` (a notebook cell defining the function again).
    """

    def add(entry: Any, same: Callable[[Any], bool], spec: str) -> None:
        existing = REWARDS.get(name)
        if existing is not None and not replace and not same(existing) and existing != spec:
            raise ValueError(
                f"reward name {name!r} is already registered to {existing!r}; pick another name or "
                "pass replace=True"
            )
        REWARDS[name] = entry

    if fn is not None:
        if not callable(fn) or inspect.isclass(fn):
            raise TypeError(
                f"register_reward({name!r}, fn): fn must be a scoring function (images, prompts, "
                f"metadata) -> scores, got {fn!r}; decorate a class with @register_reward({name!r})"
            )
        add(ScoringFunction(fn, name), lambda e: e is fn or getattr(e, "function", None) is fn, "")
        return fn

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        add(factory, lambda e: e is factory, f"{factory.__module__}:{factory.__qualname__}")
        return factory

    return decorator


def reward_name(reward: Callable[..., Any]) -> str:
    """A readable name: the ``name`` attribute, else the function's or class's name."""
    name = getattr(reward, "name", None)
    if isinstance(name, str):
        return name
    return getattr(reward, "__name__", None) or type(reward).__name__


def _import_attr(spec: str, reward: str) -> Any:
    """Resolve ``"package.module:attr"`` (attr may be dotted); errors name the module."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardSpecError(
            f"reward {reward!r}: {spec!r} is not of the form 'package.module:attr'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardImportError(
            f"reward {reward!r}: could not import module {module_name!r} ({exc})"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise RewardSpecError(
                f"reward {reward!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    return obj


def _unknown_reward(name: str) -> RewardSpecError:
    names = available_rewards()
    return RewardSpecError(
        f"unknown reward {name!r}.{did_you_mean(name, names)} Available: "
        f"{', '.join(names)}. {_SPEC_HELP}"
    )


def check_reward_name(name: str, kwargs: dict[str, Any] | None = None) -> None:
    """Raise RewardSpecError unless ``name`` is registered or a 'package.module:attr' spec that
    imports and names a class, or a function given no ``kwargs``, and its constructor accepts
    ``kwargs`` (:func:`check_reward_kwargs`). Builds nothing (no weights load): what a config check
    can know before training starts."""
    if name not in REWARDS:
        _resolve_spec(name, kwargs or {})
    check_reward_kwargs(name, kwargs or {})


_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_reward_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """RewardSpecError (one line: the kwarg, the closest accepted name, all accepted ones) unless
    the reward's factory, called with ``kwargs``, would get what its signature takes:

    - every key is one of its keyword parameters (any key when it takes ``**kwargs``);
    - the factory's own ``check_kwargs(kwargs)``, if it has one, passes (values: e.g. ``remote``'s
      url must be http(s)://HOST:PORT);
    - every parameter without a default is given.

    Reads the signature only (``inspect.signature``): imports the factory's module, as building it
    would, but builds nothing and loads no weights. The registered rewards' modules import only
    torch and diffloop at import time. A ``package.module:Class`` reward is the user's code, already
    imported by the name check (:func:`check_reward_name`), so its constructor is checked the same
    way; a function used as the reward itself takes no kwargs (refused by the name check).
    """
    factory, construct = reward_factory(name, kwargs)
    if not construct:
        return  # the reward itself (a function): reward_factory refused any kwargs
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a C callable without a signature: nothing to check against
        return
    accepted = [p.name for p in parameters if p.kind in _KEYWORD]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        for key in kwargs:
            if key not in accepted:
                raise RewardSpecError(
                    f"reward {name!r} takes no kwarg {key!r}.{did_you_mean(key, accepted)} Its "
                    f"kwargs: {', '.join(accepted) or 'none'}; rename or remove {key!r}"
                )
    check = getattr(factory, "check_kwargs", None)
    if callable(check):
        try:
            check(dict(kwargs))
        except (TypeError, ValueError) as exc:
            raise RewardSpecError(f"reward {name!r}: {exc}") from None
    missing = [p.name for p in parameters if p.kind in _KEYWORD and p.default is p.empty]
    missing = [key for key in missing if key not in kwargs]
    if missing:
        raise RewardSpecError(
            f"reward {name!r} needs kwarg(s) {', '.join(missing)} (no default); set them in its "
            "kwargs"
        )


# reward.name of a function given to ``Trainer(reward=...)``: registered for that Python session
# only.
PYTHON_REWARD_PREFIX = "python:"


def _resolve_spec(name: str, kwargs: dict[str, Any]) -> Any:
    """The class, or the function (which takes no kwargs), a 'package.module:attr' spec names."""
    if name.startswith(PYTHON_REWARD_PREFIX):
        raise RewardSpecError(
            f"reward {name!r} was a Python function given to Trainer(reward=...), "
            "registered only in "
            "that Python session: pass it again, register it (register_reward), or name it as "
            "'package.module:function' to train or resume from the command line"
        )
    if ":" not in name:
        raise _unknown_reward(name)
    obj = _import_attr(name, name)
    if not inspect.isclass(obj) and not callable(obj):
        raise RewardTypeError(f"reward {name!r} is a {type(obj).__name__}, not a function or class")
    if not inspect.isclass(obj) and kwargs:
        raise RewardSpecError(
            f"reward {name!r} is a function, used as the reward itself, so it takes no kwargs "
            f"(got {sorted(kwargs)}); make it a class to configure it"
        )
    return obj


def reward_factory(name: str, kwargs: dict[str, Any]) -> tuple[Callable[..., Any], bool]:
    """(what ``build_reward(name, **kwargs)`` uses, whether it is called with ``kwargs``): a
    registered factory or a spec's class (True), or a spec's function, the reward itself (False)."""
    if name in REWARDS:
        entry = REWARDS[name]
        if isinstance(entry, ScoringFunction):  # register_reward(name, fn): fn is the reward itself
            entry(**kwargs)  # RewardSpecError when given kwargs
            return entry.function, False
        return (_import_attr(entry, name) if isinstance(entry, str) else entry), True
    obj = _resolve_spec(name, kwargs)
    return obj, inspect.isclass(obj)


def build_reward(name: str, **kwargs: Any) -> Reward:
    """A reward from a registered name (factory(**kwargs)) or a 'package.module:attr' spec."""
    factory, construct = reward_factory(name, kwargs)
    return factory(**kwargs) if construct else factory


def evaluated_with(name: str) -> str | None:
    """The reward a training reward declares it is judged by (its ``evaluated_with`` attribute:
    a shaped training reward names its target), or None."""
    factory, _ = reward_factory(name, {})
    return getattr(factory, "evaluated_with", None)


def evaluation_reward_name(reward_name_: str, eval_reward: str | None) -> str:
    """The name held-out evaluation scores with: ``eval.reward`` when set, else the training
    reward's declared counterpart (``evaluated_with``), else the training reward itself."""
    return eval_reward or evaluated_with(reward_name_) or reward_name_


class RewardError(DiffloopError, RuntimeError):
    """A reward failed or returned something unusable; the run stops (see the module docstring)."""


@dataclass
class RewardScores:
    """Checked reward output.

    Fields:
        scores:      (N,) float32 on CPU; NaN marks an invalid score (the reward gave NaN or inf).
        num_invalid: number of NaN entries in ``scores``.
        components:  for composite rewards (those with a ``last_components`` attribute), each
                     component's raw (N,) float32 CPU scores by name; None otherwise.
    """

    scores: torch.Tensor
    num_invalid: int
    components: dict[str, torch.Tensor] | None = None

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool, True where the score is usable."""
        return ~torch.isnan(self.scores)


def concat_scores(results: Sequence[RewardScores]) -> RewardScores:
    """Per-batch reward results concatenated (scores, invalid counts, any component scores)."""
    components = None
    if getattr(results[0], "components", None):
        components = {
            k: torch.cat([r.components[k] for r in results]) for k in results[0].components
        }
    out = RewardScores(torch.cat([r.scores for r in results]), sum(r.num_invalid for r in results))
    if components is not None:
        out.components = components
    return out


def _as_float_tensor(output: Any, name: str, n: int) -> torch.Tensor:
    """Reward output -> (N,) float32 CPU tensor, or RewardError ("expected (N,) ... got ...")."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        output = output[0]  # DDPO's (scores, info) convention
    if isinstance(output, torch.Tensor):
        numeric = not output.is_complex()  # bool and integer scores are fine
        values = output.detach().cpu()
    else:
        try:
            array = np.asarray(output)
        except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy refuses
            raise RewardError(
                f"reward {name!r} returned a {type(output).__name__} that is not an array of "
                f"numbers; expected ({n},) numbers"
            ) from exc
        numeric = array.dtype.kind in "biuf"
        values = torch.from_numpy(array.astype(np.float64)) if numeric else None
    if not numeric:
        got = getattr(output, "dtype", type(output).__name__)
        raise RewardError(
            f"reward {name!r} returned non-numeric scores: expected ({n},) numbers, got {got}"
        )
    if tuple(values.shape) != (n,):
        raise RewardError(
            f"reward {name!r} returned the wrong shape: expected ({n},) (one score per image), "
            f"got {tuple(values.shape)}"
        )
    return values.to(torch.float32)


def score(
    reward: Callable[..., Any],
    images: torch.Tensor,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]],
) -> RewardScores:
    """Call ``reward`` and apply the invalid-value policy of this module's docstring.

    images (N, 3, H, W) in [0, 1]; prompts and metadata of length N. Returns (N,) float32 CPU scores
    with NaN for invalid ones; raises RewardError if the reward raises or returns a wrong shape.
    """
    n = images.shape[0]
    if len(prompts) != n or len(metadata) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata")
    name = reward_name(reward)
    try:
        output = reward(images, list(prompts), list(metadata))
    except RewardError:
        raise  # already says what failed and what to do (remote and composite rewards)
    except Exception as exc:
        raise RewardError(
            f"reward {name!r} raised {type(exc).__name__}: {exc}. The run keeps its last "
            "checkpoint; fix the reward and resume with resume=true."
        ) from exc
    scores = _as_float_tensor(output, name, n)
    components = _components(reward, name, n)
    invalid = ~torch.isfinite(scores)
    num_invalid = int(invalid.sum())
    if num_invalid:
        scores = scores.masked_fill(invalid, float("nan"))
        logger.warning(
            "reward %r gave %d of %d invalid scores (NaN/inf) at samples %s; they are kept as NaN "
            "and left out of baselines and the loss",
            name,
            num_invalid,
            n,
            invalid.nonzero().flatten().tolist()[:16],
        )
    return RewardScores(scores=scores, num_invalid=num_invalid, components=components)


def _components(reward: Callable[..., Any], name: str, n: int) -> dict[str, torch.Tensor] | None:
    """The reward's ``last_components`` (set by its call just made) as (N,) float32 CPU tensors."""
    last = getattr(reward, "last_components", None)
    if last is None:
        return None
    return {key: _as_float_tensor(value, f"{name}/{key}", n) for key, value in last.items()}
