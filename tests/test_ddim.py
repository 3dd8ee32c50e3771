from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffloop.core.ddim import ddim_step_mean_std, ddim_step_with_logprob, gaussian_log_prob

SHAPE = (3, 4, 8, 8)
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def make_scheduler(prediction_type: str = "epsilon", **overrides) -> DDIMScheduler:
    kwargs = {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "prediction_type": prediction_type,
    }
    kwargs.update(overrides)
    s = DDIMScheduler(**kwargs)
    s.set_timesteps(20)
    return s


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def step_indices(s: DDIMScheduler) -> list[int]:
    return [0, 7, len(s.timesteps) - 2, len(s.timesteps) - 1]  # first, middle, last two


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_parity_with_diffusers_step(prediction_type: str, eta: float) -> None:
    s = make_scheduler(prediction_type)
    for i in step_indices(s):
        t = int(s.timesteps[i])
        x, out, z = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
        ref = s.step(out, t, x, eta=eta, variance_noise=z)
        mean, std, x0 = ddim_step_mean_std(s, out, t, x, eta)
        torch.testing.assert_close(mean + std * z, ref.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x0, ref.pred_original_sample, atol=1e-5, rtol=1e-5)
        # The drawn sample matches diffusers' for the same generator state.
        prev, _ = ddim_step_with_logprob(
            s, out, torch.tensor(t), x, eta, generator=torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(prev, ref.prev_sample, atol=1e-5, rtol=1e-5)


def test_std_is_eta_times_ddim_sigma() -> None:
    s = make_scheduler()
    t = int(s.timesteps[5])
    prev_t = t - 1000 // 20
    a_t, a_prev = s.alphas_cumprod[t].double(), s.alphas_cumprod[prev_t].double()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    _, std, _ = ddim_step_mean_std(s, randn(*SHAPE, seed=0), t, randn(*SHAPE, seed=1), 0.7)
    torch.testing.assert_close(std.double(), 0.7 * sigma, atol=1e-7, rtol=0)
    # eta = 0 in mean/std is plain deterministic DDIM.
    x, out = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    mean0, std0, _ = ddim_step_mean_std(s, out, t, x, 0.0)
    assert float(std0) == 0.0
    torch.testing.assert_close(mean0, s.step(out, t, x, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)


def test_last_step_uses_final_alpha_cumprod() -> None:
    # With set_alpha_to_one=True the last step's a_bar_prev is 1, not alphas_cumprod[0].
    s = make_scheduler(set_alpha_to_one=True)
    t = int(s.timesteps[-1])
    x, out, z = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    mean, std, _ = ddim_step_mean_std(s, out, t, x, 1.0)
    assert float(std) == 0.0  # (1 - a_prev) = 0
    ref = s.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(mean + std * z, ref, atol=1e-5, rtol=1e-5)


def test_clip_sample_parity_and_thresholding_raises() -> None:
    s = make_scheduler(clip_sample=True, clip_sample_range=1.0)
    t = int(s.timesteps[3])
    x, out, z = randn(*SHAPE, seed=1), 3 * randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    ref = s.step(out, t, x, eta=1.0, variance_noise=z)
    mean, std, x0 = ddim_step_mean_std(s, out, t, x, 1.0)
    assert x0.abs().max() == 1.0
    torch.testing.assert_close(x0, ref.pred_original_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean + std * z, ref.prev_sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="thresholding"):
        ddim_step_mean_std(make_scheduler(thresholding=True), out, t, x, 1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction: str) -> None:
    s = make_scheduler()
    f64 = torch.float64
    for i in step_indices(s):
        t = int(s.timesteps[i])
        x, out = randn(*SHAPE, seed=1, dtype=f64), randn(*SHAPE, seed=2, dtype=f64)
        mean, std, _ = ddim_step_mean_std(s, out, t, x, 1.0)
        normal = torch.distributions.Normal(mean, std.expand_as(mean))
        # A drawn sample, and an arbitrary point off the sampling distribution.
        gen = torch.Generator().manual_seed(4)
        prev, lp = ddim_step_with_logprob(
            s, out, t, x, 1.0, generator=gen, logprob_reduction=reduction
        )
        other = mean + 3 * std * randn(*SHAPE, seed=5, dtype=f64)
        _, lp_other = ddim_step_with_logprob(
            s, out, t, x, 1.0, prev_sample=other, logprob_reduction=reduction
        )
        for sample, got in ((prev, lp), (other, lp_other)):
            ref = normal.log_prob(sample)
            ref = ref.mean(dim=(1, 2, 3)) if reduction == "mean" else ref.sum(dim=(1, 2, 3))
            assert got.shape == (SHAPE[0],)
            torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-12)


def test_sum_is_mean_times_elements_and_gaussian_log_prob_checks() -> None:
    x, m = randn(2, 3, 4, seed=0, dtype=torch.float64), randn(2, 3, 4, seed=1, dtype=torch.float64)
    torch.testing.assert_close(
        gaussian_log_prob(x, m, 0.3, "sum"), 12 * gaussian_log_prob(x, m, 0.3, "mean")
    )
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, m, 0.3, "max")  # type: ignore[arg-type]


