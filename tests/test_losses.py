from __future__ import annotations

import math

import pytest
import torch

from diffloop.core.advantages import leave_one_out_advantages
from diffloop.core.losses import (
    approx_kl,
    clip_fraction,
    clipped_surrogate_loss,
    gaussian_kl,
    policy_gradient_loss,
)

F64 = torch.float64


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_clipped_loss_hand_computed() -> None:
    eps = 0.2
    old = torch.zeros(4, dtype=F64)
    lp = torch.log(t([1.5, 0.5, 1.5, 0.5]))  # ratios 1.5, 0.5, 1.5, 0.5
    adv = t([2.0, 2.0, -2.0, -2.0])
    # -min(rA, clip(r)A): A>0: -min(3, 2.4) = -2.4; -min(1, 1.6) = -1.0
    #                     A<0: -min(-3, -2.4) = 3.0; -min(-1, -1.6) = 1.6
    loss = clipped_surrogate_loss(lp, old, adv, eps)
    torch.testing.assert_close(loss, t([-2.4, -1.0, 3.0, 1.6]), atol=1e-12, rtol=0)


def test_pg_loss_hand_computed() -> None:
    lp, old = torch.log(t([2.0, 0.5])), torch.zeros(2, dtype=F64)
    torch.testing.assert_close(
        policy_gradient_loss(lp, old, t([1.5, -4.0])), t([-3.0, 2.0]), atol=1e-12, rtol=0
    )


def test_clipped_equals_pg_on_policy_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    feats = torch.randn(6, 6, generator=g, dtype=F64)
    adv = torch.randn(6, generator=g, dtype=F64)

    def log_prob() -> torch.Tensor:
        return torch.tanh(feats @ theta)  # any differentiable function of the parameters

    lp1 = log_prob()
    l_clip = clipped_surrogate_loss(lp1, lp1.detach(), adv, 1e-4)
    (g_clip,) = torch.autograd.grad(l_clip.mean(), theta)
    lp2 = log_prob()
    l_pg = policy_gradient_loss(lp2, lp2.detach(), adv)
    (g_pg,) = torch.autograd.grad(l_pg.mean(), theta)
    torch.testing.assert_close(l_clip, l_pg, atol=0, rtol=0)
    torch.testing.assert_close(l_clip, -adv, atol=0, rtol=0)
    torch.testing.assert_close(g_clip, g_pg, atol=1e-14, rtol=0)
    # ... and both are REINFORCE: -mean(A grad log p).
    (g_reinforce,) = torch.autograd.grad(-(adv * log_prob()).mean(), theta)
    torch.testing.assert_close(g_clip, g_reinforce, atol=1e-14, rtol=0)


@pytest.mark.parametrize(
    ("ratio", "adv", "zero_grad"),
    [
        (1.5, 1.0, True),  # pushed up past 1+eps: clipped
        (0.5, -1.0, True),  # pushed down past 1-eps: clipped
        (0.5, 1.0, False),  # below the range but A>0 wants it up: still learns
        (1.5, -1.0, False),  # above the range but A<0 wants it down: still learns
        (1.1, 1.0, False),  # inside the range
    ],
)
def test_clipping_zeroes_gradient_only_in_push_direction(
    ratio: float, adv: float, zero_grad: bool
) -> None:
    lp = torch.tensor([math.log(ratio)], dtype=F64, requires_grad=True)
    loss = clipped_surrogate_loss(lp, torch.zeros(1, dtype=F64), t([adv]), 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    expected = 0.0 if zero_grad else -adv * ratio  # d(-A e^lp)/dlp
    torch.testing.assert_close(grad, t([expected]), atol=1e-12, rtol=0)


def test_loo_gradient_is_exact_reinforce_with_loo_baseline() -> None:
    # Gaussian policy x ~ N(theta, 1), reward R(x) = x^2: grad_theta E[R] = 2 theta.
    # K=2: the LOO baseline keeps the estimator unbiased; the mean baseline (includes R_i)
    # shrinks it by (K-1)/K = 1/2, so this test tells the two apart.
    torch.manual_seed(0)
    theta0, groups, k = 1.0, 100_000, 2
    theta = torch.tensor(theta0, dtype=F64, requires_grad=True)
    x = theta0 + torch.randn(groups, k, dtype=F64)
    adv = leave_one_out_advantages(x**2)
    lp = (-0.5 * (x - theta) ** 2).reshape(-1)
    loss = clipped_surrogate_loss(lp, lp.detach(), adv.reshape(-1), 1e-4).mean()
    (grad,) = torch.autograd.grad(loss, theta)
    # Per-sample identity: grad = -mean_i A_i d log p_i / d theta = -mean_i A_i (x_i - theta).
    torch.testing.assert_close(grad, -(adv * (x - theta0)).mean(), atol=1e-12, rtol=0)
    # Unbiased: -grad estimates 2 theta = 2 (standard error here ~0.02).
    assert abs(-grad.item() - 2 * theta0) < 0.08
    mean_adv = x**2 - (x**2).mean(dim=1, keepdim=True)
    assert abs((mean_adv * (x - theta0)).mean().item() - theta0) < 0.08  # biased: ~1, not 2


def test_approx_kl_and_clip_fraction() -> None:
    lp, old = t([0.0, 0.3, -0.1, 0.0]), t([0.0, 0.0, 0.0, 0.1])
    kl = approx_kl(lp, old)
    torch.testing.assert_close(kl, torch.tensor(0.5 * (0.09 + 0.01 + 0.01) / 4, dtype=F64))
    # ratios 1, e^0.3 = 1.35, e^-0.1 = 0.905, e^-0.1: with eps 0.2 only the second is out.
    torch.testing.assert_close(clip_fraction(lp, old, 0.2), torch.tensor(0.25, dtype=F64))
    torch.testing.assert_close(clip_fraction(lp, old, 0.05), torch.tensor(0.75, dtype=F64))
    assert not approx_kl(lp.requires_grad_(), old).requires_grad


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mp = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    mq = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=F64).reshape(3, 1, 1, 1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std), torch.distributions.Normal(mq, std)
    )  # (3, 2, 4, 4) elementwise
    torch.testing.assert_close(gaussian_kl(mp, mq, std, "sum"), ref.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_kl(mp, mq, std), ref.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(
        gaussian_kl(mp, mq, 0.5, "sum"), ((mp - mq) ** 2).sum(dim=(1, 2, 3)) / 0.5
    )


def test_shape_checks() -> None:
    with pytest.raises(ValueError, match="one shape"):
        clipped_surrogate_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_surrogate_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)
