"""Gradient variance of each algorithm's policy-gradient estimator, at fixed parameters.

``diffloop variance [CONFIG] --algorithms loop@4,ppo@1,reinforce@1 --estimates M --output
variance.json``

One *estimate* of algorithm A at parameters theta: sample a batch under A's own scheme (B prompts,
K samples each, K from ``NAME@K`` or the config), score it, compute A's advantages and the gradient
of A's loss at the on-policy point (ratio exactly 1), over every trained (trajectory, timestep)
pair:

    g = -grad_theta 1/(N S) sum_{i, t} loss_A(log p_theta(x^i_{t-1} | x^i_t, c_i), A_i)      (D,)

(N = B K trajectories, S trained timesteps each; the sign makes g an ascent direction; at ratio 1
every loss of the table has gradient -A grad log p). M estimates are drawn from independent prompts
and noise; theta is never updated. From the M x D estimates:

    mean            g_bar = 1/M sum_m g_m
    trace(cov)      tr S = sum_d 1/(M-1) sum_m (g_md - g_bar_d)^2          (unbiased per coordinate)
    ||mean||^2      ||g_bar||^2   (plug-in; E||g_bar||^2 = ||E g||^2 + tr Sigma / M)
    ||E g||^2       ||g_bar||^2 - tr S / M                                  (unbiased)
    SNR             ||g_bar||^2 / tr S   and the unbiased (||g_bar||^2 - tr S / M) / tr S
    per query       variance_per_query = tr S * q,   snr_per_query = SNR / q,
                    q = B K reward queries

Averaging n estimates divides the variance by n, so at a budget of Q reward queries an estimator's
variance is tr Sigma * q / Q: ``variance_per_query`` compares estimators with different K at equal
reward queries (lower is better), ``snr_per_query`` likewise (higher is better). In D ~ 10^4-10^6
dimensions with SNR << 1 the plug-in SNR is dominated by its 1/M bias: read the unbiased one.

Which numbers compare across algorithms: reinforce_loo and loop (identical on-policy) estimate the
same gradient without bias, reinforce (batch-mean baseline) a (N-1)/N multiple of it, so their
variances compare directly. grpo and ppo divide advantages by a standard deviation, which rescales
the gradient: compare them by SNR, which is scale-free. Advantages are clipped as in training (the
algorithm's default, ppo +-5, unless ``train.adv_clip_max`` is set). A KL-to-base penalty
(``train.kl_coef``) is not part of the estimate: it is a deterministic regulariser of theta, not a
policy-gradient term.

ppo's per-prompt stat tracker is frozen: each estimate starts from the same snapshot (empty, or the
checkpointed tracker of ``--from-run``, optionally warmed with ``--ppo-warmup-batches`` extra
batches at theta) and, as in training, appends its own batch before normalising. Estimates stay
independent. With an empty tracker, prompts below ``train.stat_tracking_min_count`` samples use
batch statistics
-- which is what training does until prompts repeat that often.

The statistics are pure functions (tested on a 1-D Gaussian policy whose estimator variances are
known in closed form: ``toy_gaussian_*``); the diffusion estimate reuses the pieces training is made
of (``Setup``: the policy loaded as training loads it, ``loops.sample_and_score``, the algorithm
table's advantages and loss, ``loops.minibatch_backward``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffloop.config import ConfigError
from diffloop.errors import CommandParser

DEFAULT_ALGORITHMS = "loop@2,loop@4,grpo@4,reinforce_loo@4,ppo@1,reinforce@1"
WARMUP_EPOCH_OFFSET = (
    1_000_000  # prompt draws for tracker warm-up: disjoint from the estimates' 0..M-1
)


# ----------------------------------------------------------------------------- statistics (pure)


@dataclass(frozen=True)
class GradientStats:
    """Variance statistics of M gradient estimates in D dimensions (see the module docstring)."""

    num_estimates: int
    num_params: int
    queries_per_estimate: int
    trace_cov: float
    mean_sq_norm: float
    mean_sq_norm_unbiased: float
    snr: float
    snr_unbiased: float
    variance_per_query: float
    snr_per_query: float


def statistics_from_moments(
    count: int, mean: torch.Tensor, m2: torch.Tensor, queries_per_estimate: int
) -> GradientStats:
    """From per-coordinate moments: mean (D,), m2 (D,) = sum_m (g_md - g_bar_d)^2 over ``count`` >=
    2 estimates.

    tr S = sum_d m2_d / (M - 1);  ||g_bar||^2;  unbiased ||E g||^2 = ||g_bar||^2 - tr S / M;
    snr = ||g_bar||^2 / tr S;  variance_per_query = tr S * q;  snr_per_query = snr / q
    """
    if count < 2:
        raise ValueError(f"need at least 2 estimates for a variance, got {count}")
    if mean.shape != m2.shape or mean.ndim != 1:
        raise ValueError(
            f"mean and m2 must both be (D,), got {tuple(mean.shape)} and {tuple(m2.shape)}"
        )
    if queries_per_estimate < 1:
        raise ValueError(f"queries_per_estimate must be >= 1, got {queries_per_estimate}")
    trace = float(m2.double().sum()) / (count - 1)
    sq_norm = float(mean.double().pow(2).sum())
    sq_norm_unbiased = sq_norm - trace / count
    snr = sq_norm / trace if trace > 0 else math.inf
    snr_unbiased = sq_norm_unbiased / trace if trace > 0 else math.inf
    return GradientStats(
        num_estimates=count,
        num_params=mean.numel(),
        queries_per_estimate=queries_per_estimate,
        trace_cov=trace,
        mean_sq_norm=sq_norm,
        mean_sq_norm_unbiased=sq_norm_unbiased,
        snr=snr,
        snr_unbiased=snr_unbiased,
        variance_per_query=trace * queries_per_estimate,
        snr_per_query=snr / queries_per_estimate,
    )


def gradient_statistics(grads: torch.Tensor, queries_per_estimate: int) -> GradientStats:
    """grads (M, D), one estimate a row -> GradientStats (computed in float64)."""
    if grads.ndim != 2:
        raise ValueError(
            f"grads must be (M estimates, D parameters), got shape {tuple(grads.shape)}"
        )
    g = grads.double()
    mean = g.mean(dim=0)
    return statistics_from_moments(
        g.shape[0], mean, (g - mean).pow(2).sum(dim=0), queries_per_estimate
    )


JACKKNIFE_KEYS = ("trace_cov", "mean_sq_norm_unbiased", "snr_unbiased", "variance_per_query")


def jackknife_sems(grads: torch.Tensor, queries_per_estimate: int) -> dict[str, float]:
    """Standard errors of the statistics from grads (M, D) by the delete-one jackknife:

        theta_(i) = statistic of the M - 1 estimates without row i,
        se = sqrt((M - 1) / M * sum_i (theta_(i) - mean_i theta_(i))^2)

    for ``JACKKNIFE_KEYS`` (returned as ``<key>_sem``). Needs M >= 3. O(M^2 D) time, float64.
    An SNR whose s.e. exceeds it is not distinguishable from 0 at this M.
    """
    m = grads.shape[0]
    if m < 3:
        raise ValueError(f"the jackknife needs at least 3 estimates, got {m}")
    g = grads.double()
    loo = [
        gradient_statistics(torch.cat([g[:i], g[i + 1 :]]), queries_per_estimate) for i in range(m)
    ]
    out = {}
    for key in JACKKNIFE_KEYS:
        values = torch.tensor([getattr(st, key) for st in loo], dtype=torch.float64)
        out[f"{key}_sem"] = float(
            math.sqrt((m - 1) / m * float((values - values.mean()).pow(2).sum()))
        )
    return out


class MomentAccumulator:
    """Welford's streaming per-coordinate mean and m2 (float64), so M estimates of D parameters need
    O(D) memory. ``add(g)`` with g (D,); ``statistics(q)`` equals ``gradient_statistics`` of the
    stacked g's."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1).double().cpu()
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(g), torch.zeros_like(g)
        if g.shape != self.mean.shape:
            raise ValueError(
                f"estimate has {g.numel()} parameters, earlier ones {self.mean.numel()}"
            )
        self.count += 1
        delta = g - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (g - self.mean)  # Welford: no cancellation when |mean| >> std

    def statistics(self, queries_per_estimate: int) -> GradientStats:
        if self.mean is None:
            raise ValueError("no estimates added")
        return statistics_from_moments(self.count, self.mean, self.m2, queries_per_estimate)


