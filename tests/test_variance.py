"""Gradient-variance tool: exact statistics, a toy policy with analytic variances, a shapes smoke
test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffloop.algorithms import ALGORITHMS
from diffloop.config import ConfigError, TrainConfig
from diffloop.core import clipped_surrogate_loss, policy_gradient_loss
from diffloop.tools.variance import (
    AlgorithmSpec,
    MomentAccumulator,
    build_setup,
    draw_estimate,
    gradient_statistics,
    jackknife_sems,
    parse_algorithms,
    policy_gradient,
    toy_gaussian_analytic,
    toy_gaussian_gradient_estimates,
    variance_main,
)

# ----------------------------------------------------------------------------- exact statistics


def test_statistics_by_hand():
    grads = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])  # mean (3, 4); variances 4 and 12
    s = gradient_statistics(grads, queries_per_estimate=4)
    assert (s.num_estimates, s.num_params) == (3, 2)
    assert s.trace_cov == pytest.approx(16.0, abs=1e-12)
    assert s.mean_sq_norm == pytest.approx(25.0, abs=1e-12)
    assert s.mean_sq_norm_unbiased == pytest.approx(25.0 - 16.0 / 3, abs=1e-12)
    assert s.snr == pytest.approx(25.0 / 16.0, abs=1e-12)
    assert s.snr_unbiased == pytest.approx((25.0 - 16.0 / 3) / 16.0, abs=1e-12)
    assert s.variance_per_query == pytest.approx(64.0, abs=1e-12)
    assert s.snr_per_query == pytest.approx(25.0 / 64.0, abs=1e-12)


def test_streaming_moments_equal_batch_and_survive_a_large_mean():
    g = 1e6 + torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    acc = MomentAccumulator()
    for row in g:
        acc.add(row)
    streamed, batch = acc.statistics(3), gradient_statistics(g, 3)
    assert streamed.trace_cov == pytest.approx(batch.trace_cov, rel=1e-9)
    assert streamed.mean_sq_norm == pytest.approx(batch.mean_sq_norm, rel=1e-12)
    # The exact per-coordinate variance, computed independently, matches (no cancellation at mean
    # 1e6).
    assert streamed.trace_cov == pytest.approx(float((g - 1e6).var(dim=0).sum()), rel=1e-9)


def test_statistics_need_two_estimates():
    with pytest.raises(ValueError, match="at least 2"):
        gradient_statistics(torch.ones(1, 3), 1)


# -------------------------------------------------------------------------- toy with a known answer

THETA, P, K, M = 1.5, 2, 4, 40_000
CFG = TrainConfig(adv_clip_max=None)  # the analytic variances assume unclipped advantages


def table_advantages(name: str):
    return lambda r: ALGORITHMS[name].advantages(r, [f"p{i}" for i in range(r.shape[0])], CFG, None)


def pg_loss(lp, old, adv):
    return policy_gradient_loss(lp, old, adv)


def toy(advantage_fn, loss_fn=pg_loss, k=K, m=M):
    gen = torch.Generator().manual_seed(0)
    return toy_gaussian_gradient_estimates(THETA, advantage_fn, loss_fn, P, k, m, gen)


@pytest.mark.parametrize(
    "estimator, advantage_fn",
    [
        ("none", lambda r: r),
        ("leave_one_out", table_advantages("reinforce_loo")),
        ("batch_mean", table_advantages("reinforce")),
    ],
)
def test_toy_variance_matches_closed_form(estimator, advantage_fn):
    grads = toy(advantage_fn)
    stats = gradient_statistics(grads, queries_per_estimate=P * K)
    mean, var = toy_gaussian_analytic(estimator, THETA, P, K)
    # Standard errors at M = 40000: the mean ~0.3%, the sample variance ~1% (kurtosis <= 6); fixed
    # seed.
    assert float(grads.mean()) == pytest.approx(mean, abs=4 * math.sqrt(var / M))
    assert stats.trace_cov == pytest.approx(var, rel=0.03)
    assert stats.variance_per_query == pytest.approx(var * P * K, rel=0.03)
    assert stats.snr_unbiased == pytest.approx(mean**2 / var, rel=0.04)


def test_toy_per_query_ranking_is_the_analytic_one():
    # At equal reward queries: leave-one-out 2K/(K-1) (4 at K=2, 8/3 at K=4) beats no baseline,
    # theta^2 + 2.
    per_query = {}
    for k in (2, 4):
        stats = gradient_statistics(toy(table_advantages("reinforce_loo"), k=k), P * k)
        per_query[k] = stats.variance_per_query
        assert per_query[k] == pytest.approx(2 * k / (k - 1), rel=0.03)
    no_baseline = gradient_statistics(toy(lambda r: r), P * K).variance_per_query
    assert no_baseline == pytest.approx(THETA**2 + 2, rel=0.03)
    assert per_query[4] < per_query[2] < no_baseline


def test_toy_loop_equals_reinforce_loo_on_policy():
    # LOOP's clipped loss at ratio 1 has the REINFORCE gradient: same draws, identical estimates.
    def clipped(lp, old, adv):
        return clipped_surrogate_loss(lp, old, adv, 1e-4)

    loo = toy(table_advantages("reinforce_loo"), m=1000)
    loop = toy(table_advantages("loop"), loss_fn=clipped, m=1000)
    torch.testing.assert_close(loop, loo, rtol=0, atol=1e-12)


def test_parse_algorithms():
    assert parse_algorithms("loop@4, ppo@1,grpo") == [
        AlgorithmSpec("loop", 4),
        AlgorithmSpec("ppo", 1),
        AlgorithmSpec("grpo", None),
    ]
    with pytest.raises(ConfigError, match="unknown algorithm 'lop'"):
        parse_algorithms("lop@4")
    with pytest.raises(ConfigError, match="positive integer"):
        parse_algorithms("loop@0")


# ------------------------------------------------------------------------- diffusion (shapes) smoke

# brightness (tests/reward_fns.py): a reward with spread, so every group has non-zero advantages.
TINY = [
    "sample.num_steps=2",
    "sample.prompts_per_epoch=2",
    "sample.batch_size=8",
    "train.batch_size=4",
    "reward.name=reward_fns:brightness",
]


def test_shapes_estimates_are_finite_and_loo_advantages_sum_to_zero(tmp_path):
    trainer = build_setup(None, TINY, AlgorithmSpec("loop", 2))
    num_params = sum(p.numel() for p in trainer.policy.trainable_parameters())
    first, second = draw_estimate(trainer, 0, seed=0), draw_estimate(trainer, 1, seed=0)
    for est in (first, second):
        assert est.grad.shape == (num_params,) and torch.isfinite(est.grad).all()
        assert est.rewards.shape == (2, 2) and est.queries == 4
        torch.testing.assert_close(est.advantages.sum(dim=1), torch.zeros(2), rtol=0, atol=1e-6)
        assert est.onpolicy_logprob_err < 1e-4
    assert not torch.equal(first.grad, second.grad)  # independent draws

    # Clipped (loop) and plain (reinforce_loo) losses give the same on-policy gradient on the same
    # samples.
    traj, _, _ = trainer.sample_and_score(
        ["a red circle and a blue square"] * 4, [1, 2, 3, 4], [{}] * 4
    )
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    steps = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    kw = {"clip_range": 1e-4, "eta": 1.0, "guidance_scale": 3.0, "batch_size": 4}
    clipped, _ = policy_gradient(trainer.policy, traj, adv, ALGORITHMS["loop"].loss_fn, steps, **kw)
    plain, _ = policy_gradient(
        trainer.policy, traj, adv, ALGORITHMS["reinforce_loo"].loss_fn, steps, **kw
    )
    assert clipped.abs().max() > 0
    torch.testing.assert_close(clipped, plain, rtol=1e-6, atol=0)


def test_variance_command_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "v.json"
    code = variance_main(
        [*TINY, "--algorithms", "loop@2,ppo@1", "--estimates", "2", "--output", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["results"]}
    assert set(rows) == {"loop@2", "ppo@1"}
    assert (
        rows["loop@2"]["queries_per_estimate"] == 4 and rows["ppo@1"]["queries_per_estimate"] == 2
    )
    for r in rows.values():
        assert r["num_estimates"] == 2 and r["trace_cov"] > 0 and math.isfinite(r["snr_unbiased"])
        assert r["variance_per_query"] == pytest.approx(r["trace_cov"] * r["queries_per_estimate"])
    assert "| loop@2 | 2 | 4 |" in out.with_suffix(".md").read_text()
    assert "ppo@1" in capsys.readouterr().out


def test_jackknife_by_hand():
    # D = 1, g = 0, 1, 2, 3: sample variance 5/3; delete-one variances 1, 7/3, 7/3, 1 (mean 5/3),
    # squared deviations 4 x 4/9 = 16/9, se = sqrt(3/4 * 16/9) = sqrt(4/3).
    sems = jackknife_sems(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), queries_per_estimate=2)
    assert sems["trace_cov_sem"] == pytest.approx(math.sqrt(4 / 3), rel=1e-12)
    assert sems["variance_per_query_sem"] == pytest.approx(2 * math.sqrt(4 / 3), rel=1e-12)
    with pytest.raises(ValueError, match="at least 3"):
        jackknife_sems(torch.ones(2, 1), 1)


def test_jackknife_sem_matches_the_spread_over_repeated_measurements():
    # 400 independent measurements of M = 32 toy leave-one-out estimates: the jackknife s.e. of one
    # measurement agrees with the actual standard deviation of the statistic across measurements.
    grads = toy(table_advantages("reinforce_loo"), m=400 * 32).reshape(400, 32, 1)
    stats = [gradient_statistics(g, P * K) for g in grads]
    sems = [jackknife_sems(g, P * K) for g in grads[:100]]
    for key in ("trace_cov", "snr_unbiased"):
        actual = float(torch.tensor([getattr(s, key) for s in stats]).std())
        typical = float(torch.tensor([s[f"{key}_sem"] for s in sems]).median())
        assert 0.6 * actual < typical < 1.5 * actual, (key, actual, typical)
