"""One stochastic flow-matching step as a Gaussian policy, with its log-density; flow schedules.

Conventions (diffusers ``FlowMatchEulerDiscreteScheduler``): x_s = (1 - s) x0 + s e, s in [0, 1]
(s = 1 pure noise); the model predicts the velocity v ~ e - x0, so

    x0_hat = x - s v,        e_hat = x + (1 - s) v,        dt = s' - s < 0,

and the ODE (Euler) step is x' = x + dt v. With a = noise level in [0, 1], s = sigma, s' =
sigma_next:

"sde" (Flow-GRPO ``sde_step_with_logprob``, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py):
    std_t = a sqrt(s / (1 - s_d)),   s_d = s, except s_d = ``second_sigma`` (the schedule's
                                     sigmas[1]) where s = 1 (Flow-GRPO's convention: no 1/0)
    mean  = x + [v + std_t^2 / (2 s) (x + (1 - s) v)] dt      (Euler-Maruyama of the reverse SDE
                                                               that shares the ODE's marginals)
    std   = std_t sqrt(-dt)
"cps" (coefficients-preserving sampling, Wang & Yu 2025, arXiv 2509.05952):
    std   = s' sin(a pi / 2)
    mean  = (1 - s') x0_hat + s' cos(a pi / 2) e_hat          (= sqrt(s'^2 - std^2) e_hat)
Both:   x' = mean + std z,  z ~ N(0, I);  a = 0 gives the Euler step.

LOG-DENSITY. ``log_prob`` is the TRUE Gaussian log-density log N(x'; mean, std^2 I) per element,
reduced over the non-batch dims ("mean", DDPO's convention: pairs with clip range ~1e-4; or "sum",
the joint density), for both kinds. Flow-GRPO's "sde" log-prob is this density ("mean"); its "cps"
one is the surrogate -mean((x' - mean)^2) (no 1/(2 std^2), no constants). Both models of a ratio
share std, so the surrogate's log-ratio is the true "mean" log-ratio times 2 std^2, and a clip range
eps on the surrogate is eps / (2 std^2) on the true density, a different value per step:
2 std^2 = 1.67, 1.51, 1.33, 1.13, 0.90 over SD3.5's steps 0-4 at 10 shifted steps (shift 3) and
noise level 0.8, so Flow-GRPO-Fast's 1e-5 is 0.60e-5 .. 1.1e-5 here (configs/sd35_fast_cps.yaml).

KL TO THE REFERENCE. ``flow_grpo_kl`` is Flow-GRPO's KL penalty, which divides by the std_dev_t its
step returns: std_t (without sqrt(-dt)) for "sde", the step std for "cps" (``flow_grpo_std_dev``).
For "sde" it is the true mean-reduced KL (``core.losses.gaussian_kl``) times -dt.

A step with zero std (noise level 0, or CPS's last step s' = 0) is an ODE step: it has no density,
and ``flow_sde_step_with_logprob`` refuses it (take it with ``flow_step_mean_std``'s mean).

Step math is float32 whatever the input dtype ("bf16 can overflow", all three reference codebases).
Shape notation: N samples, then any latent dims (C, H, W; or FLUX's packed (L, 4C)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from diffloop.core.ddim import Reduction, draw_noise, gaussian_log_prob

__all__ = [
    "exponential_time_shift",
    "flow_grpo_kl",
    "flow_grpo_std_dev",
    "flow_sde_step_with_logprob",
    "flow_step_mean_std",
    "flux_calculate_shift",
    "flux_sigmas",
    "sd3_shift_sigmas",
]

SdeType = Literal["sde", "cps"]
Sigma = float | torch.Tensor


def _per_sample(value: Sigma | None, sample: torch.Tensor, name: str) -> torch.Tensor | None:
    """A float, 0-d or (N,) tensor -> float32 (N, 1, ..., 1) (or () for scalars) on sample's
    device."""
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).to(sample.device, torch.float32)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != sample.shape[0]:
        raise ValueError(
            f"{name} must be a float, a 0-d tensor or an (N,) tensor with N={sample.shape[0]}, "
            f"got shape {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (sample.ndim - 1)))


def flow_step_mean_std(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    noise_level: float,
    sde_type: SdeType = "sde",
    second_sigma: Sigma | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the flow step p(x' | x) (module docstring's equations), in float32.

    Args:
        model_output: (N, ...) the (guided) velocity v at (x, sigma).
        sample: (N, ...) x at sigma.
        sigma, sigma_next: float, 0-d or (N,) tensors: the step's sigma s and next sigma s' < s.
        noise_level: a in [0, 1] (0: the Euler step, std 0).
        sde_type: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
        second_sigma: "sde" only: the schedule's sigmas[1], used in std_t's denominator where
            s = 1 (Flow-GRPO's convention); required when some s = 1 and a > 0.
    Returns:
        mean (N, ...) float32 (carries model_output's gradient); std float32 of shape () for
        scalar sigmas or (N, 1, ..., 1), >= 0.
    """
    if sde_type not in ("sde", "cps"):
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")
    if not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level must be in [0, 1], got {noise_level}")
    x = sample.float()
    v = model_output.float()
    s = _per_sample(sigma, x, "sigma")
    s_next = _per_sample(sigma_next, x, "sigma_next")
    dt = s_next - s
    if sde_type == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        mean = (1 - s_next) * (x - s * v) + s_next * math.cos(noise_level * math.pi / 2) * (
            x + (1 - s) * v
        )
        return mean, std
    if noise_level == 0:  # exactly the scheduler's Euler step (no 0 * inf where s = 1)
        return x + dt * v, torch.zeros_like(dt)
    at_one = s >= 1
    if bool(at_one.any()):
        if second_sigma is None:
            raise ValueError(
                "sigma = 1 in an 'sde' step needs second_sigma (the schedule's sigmas[1]): "
                "Flow-GRPO's std uses 1 - sigmas[1] as the denominator there"
            )
        s_denominator = torch.where(at_one, _per_sample(second_sigma, x, "second_sigma"), s)
    else:
        s_denominator = s
    std_t = noise_level * torch.sqrt(s / (1 - s_denominator))
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    return mean, std_t * torch.sqrt(-dt)


