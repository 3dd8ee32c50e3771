"""The inner loops, written once: sampling, timestep choice, the gradient pass, fixed-noise
evaluation.

The trainer, ``diffloop variance``, ``diffloop bench`` and ``diffloop eval`` all call these, so what
they measure is what training does. Every function talks to the model only through the
``DiffusionPolicy`` protocol (``diffloop.policies.base``); log-probabilities are computed here, by
``diffloop.core.gaussian_log_prob``, from the step distribution the policy returns -- the same
function the sampler used to record them, so the on-policy ratio is exactly 1.

Shape notation: N trajectories, T steps each, S trained steps per trajectory, M trajectories in a
minibatch, C, H, W latent dims.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffloop import seeding
from diffloop.config import Config, ConfigError
from diffloop.config.validation import check_kl_form_supported
from diffloop.core import (
    approx_kl,
    clip_fraction,
    flow_grpo_kl,
    gaussian_kl,
    gaussian_log_prob,
)
from diffloop.policies.base import DiffusionPolicy, Trajectories, iter_chunks
from diffloop.rewards import RewardScores, concat_scores, score

# (log_prob (M,), old_log_prob (M,), advantages (M,), clip_range) -> per-element loss (M,)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# (batches, number of batches) -> the same batches, e.g. through a progress bar (the callers' tqdm:
# this module draws nothing itself)
ProgressFn = Callable[[Iterator[Any], int], Iterable[Any]]


def make_generators(device: torch.device, seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per sample, seeded with ``seeds[i]``: sample i's noise is its own."""
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def prompt_major(items: Sequence[Any], k: int) -> list[Any]:
    """Each item k times, in place: (P,) -> (P K,), item i's copies at i K .. i K + K - 1. The
    order of an epoch's samples (sample g belongs to prompt g // K), of the evaluation's images and
    of ``eval_seeds``."""
    return [item for item in items for _ in range(k)]


@dataclass(frozen=True)
class SamplerSettings:
    """How trajectories are drawn (``sample.*`` of the config)."""

    num_steps: int
    eta: float
    guidance_scale: float
    negative_prompt: str = ""

    @classmethod
    def from_config(cls, sample) -> SamplerSettings:
        return cls(sample.num_steps, sample.eta, sample.guidance_scale, sample.negative_prompt)


# ----------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def eval_mode(policy: DiffusionPolicy):
    """The policy in eval mode inside the block (what is sampled is the deterministic network: no
    dropout), back in train mode afterwards."""
    policy.train(False)
    try:
        yield
    finally:
        policy.train(True)


