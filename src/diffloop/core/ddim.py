"""One stochastic DDIM step as a Gaussian policy, with its exact log-density.

Adapted from diffusers 0.42.1 ``DDIMScheduler.step`` (schedulers/scheduling_ddim.py) and
kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``. Changes:
- returns the step's mean and std (not only a sample), and the log-density of the next sample;
- timesteps may differ per sample ((N,) tensor): alphas_cumprod is indexed here, not by diffusers;
- the final step uses ``final_alpha_cumprod`` when prev_timestep < 0 (ddpo-pytorch clamps the
  index to 0 before testing its sign, so it always uses alphas_cumprod[0] there, which is only right
  when ``set_alpha_to_one=False``);
- noise may come from one generator per sample, so a sample does not depend on its batch mates;
- computed in float32 at least (half inputs are upcast); thresholding is not supported;
  ``use_clipped_model_output`` is not offered (the diffusers pipelines leave it False).

The step (docs/method.md), with a_bar = scheduler.alphas_cumprod,
t_prev = t - T_train // T_inference:

    x0_hat    = (x_t - sqrt(1 - a_bar_t) eps_hat) / sqrt(a_bar_t)        ("epsilon")
              = sqrt(a_bar_t) x_t - sqrt(1 - a_bar_t) v_hat               ("v_prediction")
              = model_output                                              ("sample")
    eps_hat   = model_output                                              ("epsilon")
              = sqrt(a_bar_t) v_hat + sqrt(1 - a_bar_t) x_t               ("v_prediction")
              = (x_t - sqrt(a_bar_t) x0_hat) / sqrt(1 - a_bar_t)          ("sample")
    sigma_t^2 = eta^2 (1 - a_bar_prev) / (1 - a_bar_t) (1 - a_bar_t / a_bar_prev)
    mu        = sqrt(a_bar_prev) x0_hat + sqrt(1 - a_bar_prev - sigma_t^2) eps_hat
    x_{t-1}   = mu + sigma_t z,   z ~ N(0, I)

LOG-PROB REDUCTION. ``log_prob`` is log N(x_{t-1}; mu, sigma_t^2 I) reduced over the C*H*W latent
elements of each sample:
    "mean" (default, DDPO's convention): the per-element average, i.e. the joint log-density / d.
           Ratios exp(lp - lp_old) are then d-th roots of the true density ratios, which is why
           DDPO's PPO clip range is as small as 1e-4. Keep the clip range default matched to it.
    "sum": the exact joint log-density of the d-dimensional Gaussian.

Shape notation: N samples, C, H, W latent channels, height, width (any trailing dims work).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["ddim_step_mean_std", "ddim_step_with_logprob", "gaussian_log_prob"]

Reduction = Literal["mean", "sum"]
Timestep = int | torch.Tensor


def gaussian_log_prob(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | float,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Log-density of x under N(mean, std^2 I), reduced over all non-batch dims.

        log N(x; mu, s^2) = -(x - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)     (per element)

    Args:
        x, mean: (N, ...) of one shape. ``x`` is treated as data (detached).
        std: float, 0-d tensor, or tensor broadcastable to x (e.g. (N, 1, 1, 1)); must be > 0.
        reduction: "mean" (average over elements, DDPO's) or "sum" (exact joint log-density).
    Returns:
        (N,) in the promoted dtype of the inputs (at least float32).
    """
    if x.shape != mean.shape:
        raise ValueError(f"x {tuple(x.shape)} and mean {tuple(mean.shape)} must have one shape")
    dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), torch.float32)
    x = x.detach().to(dtype)
    mean = mean.to(dtype)
    std = torch.as_tensor(std, device=mean.device).to(dtype)
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, lp.ndim))
    if reduction == "mean":
        return lp.mean(dim=dims)
    if reduction == "sum":
        return lp.sum(dim=dims)
    raise ValueError(f"logprob_reduction must be 'mean' or 'sum', got {reduction!r}")


