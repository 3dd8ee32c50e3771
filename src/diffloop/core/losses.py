"""Policy losses and diagnostics, per (trajectory, timestep) element.

Shape notation:
    M  (trajectory, timestep) pairs in a minibatch, flattened
    C, H, W  latent channels, height, width

Conventions:
- ``log_prob`` is log p_theta(x_{t-1} | x_t, c) under the current parameters (carries gradient);
  ``old_log_prob`` is the one recorded at sampling time and ``advantages`` the trajectory's
  advantage repeated over its steps. Both are treated as constants (detached here).
- Losses are returned per element (M,) for the caller to mask (NaN advantages) and average;
  the diagnostics return detached scalars.
- The clip range only means something together with the log-prob reduction: with DDPO's
  mean-over-latent-elements log-prob a clip range of 1e-4 is its default (see ``core.ddim``).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "approx_kl",
    "clip_fraction",
    "clipped_surrogate_loss",
    "gaussian_kl",
    "policy_gradient_loss",
]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape (M,), got {shapes}")


def _ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """rho = exp(log_prob - old_log_prob): (M,)."""
    return torch.exp(log_prob - old_log_prob.detach())


def clipped_surrogate_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """PPO's clipped surrogate, per element (LOOP, PPO/DDPO, GRPO).

        rho    = exp(log_prob - old_log_prob)
        L_clip = -min(rho A, clip(rho, 1-eps, 1+eps) A) = max(-A rho, -A clip(rho, 1-eps, 1+eps))

    At rho = 1 it equals ``policy_gradient_loss`` in value and gradient. Once rho leaves
    [1-eps, 1+eps] in the direction the advantage pushes (rho > 1+eps with A > 0, rho < 1-eps with
    A < 0) the clipped branch wins and the gradient is zero.

    Args:
        log_prob: (M,) current log-probs (with gradient).
        old_log_prob: (M,) sampling-time log-probs.
        advantages: (M,).
        clip_range: eps > 0.
    Returns:
        (M,) per-element loss to minimise.
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    adv = advantages.detach()
    ratio = _ratio(log_prob, old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def policy_gradient_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """REINFORCE loss with an importance ratio and no clipping, per element.

        L_pg = -A rho,   rho = exp(log_prob - old_log_prob)
        grad L_pg = -A rho grad log_prob  =  -A grad log_prob  at the on-policy point (rho = 1)

    Args:
        log_prob, old_log_prob, advantages: (M,).
    Returns:
        (M,) per-element loss to minimise.
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    return -advantages.detach() * _ratio(log_prob, old_log_prob)


@torch.no_grad()
def approx_kl(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """DDPO's KL(old || new) estimate for logging: 0.5 * mean((log_prob - old_log_prob)^2).

    log_prob, old_log_prob: (M,) -> scalar (detached).
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob)
    return 0.5 * torch.mean((log_prob - old_log_prob) ** 2)


@torch.no_grad()
def clip_fraction(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """Fraction of elements whose ratio is outside [1-eps, 1+eps]: mean(|rho - 1| > eps).

    log_prob, old_log_prob: (M,) -> scalar (detached), in the dtype of ``log_prob``.
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob)
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.mean((torch.abs(ratio - 1.0) > clip_range).to(log_prob.dtype))


def gaussian_kl(
    mean_p: torch.Tensor,
    mean_q: torch.Tensor,
    std: torch.Tensor | float,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """KL( N(mean_p, std^2 I) || N(mean_q, std^2 I) ) per sample, for the KL-to-reference penalty.

        per element:  (mean_p - mean_q)^2 / (2 std^2)
        "sum":  the exact KL of the d-dimensional Gaussians, ||mean_p - mean_q||^2 / (2 std^2)
        "mean": that KL divided by d (the number of latent elements)

    Use the same ``reduction`` as the step log-probs (``core.ddim``), so the penalty and the
    log-probs are on one scale.

    Args:
        mean_p: (M, C, H, W) (any (M, ...)), the current policy's step mean (with gradient).
        mean_q: same shape, the reference policy's step mean.
        std: sigma_t, a float, a 0-d tensor or a tensor broadcastable to mean_p (e.g. (M, 1, 1, 1)).
    Returns:
        (M,) KL per sample.
    """
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean_p {tuple(mean_p.shape)} and mean_q {tuple(mean_q.shape)} differ")
    kl = (mean_p - mean_q) ** 2 / (2.0 * torch.as_tensor(std, dtype=mean_p.dtype) ** 2)
    dims = tuple(range(1, kl.ndim))
    if reduction == "mean":
        return kl.mean(dim=dims)
    if reduction == "sum":
        return kl.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
