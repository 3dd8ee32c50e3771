"""The flow-matching step (diffloop.core.flow): Euler parity, true Gaussian densities, CPS
marginals, edge sigmas, dtypes, per-sample noise, and the SD3 / FLUX schedules against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffloop import flow_sde_step_with_logprob, flow_step_mean_std
from diffloop.core import exponential_time_shift, flux_sigmas, sd3_shift_sigmas

SDE_TYPES = ("sde", "cps")


def sd3_scheduler(num_steps: int = 10) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(num_steps)
    return s


def _state(n=3, shape=(4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_noise_level_zero_is_the_schedulers_euler_step(sde_type):
    sched = sd3_scheduler()
    x, v = _state(1)
    for i in range(len(sched.timesteps)):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        expected = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
        mean, std = flow_step_mean_std(
            v,
            x,
            sigma,
            sigma_next,
            noise_level=0.0,
            sde_type=sde_type,
            second_sigma=sched.sigmas[1],
        )
        assert float(std.abs().max()) == 0.0
        if sde_type == "sde":  # the same float32 expression: bit-exact
            assert torch.equal(mean, expected)
        else:  # CPS's (1 - s') x0_hat + s' e_hat rearranges to it
            torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_the_gaussian_density_reduced(sde_type, reduction):
    sched = sd3_scheduler()
    x, v = _state(3)
    sigma = sched.sigmas[[0, 3, 7]]  # per-sample steps, including sigma = 1
    sigma_next = sched.sigmas[[1, 4, 8]]
    kw = {"noise_level": 0.7, "sde_type": sde_type, "second_sigma": sched.sigmas[1]}
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x_next, lp = flow_sde_step_with_logprob(
        v, x, sigma, sigma_next, generator=gens, logprob_reduction=reduction, **kw
    )
    mean, std = flow_step_mean_std(v, x, sigma, sigma_next, **kw)
    elementwise = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double())
    dims = tuple(range(1, x.ndim))
    ref = elementwise.mean(dims) if reduction == "mean" else elementwise.sum(dims)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-4)
    # scoring the drawn sample again gives the recorded value exactly (the on-policy ratio is 1)
    again = flow_sde_step_with_logprob(
        v, x, sigma, sigma_next, prev_sample=x_next, logprob_reduction=reduction, **kw
    )[1]
    assert torch.equal(again, lp)


def test_sde_matches_flow_grpo_equations():
    """Flow-GRPO's sde_step_with_logprob written out: std_t = a sqrt(s / (1 - s)), with sigmas[1] in
    the denominator at s = 1; mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s))
    dt."""
    sched = sd3_scheduler()
    x, v = _state(2)
    a = 0.7
    for i in (0, 4):
        s, s_next, s1 = (float(sched.sigmas[k]) for k in (i, i + 1, 1))
        dt = s_next - s
        std_t = math.sqrt(s / (1 - (s1 if s == 1 else s))) * a
        mean_ref = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        mean, std = flow_step_mean_std(v, x, s, s_next, noise_level=a, second_sigma=s1)
        torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-5)
        assert math.isclose(float(std), std_t * math.sqrt(-dt), rel_tol=1e-6)


@pytest.mark.parametrize("noise_level", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("sigmas", [(1.0, 0.6), (0.5, 0.2), (0.3, 0.05)])
def test_cps_with_exact_velocity_reproduces_the_forward_marginal(noise_level, sigmas):
    """Point-mass data x0: x_s = (1 - s) x0 + s e and the exact velocity v = (x - x0) / s; one CPS
    step from the marginal at s must land on the marginal at s': mean (1 - s') x0, std s'."""
    s, s_next = sigmas
    n, d = 20000, 4
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([1.5, -0.5, 0.0, 2.0])
    x = (1 - s) * x0 + s * torch.randn(n, d, generator=g)
    v = (x - x0) / s
    x_next, lp = flow_sde_step_with_logprob(
        v, x, s, s_next, noise_level=noise_level, sde_type="cps", generator=g
    )
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(x_next.mean(0), (1 - s_next) * x0, atol=4 * s_next / n**0.5, rtol=0)
    assert torch.allclose(x_next.std(0), torch.full((d,), s_next), rtol=0.03)


def test_finite_at_sigma_one_and_at_the_last_step():
    sched = sd3_scheduler()
    x, v = _state(2)
    s1 = sched.sigmas[1]
    first = (sched.sigmas[0], sched.sigmas[1])
    last = (sched.sigmas[-2], sched.sigmas[-1])
    assert float(first[0]) == 1.0 and float(last[1]) == 0.0
    for sde_type in SDE_TYPES:
        for s, s_next in (first, last):
            mean, std = flow_step_mean_std(
                v, x, s, s_next, noise_level=1.0, sde_type=sde_type, second_sigma=s1
            )
            assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    # the sde step has a density at both ends; CPS's last step has std 0: refused, never NaN
    for s, s_next in (first, last):
        x_next, lp = flow_sde_step_with_logprob(v, x, s, s_next, noise_level=1.0, second_sigma=s1)
        assert torch.isfinite(x_next).all() and torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="ODE step"):
        flow_sde_step_with_logprob(v, x, *last, noise_level=0.5, sde_type="cps")
    with pytest.raises(ValueError, match="second_sigma"):
        flow_step_mean_std(v, x, *first, noise_level=0.5)


def test_noise_level_zero_has_no_density():
    x, v = _state(1)
    with pytest.raises(ValueError, match="ODE step"):
        flow_sde_step_with_logprob(v, x, 0.5, 0.4, noise_level=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_result_is_float32_whatever_the_input_dtype(dtype):
    x, v = _state(2)
    x_next, lp = flow_sde_step_with_logprob(
        v.to(dtype), x.to(dtype), torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]),
        noise_level=0.7, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert x_next.dtype == torch.float32 and lp.dtype == torch.float32
    mean, std = flow_step_mean_std(v.to(dtype), x.to(dtype), 0.5, 0.4, noise_level=0.7)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32


def test_sample_noise_does_not_depend_on_batch_mates():
    x, v = _state(3)
    kw = {"noise_level": 0.7, "sde_type": "sde"}
    full = flow_sde_step_with_logprob(
        v, x, 0.5, 0.4, generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw
    )[0]
    alone = flow_sde_step_with_logprob(
        v[2:], x[2:], 0.5, 0.4, generator=[torch.Generator().manual_seed(2)], **kw
    )[0]
    assert torch.equal(full[2:], alone)


def test_per_sample_sigma_shape_is_checked():
    x, v = _state(3)
    with pytest.raises(ValueError, match="N=3"):
        flow_step_mean_std(v, x, torch.ones(2) * 0.5, 0.4, noise_level=0.5)


def test_sd3_static_shift_equals_the_scheduler():
    sched = sd3_scheduler(28)
    # the scheduler shifts its training sigmas at construction, then shifts the inference ones again
    sigma_min = sd3_shift_sigmas(1 / 1000, 3.0)
    expected = sd3_shift_sigmas(np.linspace(1.0, sigma_min, 28), 3.0)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("image_seq_len", [256, 4096 // 4 * 3])
def test_flux_shift_equals_the_scheduler(image_seq_len):
    config = {  # FLUX.1-dev scheduler/scheduler_config.json
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    }
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sigmas, mu = flux_sigmas(28, image_seq_len, sched.config)
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    expected = exponential_time_shift(mu, sigmas)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert float(sched.sigmas[-1]) == 0.0