def _alphas(
    scheduler, timestep: Timestep, sample: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """a_bar_t and a_bar_prev, shaped to broadcast against ``sample``: () or (N, 1, ..., 1)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_inference_steps) must be called first")
    table = scheduler.alphas_cumprod  # (T_train,), float32 on the CPU in diffusers
    t = torch.as_tensor(timestep).to(device=table.device, dtype=torch.long)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != sample.shape[0]):
        raise ValueError(
            f"timestep must be an int, a 0-d tensor or an (N,) tensor with N={sample.shape[0]}, "
            f"got shape {tuple(t.shape)}"
        )
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=table.dtype)
    a_t = table[t]
    # Index with prev clamped to 0 only to stay in bounds; the sign test uses the true prev.
    a_prev = torch.where(prev >= 0, table[prev.clamp(min=0)], final)
    shape = (-1,) + (1,) * (sample.ndim - 1) if t.ndim == 1 else ()
    return (
        a_t.reshape(shape).to(device=sample.device, dtype=dtype),
        a_prev.reshape(shape).to(device=sample.device, dtype=dtype),
    )


def ddim_step_mean_std(
    scheduler,
    model_output: torch.Tensor,
    timestep: Timestep,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean mu and std sigma_t of the DDIM step p(x_{t-1} | x_t), and x0_hat (equations above).

    Matches diffusers' ``DDIMScheduler.step(model_output, t, sample, eta, variance_noise=z)``:
    its prev_sample equals ``mean + std * z``.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
        model_output: (N, C, H, W) the (guided) model prediction (eps, v or x0 per
            ``scheduler.config.prediction_type``).
        timestep: int, 0-d tensor, or (N,) tensor (a timestep per sample).
        sample: (N, C, H, W) x_t.
        eta: DDIM's noise weight (0 deterministic, 1 DDPM-like).
    Returns:
        mean (N, C, H, W); std () for a scalar timestep or (N, 1, 1, 1) for per-sample ones;
        pred_original_sample (N, C, H, W). All in promote(sample dtype, float32).
    """
    config = scheduler.config
    if config.thresholding:
        raise NotImplementedError(
            "DDIM with thresholding=True (dynamic thresholding of x0) is not supported by "
            "diffloop's log-prob step; build the scheduler with thresholding=False"
        )
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x_t = sample.to(dtype)
    out = model_output.to(dtype)
    a_t, a_prev = _alphas(scheduler, timestep, sample, dtype)
    b_t = 1 - a_t

    if config.prediction_type == "epsilon":
        x0 = (x_t - b_t**0.5 * out) / a_t**0.5
        eps = out
    elif config.prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t**0.5 * x0) / b_t**0.5
    elif config.prediction_type == "v_prediction":
        x0 = a_t**0.5 * x_t - b_t**0.5 * out
        eps = a_t**0.5 * out + b_t**0.5 * x_t
    else:
        raise ValueError(
            f"prediction_type {config.prediction_type!r} must be 'epsilon', 'sample' or "
            "'v_prediction'"
        )
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    # DDIM eq. (16): sigma_t^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance**0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    return mean, std, x0


def draw_noise(
    shape: torch.Size,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """z ~ N(0, I) of ``shape``; z[i] from generator[i] alone when given a list of generators."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(
            device
        )
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]} samples")
    # Drawn on each generator's device (as diffusers' randn_tensor does), then moved.
    return torch.stack(
        [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in gens]
    )


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: Timestep,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    logprob_reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take (or score) one stochastic DDIM step; return x_{t-1} and log p(x_{t-1} | x_t).

        x_{t-1} = mu + sigma_t z   (if ``prev_sample`` is None),   z ~ N(0, I)
        log_prob = reduce_{C,H,W} log N(x_{t-1}; mu, sigma_t^2)

    The log-prob is of the RETURNED prev_sample (after casting to ``sample``'s dtype), computed in
    float32 or wider, so recomputing it later from the stored latents gives exactly the recorded
    value for the same model output. Gradient flows through mu (the model output), never through
    prev_sample.

    Args:
        scheduler, model_output, timestep, sample, eta: as in ``ddim_step_mean_std``; eta > 0.
        prev_sample: (N, C, H, W) x_{t-1} to score (training time); None to draw one (sampling).
        generator: None, one ``torch.Generator``, or a list of N generators (z[i] drawn from
            generator[i] with shape (C, H, W), so sample i does not depend on its batch mates).
        logprob_reduction: "mean" over latent elements (default, DDPO's; pairs with clip range
            1e-4) or "sum" (exact joint log-density). See the module docstring.
    Returns:
        prev_sample (N, C, H, W) in ``sample``'s dtype; log_prob (N,) in float32 (float64 for
        float64 inputs).
    Raises:
        ValueError: eta <= 0 (the step is deterministic and has no density).
    """
    if not eta > 0:
        raise ValueError(
            f"eta must be > 0 for a stochastic DDIM step with a log-prob, got eta={eta}; "
            "eta = 0 is deterministic (sigma_t = 0), its log-density is undefined"
        )
    mean, std, _ = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
        z = draw_noise(sample.shape, generator, mean.device, mean.dtype)
        prev_sample = (mean + std * z).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} must have the shape of sample "
            f"{tuple(sample.shape)}"
        )
    log_prob = gaussian_log_prob(prev_sample, mean, std, logprob_reduction)
    return prev_sample.detach(), log_prob