def test_recorded_log_prob_recomputes_exactly_in_half_precision() -> None:
    s = make_scheduler()
    t = int(s.timesteps[-1])  # the last step has the smallest std: the most sensitive one
    x, out = randn(*SHAPE, seed=1).half(), randn(*SHAPE, seed=2).half()
    prev, lp = ddim_step_with_logprob(s, out, t, x, 1.0, generator=torch.Generator().manual_seed(0))
    assert prev.dtype == torch.float16 and lp.dtype == torch.float32
    _, lp_again = ddim_step_with_logprob(s, out, t, x, 1.0, prev_sample=prev)
    torch.testing.assert_close(lp_again, lp, atol=0, rtol=0)


def test_batched_timesteps_equal_per_sample_loop() -> None:
    s = make_scheduler("v_prediction")
    steps = torch.tensor([0, 9, 19])
    ts = s.timesteps[steps]  # (N,) different timestep per sample
    x, out = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    prev = randn(*SHAPE, seed=3)
    mean, std, x0 = ddim_step_mean_std(s, out, ts, x, 1.0)
    assert std.shape == (3, 1, 1, 1)
    _, lp = ddim_step_with_logprob(s, out, ts, x, 1.0, prev_sample=prev)
    for i in range(3):
        sl = slice(i, i + 1)
        m_i, s_i, x0_i = ddim_step_mean_std(s, out[sl], int(ts[i]), x[sl], 1.0)
        _, lp_i = ddim_step_with_logprob(s, out[sl], int(ts[i]), x[sl], 1.0, prev_sample=prev[sl])
        torch.testing.assert_close(mean[sl], m_i, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x0[sl], x0_i, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(std[i].reshape(()), s_i, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(lp[sl], lp_i, atol=1e-5, rtol=1e-6)


def test_generator_list_makes_samples_independent_of_batch() -> None:
    s = make_scheduler()
    t = int(s.timesteps[4])
    x, out = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    prev, lp = ddim_step_with_logprob(s, out, t, x, 1.0, generator=gens)
    for i in range(3):
        sl = slice(i, i + 1)
        alone, lp_alone = ddim_step_with_logprob(
            s, out[sl], t, x[sl], 1.0, generator=torch.Generator().manual_seed(100 + i)
        )
        torch.testing.assert_close(prev[sl], alone, atol=0, rtol=0)
        torch.testing.assert_close(lp[sl], lp_alone, atol=0, rtol=0)
    with pytest.raises(ValueError, match="generators"):
        ddim_step_with_logprob(s, out, t, x, 1.0, generator=gens[:2])


def test_gradient_flows_through_model_output_only() -> None:
    s = make_scheduler()
    t = int(s.timesteps[2])
    x = randn(*SHAPE, seed=1)
    out = randn(*SHAPE, seed=2).requires_grad_()
    prev = randn(*SHAPE, seed=3).requires_grad_()
    _, lp = ddim_step_with_logprob(s, out, t, x, 1.0, prev_sample=prev)
    lp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert prev.grad is None


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_eta_not_positive_raises(eta: float) -> None:
    s = make_scheduler()
    x = randn(*SHAPE, seed=1)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(s, x, int(s.timesteps[0]), x, eta)