def sample_batches(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: SamplerSettings,
    batch_size: int,
) -> Iterator[tuple[slice, Trajectories]]:
    """Sample one trajectory per (prompt, seed) in batches of ``batch_size``, in eval mode.

    Yields (chunk, trajectories of prompts[chunk]). Sample i is driven by a generator seeded with
    seeds[i] alone, so it does not depend on the batch size or its batch mates.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} for {len(prompts)}")
    device = policy.device
    with eval_mode(policy):
        for chunk in iter_chunks(len(prompts), batch_size):
            traj = policy.sample(
                list(prompts[chunk]),
                make_generators(device, seeds[chunk]),
                num_steps=sampler.num_steps,
                eta=sampler.eta,
                guidance_scale=sampler.guidance_scale,
                negative_prompt=sampler.negative_prompt,
            )
            yield chunk, traj


def sample_and_score(
    policy: DiffusionPolicy,
    reward: Callable[..., Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    metadata: Sequence[dict],
    sampler: SamplerSettings,
    batch_size: int,
    *,
    pool: Executor | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Trajectories, RewardScores, dict[str, float]]:
    """Sample one trajectory per (prompt, seed) in batches (``sample_batches``) and score each
    batch: returns (trajectories, scores, {"sample": s, "reward": s}).

    With a ``pool`` (``reward.asynchronous``) each batch is scored on its thread while the next one
    is sampled (rewards on another device or a remote server then cost no wall-clock time). Reward
    time is the time spent waiting for rewards after sampling ends, plus synchronous scoring.
    """
    parts, pending, reward_wait = [], [], 0.0
    t0 = time.perf_counter()
    batches: Iterable[tuple[slice, Trajectories]] = sample_batches(
        policy, prompts, seeds, sampler, batch_size
    )
    if progress is not None:
        batches = progress(iter(batches), -(-len(prompts) // batch_size))  # ceil: iter_chunks'
    for chunk, traj in batches:
        parts.append(traj)
        job = (reward, traj.images, list(prompts[chunk]), list(metadata[chunk]))
        if pool is not None:
            pending.append(pool.submit(score, *job))
        else:
            t = time.perf_counter()
            pending.append(score(*job))
            reward_wait += time.perf_counter() - t
    t1 = time.perf_counter()
    results = [p.result() if pool is not None else p for p in pending]
    t2 = time.perf_counter()
    timing = {"sample": t1 - t0 - reward_wait, "reward": reward_wait + (t2 - t1)}
    return Trajectories.cat(parts), concat_scores(results), timing


# ----------------------------------------------------------------------------- timesteps


def choose_timesteps(
    num_trajectories: int, window: range, steps_trained: int, generator
) -> torch.Tensor:
    """(N, S) long: each trajectory's own random subset of S of the stored steps in ``window``
    (``config.trained_step_range``), in random order (DDPO's rule when the window is every step)."""
    if not 1 <= steps_trained <= len(window):
        raise ValueError(f"cannot train {steps_trained} steps of a {len(window)}-step window")
    perms = [torch.randperm(len(window), generator=generator) for _ in range(num_trajectories)]
    return torch.stack(perms)[:, :steps_trained] + window.start


# ----------------------------------------------------------------------------- log-probabilities


def transition_log_prob(
    policy: DiffusionPolicy, traj: Trajectories, step: torch.Tensor, sampler: SamplerSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p_theta(x_{t-1} | x_t, c) of the recorded transitions at per-sample ``step`` (M,).

    Returns (log_prob (M,), mean (M, C, H, W), std (broadcastable)); log_prob reduced over latent
    elements by the policy's ``logprob_reduction``, exactly as the sampler recorded it.
    """
    mean, std = policy.step_distribution(
        traj, step, eta=sampler.eta, guidance_scale=sampler.guidance_scale
    )
    rows = torch.arange(len(traj), device=step.device)
    x_prev = traj.latents[rows, step + 1]
    return gaussian_log_prob(x_prev, mean, std, policy.logprob_reduction), mean, std


@torch.no_grad()
def onpolicy_logprob_err(
    policy: DiffusionPolicy, traj: Trajectories, sampler: SamplerSettings
) -> float:
    """max over every step of |log p recomputed by the training path - log p recorded while
    sampling|, at the sampling parameters (0 = the ratio is exactly 1)."""
    worst = 0.0
    for j in range(traj.timesteps.shape[1]):
        step = torch.full((len(traj),), j, dtype=torch.long, device=traj.latents.device)
        log_prob = transition_log_prob(policy, traj, step, sampler)[0]
        worst = max(worst, (log_prob - traj.log_probs[:, j]).abs().max().item())
    return worst


# ----------------------------------------------------------------------------- KL to the base model

# (policy, batch, step (M,), mean, ref_mean, std) -> the step's KL penalty per trajectory (M,)
KlFn = Callable[
    [DiffusionPolicy, Trajectories, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    torch.Tensor,
]


def gaussian_step_kl(
    policy: DiffusionPolicy,
    batch: Trajectories,
    step: torch.Tensor,
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """train.kl_form=gaussian: the true KL of the two step Gaussians, reduced as the log-probs
    (``core.gaussian_kl``): sum_d (mu - mu_ref)^2 / (2 std^2), divided by D under "mean"."""
    return gaussian_kl(mean, ref_mean, std, policy.logprob_reduction)


def flow_grpo_step_kl(
    policy: DiffusionPolicy,
    batch: Trajectories,
    step: torch.Tensor,
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """train.kl_form=flow_grpo: Flow-GRPO's mean_d (mu - mu_ref)^2 / (2 std_dev_t^2)
    (``core.flow_grpo_kl``), std_dev_t from the flow policy (``flow_grpo_std_dev``)."""
    return flow_grpo_kl(mean, ref_mean, policy.flow_grpo_std_dev(batch, step, std))


KL_FORMS: dict[str, KlFn] = {"gaussian": gaussian_step_kl, "flow_grpo": flow_grpo_step_kl}


def supports_kl_form(policy: DiffusionPolicy, kl_form: str) -> bool:
    """Whether ``policy`` can compute ``kl_form`` (flow_grpo needs a flow-matching policy's
    std_t)."""
    return kl_form != "flow_grpo" or hasattr(policy, "flow_grpo_std_dev")


def check_kl_form(policy: DiffusionPolicy, config: Config) -> None:
    """ConfigError unless the loaded model can compute train.kl_form (check-config checks it too
    when model.pretrained is local; a hub id's family is known once it loads)."""
    flow = supports_kl_form(policy, "flow_grpo")
    check_kl_form_supported(config, flow, type(policy).__name__)


def check_timestep_window(policy: DiffusionPolicy, config: Config) -> None:
    """ConfigError unless ``train.timestep_window`` ends within the steps the policy stores (every
    DDIM step; a flow-matching model stores num_steps - 1: its last step is an ODE step)."""
    window = config.train.timestep_window  # the shapes model's default always fits
    if window is None:
        return
    stored = policy.stored_steps(config.sample.num_steps)
    if window[1] > stored:
        raise ConfigError(
            f"train.timestep_window={window}: this model stores {stored} steps per trajectory at "
            f"sample.num_steps={config.sample.num_steps}; set its stop to at most {stored}"
        )


# ----------------------------------------------------------------------------- the gradient pass


@dataclass(frozen=True)
class LossSettings:
    """The per-(trajectory, step) loss: ``loss_fn`` of the algorithm table, plus a KL-to-base term
    of form ``kl_form`` (a key of ``KL_FORMS``).

    ``ratio_to_self``: the old log-prob is the recomputed one, detached (ratio exactly 1 by
    construction: the gradient at the sampling parameters, used by ``diffloop variance``); otherwise
    the one recorded at sampling time (training).
    """

    loss_fn: LossFn
    clip_range: float
    kl_coef: float = 0.0
    log_kl: bool = False
    ratio_to_self: bool = False
    kl_form: str = "gaussian"


def step_loss(
    policy: DiffusionPolicy,
    batch: Trajectories,
    adv: torch.Tensor,
    step: torch.Tensor,
    sampler: SamplerSettings,
    loss: LossSettings,
    *,
    on_policy: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of M trajectories at one step each (``step`` (M,)), with gradient, and its
    statistics.

        L = mean_i loss_fn(log p_theta(x^i_{t-1} | x^i_t), log p_old, A_i) + kl_coef mean_i KL_i

    KL_i is ``KL_FORMS[loss.kl_form]`` (the true Gaussian KL, or Flow-GRPO's form).

    Statistics are device tensors (no host sync): loss, approx_kl = 0.5 mean(log ratio^2)
    (``core.approx_kl``), clipfrac = mean(|ratio - 1| > clip_range) (``core.clip_fraction``),
    ratio_mean, kl_to_base (when computed), onpolicy_logprob_err = max |log p - recorded| (when
    ``on_policy``: no optimizer step since sampling).
    """
    rows = torch.arange(len(batch), device=step.device)
    recorded = batch.log_probs[rows, step]
    log_prob, mean, std = transition_log_prob(policy, batch, step, sampler)
    old = log_prob.detach() if loss.ratio_to_self else recorded
    value = loss.loss_fn(log_prob, old, adv, loss.clip_range).mean()
    kl = None
    if loss.kl_coef > 0 or loss.log_kl:
        with torch.no_grad(), policy.reference():
            ref_mean, _ = policy.step_distribution(
                batch, step, eta=sampler.eta, guidance_scale=sampler.guidance_scale
            )
        kl = KL_FORMS[loss.kl_form](policy, batch, step, mean, ref_mean, std)  # (M,)
        if loss.kl_coef > 0:
            value = value + loss.kl_coef * kl.mean()
    with torch.no_grad():
        log_prob_now = log_prob.detach()
        stats = {
            "loss": value.detach(),
            "approx_kl": approx_kl(log_prob_now, old),
            "clipfrac": clip_fraction(log_prob_now, old, loss.clip_range),
            "ratio_mean": (log_prob_now - old).exp().mean(),
        }
        if kl is not None:
            stats["kl_to_base"] = kl.detach().mean()
        if on_policy:
            stats["onpolicy_logprob_err"] = (log_prob.detach() - recorded).abs().max()
    return value, stats


def minibatch_backward(
    policy: DiffusionPolicy,
    batch: Trajectories,
    adv: torch.Tensor,
    steps: torch.Tensor,
    sampler: SamplerSettings,
    loss: LossSettings,
    *,
    scale: float,
    on_policy: bool,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    gradient_sync: Callable[[bool], None] | None = None,
    ends_step: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Backpropagate ``step_loss / scale`` for each trained step column j of ``steps`` (M, S),
    one backward per (minibatch, step) so memory is one minibatch's; yields each step's statistics.

    The gradients accumulate in the trainable parameters; the caller steps the optimizer.
    ``backward`` lets the trainer scale for fp16 (``GradScaler.scale(loss).backward()``).
    ``gradient_sync(flag)`` is told before each backward whether it is the last one of the
    optimizer step (``ends_step`` and the last column): a sharded model reduces its gradients
    across processes on that backward only (``Distributed.set_gradient_sync``), the earlier ones
    of the step (S per minibatch, ``gradient_accumulation_steps`` minibatches) accumulate locally.
    """
    for j in range(steps.shape[1]):
        value, stats = step_loss(
            policy, batch, adv, steps[:, j], sampler, loss, on_policy=on_policy
        )
        if gradient_sync is not None:
            gradient_sync(ends_step and j == steps.shape[1] - 1)
        backward(value / scale)
        yield stats


class StatAccumulator:
    """Means of ``minibatch_backward``'s per-step statistics (``onpolicy_logprob_err`` is a max),
    summed as tensors on their device so the training loop never waits for the host; ``result``
    converts once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.onpolicy_err: torch.Tensor | None = None

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64)
            if k == "onpolicy_logprob_err":
                self.onpolicy_err = (
                    v if self.onpolicy_err is None else torch.maximum(self.onpolicy_err, v)
                )
                continue
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def result(self) -> dict[str, float]:
        out = {k: float(self.sums[k]) / self.counts[k] for k in self.sums}
        out["onpolicy_logprob_err"] = (
            float(self.onpolicy_err) if self.onpolicy_err is not None else 0.0
        )
        return out


# ----------------------------------------------------------------------------- evaluation


def eval_seeds(seed: int, num_prompts: int, images_per_prompt: int) -> list[int]:
    """Seeds of the P*K evaluation images, prompt-major (image j of prompt i at index i K + j)."""
    return [
        seeding.eval_image_seed(seed, i, j)
        for i in range(num_prompts)
        for j in range(images_per_prompt)
    ]


@torch.no_grad()
def score_fixed_noise(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rewards: Mapping[str, Any],
    sampler: SamplerSettings,
    batch_size: int,
    *,
    metadata: Sequence[dict] | None = None,
    keep_images: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sample (prompt, seed) pairs and score them with every reward: the evaluation loop.

    Returns ({reward name: scores (n,) float32, NaN = invalid}, the first ``keep_images`` (all when
    None) images (k, 3, H, W) float32 in [0, 1] on the CPU). ``progress`` wraps the batches
    (sampled and scored one by one), given their number: the caller's progress bar.
    """
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    keep = len(prompts) if keep_images is None else keep_images
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    kept: list[torch.Tensor] = []
    batches: Iterable[tuple[slice, Trajectories]] = sample_batches(
        policy, prompts, seeds, sampler, batch_size
    )
    if progress is not None:
        batches = progress(iter(batches), -(-len(prompts) // batch_size))  # ceil: iter_chunks'
    for chunk, traj in batches:
        for name, reward in rewards.items():
            scores[name].append(
                score(reward, traj.images, list(prompts[chunk]), metadata[chunk]).scores
            )
        n_keep = max(0, min(chunk.stop, keep) - chunk.start)
        if n_keep:
            kept.append(traj.images[:n_keep].float().cpu())
    out = {name: torch.cat(v) if v else torch.zeros(0) for name, v in scores.items()}
    images = torch.cat(kept) if kept else torch.zeros(0, 3, 1, 1)
    return out, images


def _first_set(*candidates: tuple[Any, str]) -> tuple[Any, str]:
    """The first (value, where it came from) whose value is not None."""
    return next(c for c in candidates if c[0] is not None)


def _evaluation_settings(config: Config, policy) -> dict[str, tuple[Any, str]]:
    """num_steps and eta of the evaluation sampler, each with the setting it came from."""
    e, s = config.eval, config.sample
    convention = "the model's convention"
    return {
        "num_steps": _first_set(
            (e.num_steps, "eval.num_steps"),
            (getattr(policy, "eval_num_steps", None), convention),
            (s.num_steps, "sample.num_steps"),
        ),
        "eta": _first_set(
            (e.eta, "eval.eta"),
            (getattr(policy, "eval_eta", None), convention),
            (s.eta, "sample.eta"),
        ),
    }


def evaluation_sampler(config: Config, policy) -> SamplerSettings:
    """The held-out evaluation's sampler (the trainer's, and ``diffloop eval RUN``'s default).

    steps = eval.num_steps, else the policy's ``eval_num_steps``, else sample.num_steps;
    eta   = eval.eta, else the policy's ``eval_eta``, else sample.eta.
    A flow-matching family declares Flow-GRPO's evaluation (SD3 40, FLUX 28 steps, noise level 0:
    the ODE); a DDIM family declares none, so its evaluation samples as training does. Guidance
    and negative prompt are sample.*'s (Flow-GRPO evaluates with the training guidance)."""
    settings = _evaluation_settings(config, policy)
    s = config.sample
    return SamplerSettings(
        settings["num_steps"][0], settings["eta"][0], s.guidance_scale, s.negative_prompt
    )


def describe_evaluation_sampler(config: Config, policy) -> str:
    """The evaluation sampler in words, each value with its source, for the run header."""
    settings = _evaluation_settings(config, policy)
    (steps, steps_from), (eta, eta_from) = settings["num_steps"], settings["eta"]
    kind = "deterministic" if eta == 0 else "stochastic"
    return (
        f"{steps} steps ({steps_from}), eta {eta:g}: {kind} ({eta_from}), guidance "
        f"{config.sample.guidance_scale:g} (sample.guidance_scale)"
    )


def check_evaluation_sampler(policy, sampler: SamplerSettings) -> None:
    """ConfigError (naming eval.*) unless the policy can sample the evaluation sampler; a policy
    without ``check_evaluation_sampling`` (DDIM: any steps, eta in [0, 1], validated) needs none."""
    check = getattr(policy, "check_evaluation_sampling", None)
    if check is not None:
        check(sampler.num_steps, sampler.eta)


def reward_statistics(rewards: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """The trainer's reward metrics of an epoch: rewards, advantages (B, K), NaN = invalid. With
    the spread within groups (is there signal?)."""
    valid = rewards[~torch.isnan(rewards)]
    group_std = _nanstd(rewards, dim=1)  # (B,)
    return {
        "reward_mean": float(valid.mean()) if valid.numel() else float("nan"),
        "reward_std": float(valid.std(unbiased=False)) if valid.numel() else float("nan"),
        "reward_group_std_mean": float(torch.nanmean(group_std)),
        "reward_zero_spread_groups": float((group_std == 0).float().mean()),
        "advantage_abs_mean": float(torch.nanmean(advantages.abs())),
    }


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    return torch.nanmean((x - mean) ** 2, dim=dim).sqrt()


def eval_summary(rewards: torch.Tensor) -> dict[str, float]:
    """The trainer's evaluation metrics of scores (n,) (NaN = invalid, left out):
    eval_reward_mean = nanmean, eval_reward_std = nanstd (population)."""
    return {
        "eval_reward_mean": float(torch.nanmean(rewards)),
        "eval_reward_std": float(np.nanstd(rewards.numpy())),
    }