# ----------------------------------------------------------------------- toy problem (known answer)


def toy_gaussian_gradient_estimates(
    theta: float,
    advantage_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    num_prompts: int,
    k: int,
    num_estimates: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Estimates of grad_theta E[R] for the policy x ~ N(theta, 1), reward R(x) = x (true gradient
    1).

    Each estimate samples rewards (P, K) = theta + eps, takes ``advantage_fn`` (P, K) -> (P, K), and
    differentiates g = -grad mean_i loss_fn(log p_theta(x_i), log p_theta(x_i).detach(), A_i), the
    same on-policy form as the diffusion estimate. All M estimates in one backward: estimate m uses
    its own copy theta_m of the parameter, so d/d theta_m of the summed losses is estimate m alone.
    Returns (M, 1) float64.
    """
    thetas = torch.full(
        (num_estimates, 1, 1), float(theta), dtype=torch.float64, requires_grad=True
    )
    eps = torch.randn(num_estimates, num_prompts, k, generator=generator, dtype=torch.float64)
    x = (thetas + eps).detach()  # samples carry no gradient; only log p does
    adv = torch.vmap(advantage_fn)(
        x
    )  # (M, P, K): per estimate (a batch-mean baseline is per batch)
    log_prob = torch.distributions.Normal(thetas, 1.0).log_prob(x)  # (M, P, K)
    loss = loss_fn(
        log_prob.reshape(-1), log_prob.detach().reshape(-1), torch.nan_to_num(adv).reshape(-1)
    )
    (grad,) = torch.autograd.grad(loss.sum() / (num_prompts * k), thetas)
    return -grad.reshape(num_estimates, 1)


def toy_gaussian_analytic(
    estimator: str, theta: float, num_prompts: int, k: int
) -> tuple[float, float]:
    """(E g, Var g) of the toy's estimators, N = P K samples, eps_i = x_i - theta ~ N(0, 1):

        none          A_i = R_i:               g = 1/N sum (theta + eps_i) eps_i
                                               -> (1, (theta^2 + 2) / N)
        leave_one_out A_i = R_i - mean_{j!=i}: g = mean_p s_p^2 (sample variance of group p,
                                               K-1 dof)
                                               -> (1, 2 / (P (K-1)))
        batch_mean    A_i = R_i - mean_batch:  g = (N-1)/N s^2 over the batch
                                               -> ((N-1)/N, 2 (N-1) / N^2)
    (s^2 ~ chi^2_{n-1} / (n-1) has mean 1 and variance 2 / (n-1).)
    """
    n = num_prompts * k
    if estimator == "none":
        return 1.0, (theta**2 + 2.0) / n
    if estimator == "leave_one_out":
        return 1.0, 2.0 / (num_prompts * (k - 1))
    if estimator == "batch_mean":
        return (n - 1) / n, 2.0 * (n - 1) / n**2
    raise ValueError(f"estimator must be none, leave_one_out or batch_mean, got {estimator!r}")


# ----------------------------------------------------------------------------- diffusion estimates


@dataclass(frozen=True)
class AlgorithmSpec:
    """``NAME`` or ``NAME@K`` on the command line: an algorithm and its samples per prompt (None:
    config's)."""

    name: str
    samples_per_prompt: int | None

    @property
    def label(self) -> str:
        return (
            self.name
            if self.samples_per_prompt is None
            else f"{self.name}@{self.samples_per_prompt}"
        )


def parse_algorithms(text: str) -> list[AlgorithmSpec]:
    from diffloop.algorithms import ALGORITHMS

    specs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, k = item.partition("@")
        if name not in ALGORITHMS:
            raise ConfigError(
                f"--algorithms: unknown algorithm '{name}'; choose from {', '.join(ALGORITHMS)}"
            )
        if k and not (k.isdigit() and int(k) >= 1):
            raise ConfigError(f"--algorithms: '{item}': K after @ must be a positive integer")
        specs.append(AlgorithmSpec(name, int(k) if k else None))
    if not specs:
        raise ConfigError("--algorithms names no algorithm")
    return specs


@dataclass
class Estimate:
    """One draw: grad (D,) float32 on CPU (ascent direction), rewards and advantages (B, K)."""

    grad: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    queries: int
    onpolicy_logprob_err: float
    """max |log p_theta recomputed - log p recorded at sampling|: ~0 confirms theta is the
    sampling policy."""


def policy_gradient(
    policy,
    traj,
    advantages: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor],
    steps: torch.Tensor,
    *,
    clip_range: float,
    eta: float,
    guidance_scale: float,
    batch_size: int,
) -> tuple[torch.Tensor, float]:
    """g = -grad 1/(N S) sum_{i, j} loss_fn(lp_ij, lp_ij.detach(), A_i, eps): the on-policy
    gradient.

    traj: N trajectories; advantages (N,) (NaN -> 0: no gradient, as in training); steps (N, S) step
    indices trained per trajectory. The trainer's gradient pass (``loops.minibatch_backward``) with
    the old log-prob = the recomputed one detached: the ratio is exactly 1, so a clipped loss cannot
    clip on round-off. Returns (g (D,) float32 CPU, max on-policy log-prob error vs the recorded
    log-probs).
    """
    from diffloop import loops
    from diffloop.policies.base import iter_chunks

    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    n, s = steps.shape
    adv = torch.nan_to_num(advantages, nan=0.0).to(policy.device)
    sampler = loops.SamplerSettings(num_steps=s, eta=eta, guidance_scale=guidance_scale)
    settings = loops.LossSettings(loss_fn, clip_range, ratio_to_self=True)
    err = 0.0
    for chunk in iter_chunks(n, batch_size):
        size = chunk.stop - chunk.start  # mean over the chunk / (S N / size) = sum / (N S)
        for stats in loops.minibatch_backward(
            policy,
            traj.index(chunk),
            adv[chunk],
            steps[chunk].to(policy.device),
            sampler,
            settings,
            scale=s * n / size,
            on_policy=True,
        ):
            err = max(err, float(stats["onpolicy_logprob_err"]))
    grad = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    for p in params:
        p.grad = None
    return -grad.detach().float().cpu(), err


@dataclass
class Setup:
    """What estimates under one algorithm need (``build_setup``): the validated config, its
    training prompts, reward and algorithm (a row of ``ALGORITHMS``), ppo's stat tracker (None for
    the others) and the policy, loaded as training loads it."""

    config: Any
    prompt_source: Any
    reward: Callable[..., Any]
    algorithm: Any
    stat_tracker: Any
    policy: Any

    def sample_and_score(self, prompts: list[str], seeds: list[int], metadata: list[dict]) -> Any:
        """(trajectories, scores, timing) of (prompt, seed) pairs, as training samples them
        (``loops.sample_and_score``)."""
        from diffloop import loops

        sampler = loops.SamplerSettings.from_config(self.config.sample)
        batch_size = self.config.sample.batch_size
        return loops.sample_and_score(
            self.policy, self.reward, prompts, seeds, metadata, sampler, batch_size
        )


def draw_estimate(setup: Setup, index: int, seed: int, tracker=None) -> Estimate:
    """Estimate ``index`` under the setup's algorithm and config (B prompts x K samples), at the
    policy's current parameters. Prompts and noise are pure functions of (seed, index)."""
    from diffloop import loops, seeding
    from diffloop.config import trained_steps

    cfg = setup.config
    s, t = cfg.sample, cfg.train
    prompts = setup.prompt_source.sample(s.prompts_per_epoch, seed, index)
    flat = loops.prompt_major(prompts, s.samples_per_prompt)
    seeds = [seeding.variance_noise_seed(seed, index, g) for g in range(len(flat))]
    traj, scores, _ = setup.sample_and_score(
        flat, seeds, [{"estimate": index, "sample_index": g} for g in range(len(flat))]
    )
    rewards = scores.scores.float().cpu().view(s.prompts_per_epoch, s.samples_per_prompt)  # (B, K)
    advantages = setup.algorithm.advantages(rewards, prompts, t, tracker)  # (B, K)
    n, num_steps = traj.timesteps.shape
    gen = torch.Generator().manual_seed(seeding.variance_timestep_seed(seed, index))
    # As in training: each trajectory trains on its own random subset of steps (all when
    # fraction = 1).
    steps = loops.choose_timesteps(n, *trained_steps(cfg, num_steps), gen)
    grad, err = policy_gradient(
        setup.policy, traj, advantages.reshape(-1), setup.algorithm.loss_fn, steps,
        clip_range=t.clip_range, eta=s.eta, guidance_scale=s.guidance_scale,
        batch_size=t.batch_size,
    )  # fmt: skip
    return Estimate(grad, rewards, advantages, len(flat), err)


def algorithm_overrides(config, spec: AlgorithmSpec) -> list[str]:
    """Overrides turning the base config into spec's estimator; settings that only shape training
    (inner epochs, accumulation, evaluation, logging) are neutralised and train.batch_size (memory
    only) made to divide N."""
    from diffloop.config import largest_divisor

    k = spec.samples_per_prompt or config.sample.samples_per_prompt
    n = config.sample.prompts_per_epoch * k
    return [
        f"train.algorithm={spec.name}", f"sample.samples_per_prompt={k}",
        "train.num_inner_epochs=1", "train.gradient_accumulation_steps=1",
        f"train.batch_size={largest_divisor(n, config.train.batch_size)}",
        "eval.prompts=null", "resume=false", "num_epochs=1",
        "logging.tensorboard=false", "logging.wandb=false", "logging.progress_bars=false",
    ]  # fmt: skip


def build_setup(
    config_path: str | None,
    overrides: Sequence[str],
    spec: AlgorithmSpec,
    from_run: Path | None = None,
) -> Setup:
    """The ``Setup`` of spec (the base config with ``algorithm_overrides``), checked as training
    checks it before a model loads, with ``from_run``'s newest parameters and ppo tracker. Nothing
    is written."""
    from diffloop import checkpoint
    from diffloop.algorithms import ALGORITHMS, make_stat_tracker
    from diffloop.config import load_config, unvalidated_config
    from diffloop.distributed import Distributed
    from diffloop.performance import set_backend_flags
    from diffloop.preflight import check_before_loading
    from diffloop.prompts import training_prompt_source
    from diffloop.rewards.composite import build_reward_from_config
    from diffloop.rewards.remote import check_servers
    from diffloop.trainer import load_training_policy

    # may not validate yet: e.g. batch sizes for another K
    base = unvalidated_config(config_path, list(overrides))
    config = load_config(config_path, [*overrides, *algorithm_overrides(base, spec)])
    device = Distributed().device
    set_backend_flags(config.performance, device, config.cpu_threads)
    check_before_loading(config)
    prompt_source = training_prompt_source(config.prompts)
    reward = build_reward_from_config(config.reward)
    check_servers(reward)
    algorithm = ALGORITHMS[config.train.algorithm]
    policy = load_training_policy(config, device)
    tracker = make_stat_tracker(algorithm, config.train)
    if from_run is not None:
        # the newest checkpoint that verifies (an older one, with train's warning, when it is
        # damaged)
        found = checkpoint.load_newest_valid(from_run, rank=0)
        if found is None:
            raise checkpoint.CheckpointError(f"--from-run '{from_run}' has no complete checkpoint")
        _, parts = found
        policy.load_trainable_state_dict(parts["trainable"])
        if tracker is not None and parts["state"].stat_tracker is not None:
            tracker.load_state_dict(parts["state"].stat_tracker)
    return Setup(config, prompt_source, reward, algorithm, tracker, policy)


def warm_stat_tracker(setup: Setup, num_batches: int, seed: int) -> None:
    """Feed ``num_batches`` extra batches (at theta, prompts disjoint from the estimates') to the
    tracker."""
    from diffloop import loops, seeding

    s = setup.config.sample
    for w in range(num_batches):
        prompts = setup.prompt_source.sample(s.prompts_per_epoch, seed, WARMUP_EPOCH_OFFSET + w)
        flat = loops.prompt_major(prompts, s.samples_per_prompt)
        seeds = [
            seeding.variance_noise_seed(seed, WARMUP_EPOCH_OFFSET + w, g) for g in range(len(flat))
        ]
        _, scores, _ = setup.sample_and_score(flat, seeds, [{}] * len(flat))
        setup.stat_tracker.update(flat, scores.scores.float().cpu())


def measure(
    setup: Setup,
    num_estimates: int,
    seed: int,
    ppo_warmup_batches: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[GradientStats, dict[str, float]]:
    """M estimates at the setup's current parameters -> (GradientStats, diagnostics)."""
    from diffloop.algorithms import make_stat_tracker

    snapshot = None
    if setup.stat_tracker is not None:
        warm_stat_tracker(setup, ppo_warmup_batches, seed)
        snapshot = setup.stat_tracker.state_dict()
    acc = MomentAccumulator()
    kept: list[torch.Tensor] = []  # every estimate, for the jackknife standard errors
    reward_sum, err, t0 = 0.0, 0.0, time.perf_counter()
    for m in range(num_estimates):
        tracker = None
        if snapshot is not None:  # frozen: every estimate starts from the same tracker state
            tracker = make_stat_tracker(setup.algorithm, setup.config.train)
            tracker.load_state_dict(snapshot)
        est = draw_estimate(setup, m, seed, tracker)
        acc.add(est.grad)
        kept.append(est.grad.detach().reshape(-1).float().cpu())
        reward_sum += float(torch.nanmean(est.rewards))
        err = max(err, est.onpolicy_logprob_err)
        if (m + 1) % max(1, num_estimates // 4) == 0:
            log(f"  {m + 1}/{num_estimates} estimates ({time.perf_counter() - t0:.0f}s)")
    stats = acc.statistics(est.queries)
    sems = jackknife_sems(torch.stack(kept), est.queries) if num_estimates >= 3 else {}
    diagnostics = {
        **sems,
        "reward_mean": reward_sum / num_estimates,
        "onpolicy_logprob_err": err,
        "time_s": time.perf_counter() - t0,
    }
    return stats, diagnostics


def _pm(row: dict, key: str) -> str:
    sem = row.get(f"{key}_sem")
    return f"{row[key]:.3e}" if sem is None else f"{row[key]:.3e} ± {sem:.1e}"


def variance_markdown(result: dict) -> str:
    lines = [
        (
            f"Gradient variance at {result['parameters']}: {result['estimates']} independent "
            f"estimates per estimator, {result['prompts_per_estimate']} prompts each, "
            f"{result['num_params']} trainable parameters."
        ),
        "",
        (
            "| estimator | K | reward queries / estimate | tr Cov | tr Cov x queries "
            "| ‖E g‖² (unbiased) | SNR (unbiased) | SNR / query | SNR plug-in |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['label']} | {r['samples_per_prompt']} | {r['queries_per_estimate']} "
            f"| {r['trace_cov']:.3e} "
            f"| {_pm(r, 'variance_per_query')} | {_pm(r, 'mean_sq_norm_unbiased')} | "
            f"{_pm(r, 'snr_unbiased')} "
            f"| {r['snr_unbiased'] / r['queries_per_estimate']:.3e} | {r['snr']:.3e} |"
        )
    note = (
        "± values: jackknife standard errors over the estimates. "
        "tr Cov x queries: variance at a budget of one reward query (lower is better); compare it "
        "among loop, reinforce_loo and reinforce, which estimate the same gradient. grpo and ppo "
        "rescale advantages by a std: compare SNR (scale-free; higher is better)."
    )
    lines += ["", note, ""]
    return "\n".join(lines)


VARIANCE_DESCRIPTION = """\
Measure the variance of each algorithm's policy-gradient estimator at fixed parameters: M
independent estimates per algorithm, each from its own sampling scheme, advantages and loss at the
on-policy point (the parameters are never updated)."""

VARIANCE_EPILOG = """\
Each estimate samples a batch under the algorithm's scheme (B prompts, K samples each; K from
NAME@K or the config), scores it and takes the gradient of the algorithm's loss (ratio exactly 1)
over every trained (trajectory, timestep) pair. From M estimates g_1 .. g_M of D parameters:

    trace(cov)   tr S = sum_d 1/(M-1) sum_m (g_md - mean_d)^2
    ||E g||^2    ||mean||^2 - tr S / M                              (unbiased)
    SNR          ||mean||^2 / tr S, and the unbiased (||mean||^2 - tr S / M) / tr S
    per query    variance_per_query = tr S x q, snr_per_query = SNR / q (q = B K reward queries)

variance_per_query compares estimators with different K at equal reward queries (lower is
better), snr_per_query likewise (higher is better). reinforce_loo and loop estimate the same
gradient, reinforce a multiple of it, so their variances compare directly; grpo and ppo divide
advantages by a standard deviation, which rescales the gradient: compare them by SNR, which is
scale-free. A KL penalty (train.kl_coef) is not part of the estimate.

example:
  diffloop variance --algorithms loop@4,ppo@1,reinforce@1 --estimates 32 --output variance.json
"""


def variance_main(argv: list[str]) -> int:
    """``diffloop variance [CONFIG] [k=v ...] --algorithms A@K,... --estimates M --output
    FILE.json``."""
    from diffloop.config import split_config_args

    ap = CommandParser(
        prog="diffloop variance",
        description=VARIANCE_DESCRIPTION,
        epilog=VARIANCE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "args", nargs="*", help="[CONFIG.yaml] [key.sub=value ...] (default: the shapes config)"
    )
    ap.add_argument(
        "--algorithms",
        default=DEFAULT_ALGORITHMS,
        help="comma-separated NAME or NAME@K (default: %(default)s)",
    )
    ap.add_argument(
        "--estimates",
        type=int,
        default=32,
        help="M independent estimates per algorithm, >= 2 (default: %(default)s)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the estimates' prompts and noise")
    ap.add_argument(
        "--from-run",
        type=Path,
        default=None,
        help="a run directory: measure at its newest checkpoint (and its ppo tracker); "
        "default config "
        "is the run's config.yaml",
    )
    ap.add_argument(
        "--ppo-warmup-batches", type=int, default=0, help="extra batches fed to ppo's tracker first"
    )
    ap.add_argument(
        "--output",
        type=Path,
        default=Path("variance.json"),
        help="the JSON file of the results (default: %(default)s)",
    )
    args = ap.parse_intermixed_args(argv)
    if args.estimates < 2:
        raise ConfigError(f"--estimates={args.estimates} must be >= 2")
    if args.from_run is not None and (not args.args or "=" in args.args[0]):
        args.args = [str(args.from_run / "config.yaml"), *args.args]
    config_path, overrides = split_config_args(args.args)
    specs = parse_algorithms(args.algorithms)
    rows = []
    for spec in specs:
        setup = build_setup(config_path, overrides, spec, args.from_run)
        s = setup.config.sample
        print(
            f"{spec.label}: {args.estimates} estimates of {s.prompts_per_epoch} prompts x "
            f"{s.samples_per_prompt} samples"
        )
        stats, diag = measure(setup, args.estimates, args.seed, args.ppo_warmup_batches)
        rows.append(
            {
                "label": spec.label,
                "algorithm": spec.name,
                "samples_per_prompt": s.samples_per_prompt,
                "prompts_per_estimate": s.prompts_per_epoch,
                **asdict(stats),
                **diag,
            }
        )
        del setup  # one model in memory at a time
    result = {
        "config": config_path, "overrides": list(overrides), "seed": args.seed,
        "estimates": args.estimates,
        "parameters": (f"the newest checkpoint of {args.from_run}" if args.from_run
                       else "the initial parameters"),
        "prompts_per_estimate": rows[0]["prompts_per_estimate"],
        "num_params": rows[0]["num_params"],
        "ppo_warmup_batches": args.ppo_warmup_batches, "results": rows,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    markdown = variance_markdown(result)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0