def flow_sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    noise_level: float,
    sde_type: SdeType = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    logprob_reduction: Reduction = "mean",
    second_sigma: Sigma | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take (or score) one stochastic flow step; return x' and log p(x' | x).

        x' = mean + std z   (if ``prev_sample`` is None),   z ~ N(0, I)
        log_prob = reduce log N(x'; mean, std^2 I)           (a true density, both kinds)

    mean, std are ``flow_step_mean_std``'s (module docstring), so recomputing the log-prob from
    the stored x' with that function gives exactly the recorded value. Gradient flows through the
    mean (the model output), never through prev_sample.

    Args:
        model_output, sample, sigma, sigma_next, noise_level, sde_type, second_sigma: as in
            ``flow_step_mean_std``; every step's std must be > 0 (noise_level > 0, and s' > 0
            for "cps").
        prev_sample: (N, ...) x' to score (training time); None to draw one (sampling).
        generator: None, one ``torch.Generator``, or a list of N (z[i] from generator[i] alone).
        logprob_reduction: "mean" over latent elements (DDPO's; clip ~1e-4) or "sum".
    Returns:
        prev_sample (N, ...) float32; log_prob (N,) float32.
    Raises:
        ValueError: a step with zero std (an ODE step: no density).
    """
    mean, std = flow_step_mean_std(
        model_output, sample, sigma, sigma_next,
        noise_level=noise_level, sde_type=sde_type, second_sigma=second_sigma,
    )  # fmt: skip
    if not bool((std > 0).all()):
        raise ValueError(
            f"a flow step with zero std (noise_level={noise_level}, sde_type={sde_type!r}, "
            "or sigma_next = 0 in 'cps') is an ODE step and has no log-density; take its mean"
        )
    if prev_sample is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
        z = draw_noise(sample.shape, generator, mean.device, torch.float32)
        prev_sample = mean + std * z
    elif prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} must have the shape of sample "
            f"{tuple(sample.shape)}"
        )
    prev_sample = prev_sample.detach().float()
    return prev_sample, gaussian_log_prob(prev_sample, mean, std, logprob_reduction)


# ----------------------------------------------------------------------------- KL to the reference


def flow_grpo_std_dev(std: torch.Tensor, sigma: Sigma, sigma_next: Sigma, sde_type: SdeType):
    """The std_dev_t Flow-GRPO's ``sde_step_with_logprob`` returns, from the step std.

        "sde":  std_dev_t = std_t = std / sqrt(s - s')     (the step std without sqrt(-dt))
        "cps":  std_dev_t = std = s' sin(a pi / 2)          (the step std itself)

    Args:
        std: the step std of ``flow_step_mean_std``: () or (N, 1, ..., 1).
        sigma, sigma_next: float, 0-d or (N,) tensors, s > s'.
        sde_type: "sde" or "cps".
    Returns:
        std_dev_t float32, broadcastable as ``std`` is.
    """
    std = torch.as_tensor(std, dtype=torch.float32)
    if sde_type == "cps":
        return std
    if sde_type != "sde":
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")
    as_float = {"dtype": torch.float32, "device": std.device}
    minus_dt = torch.as_tensor(sigma, **as_float) - torch.as_tensor(sigma_next, **as_float)
    if minus_dt.ndim:  # (N,) -> (N, 1, ..., 1), as std
        minus_dt = minus_dt.reshape(-1, *([1] * (std.ndim - 1)))
    return std / torch.sqrt(minus_dt)


def flow_grpo_kl(
    mean_p: torch.Tensor, mean_q: torch.Tensor, std_dev_t: torch.Tensor | float
) -> torch.Tensor:
    """Flow-GRPO's KL penalty of one step (scripts/train_sd3.py, train_flux.py), per sample.

        KL_fg = mean_elements((mean_p - mean_q)^2) / (2 std_dev_t^2)

    always reduced by the mean over latent elements, whatever the log-prob reduction. With
    std_dev_t from ``flow_grpo_std_dev``: for "sde" (std = std_t sqrt(-dt)) KL_fg equals the true
    mean-reduced KL ``gaussian_kl(mean_p, mean_q, std, "mean")`` times -dt = s - s' (1/25 .. 1/3.7
    of it over SD3.5's 10 shifted steps); for "cps" it equals that KL.

    Args:
        mean_p: (M, ...) the current policy's step mean (with gradient).
        mean_q: same shape, the reference policy's step mean.
        std_dev_t: a float, 0-d or (M, 1, ..., 1) tensor, > 0.
    Returns:
        (M,) per-sample penalty.
    """
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean_p {tuple(mean_p.shape)} and mean_q {tuple(mean_q.shape)} differ")
    dims = tuple(range(1, mean_p.ndim))
    squared = (mean_p - mean_q).pow(2).mean(dim=dims)  # (M,)
    std_dev_t = torch.as_tensor(std_dev_t, dtype=mean_p.dtype, device=mean_p.device)
    return squared / (2.0 * std_dev_t.reshape(-1) ** 2)


# ----------------------------------------------------------------------------- schedules


def sd3_shift_sigmas(sigmas: torch.Tensor | np.ndarray, shift: float):
    """SD3's static shift s <- shift s / (1 + (shift - 1) s) (FlowMatchEulerDiscreteScheduler
    with use_dynamic_shifting=False; shift from the scheduler config, 3.0 for SD3/SD3.5)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FluxPipeline's ``calculate_shift``: mu linear in the packed image sequence length,
    mu = base_shift at base_seq_len and max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def exponential_time_shift(mu: float, sigmas: torch.Tensor | np.ndarray, exponent: float = 1.0):
    """FlowMatchEulerDiscreteScheduler's exponential time shift (``_time_shift_exponential``):
    s <- e^mu / (e^mu + (1 / s - 1)^exponent); the scheduler calls it with exponent 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** exponent)


def flux_sigmas(num_steps: int, image_seq_len: int, scheduler_config) -> tuple[np.ndarray, float]:
    """(sigmas (num_steps,) float64 before the shift, mu) as FluxPipeline passes them to
    ``scheduler.set_timesteps(sigmas=..., mu=...)``: linspace(1, 1/T, T), and mu from
    ``flux_calculate_shift`` with the scheduler config's base/max image sequence lengths and
    shifts."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    get = scheduler_config.get
    mu = flux_calculate_shift(
        image_seq_len,
        get("base_image_seq_len", 256),
        get("max_image_seq_len", 4096),
        get("base_shift", 0.5),
        get("max_shift", 1.15),
    )
    return sigmas, mu
