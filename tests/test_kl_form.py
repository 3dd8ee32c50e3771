"""train.kl_form (the KL penalty's form) and the Flow-GRPO settings the shipped flow configs carry.

Both KL forms computed by hand on one step, against ``core`` and against the training path
(``loops.step_loss`` on the tiny SD3); flow_grpo refused on a DDIM model; the CPS surrogate
log-ratio equals the true one times 2 std^2 (the clip-range conversion); every shipped flow config
carries its cited Flow-GRPO run's KL weight, EMA and (CPS) clip range.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffloop import loops
from diffloop.algorithms import ALGORITHMS
from diffloop.cli import main
from diffloop.config import ConfigError, LoraConfig, ModelConfig, load_config, packaged_config
from diffloop.core import flow_grpo_kl, flow_grpo_std_dev, flow_step_mean_std, gaussian_kl
from diffloop.policies.sd3 import load_sd3_policy
from diffloop.testing.runs import tiny_overrides
from diffloop.trainer import Trainer

CPU = torch.device("cpu")


def reference_sde_step(v, x, sigma, sigma_next, sigma_max, noise_level):
    """Flow-GRPO's sde_step_with_logprob (sd3_sde_with_logprob.py, sde_type "sde"), transcribed:
    (prev_sample_mean, std_dev_t, sqrt(-dt))."""
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = (
        x * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    return mean, std_dev_t, math.sqrt(-dt)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9601), (0.7073, 0.6022), (0.278, 0.0089)])
def test_both_forms_by_hand_on_one_sde_step(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a, sigma_max = 0.7, 0.9601
    mean, std_dev_t, sqrt_dt = reference_sde_step(v, x, sigma, sigma_next, sigma_max, a)
    mean_ref = reference_sde_step(v_ref, x, sigma, sigma_next, sigma_max, a)[0]
    d2 = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3))  # (2,)
    theirs = d2 / (2 * std_dev_t**2)  # train_sd3.py's kl_loss, per sample
    true_kl = d2 / (2 * (std_dev_t * sqrt_dt) ** 2)  # KL of N(mean, std^2) || N(mean_ref, std^2)

    ours_mean, std = flow_step_mean_std(
        v.float(), x.float(), sigma, sigma_next, noise_level=a, second_sigma=sigma_max
    )
    ours_ref = flow_step_mean_std(
        v_ref.float(), x.float(), sigma, sigma_next, noise_level=a, second_sigma=sigma_max
    )[0]
    torch.testing.assert_close(ours_mean.double(), mean, rtol=1e-5, atol=1e-6)
    got_std_dev = flow_grpo_std_dev(std, sigma, sigma_next, "sde")
    assert got_std_dev.item() == pytest.approx(std_dev_t, rel=1e-6)
    gaussian = gaussian_kl(ours_mean, ours_ref, std, "mean")
    flow_grpo = flow_grpo_kl(ours_mean, ours_ref, got_std_dev)
    torch.testing.assert_close(gaussian.double(), true_kl, rtol=2e-5, atol=0)
    torch.testing.assert_close(flow_grpo.double(), theirs, rtol=2e-5, atol=0)
    # gaussian = flow_grpo / (-dt): 25x at SD3.5's first step, 3.7x at its step 8
    torch.testing.assert_close(gaussian * (sigma - sigma_next), flow_grpo, rtol=1e-5, atol=0)


def test_cps_forms_agree_and_per_sample_sigmas():
    """cps: Flow-GRPO's std_dev_t is the step std itself, so its KL is the mean-reduced Gaussian KL;
    per-sample (N,) sigmas give per-sample std_dev_t."""
    g = torch.Generator().manual_seed(1)
    x, v, v_ref = (torch.randn(3, 5, 8, generator=g) for _ in range(3))  # FLUX's packed (N, L, 4C)
    s, s_next = torch.tensor([1.0, 0.79, 0.48]), torch.tensor([0.9, 0.65, 0.27])
    mean, std = flow_step_mean_std(v, x, s, s_next, noise_level=0.8, sde_type="cps")
    mean_ref = flow_step_mean_std(v_ref, x, s, s_next, noise_level=0.8, sde_type="cps")[0]
    std_dev = flow_grpo_std_dev(std, s, s_next, "cps")
    torch.testing.assert_close(std_dev.reshape(-1), s_next * math.sin(0.4 * math.pi))
    by_hand = ((mean - mean_ref) ** 2).mean(dim=(1, 2)) / (2 * std_dev.reshape(-1) ** 2)
    torch.testing.assert_close(flow_grpo_kl(mean, mean_ref, std_dev), by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std, "mean"), by_hand, rtol=1e-6, atol=0)
    # sde with (N,) sigmas: std_dev_t = std / sqrt(s - s') sample by sample
    _, std_sde = flow_step_mean_std(v, x, s, s_next, noise_level=0.7, second_sigma=0.9)
    expected = 0.7 * torch.sqrt(torch.tensor([1 / (1 - 0.9), 0.79 / 0.21, 0.48 / 0.52]))
    got = flow_grpo_std_dev(std_sde, s, s_next, "sde").reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_step_loss_uses_the_configured_form(tiny_sd3, sde_type):
    """The training path: kl_to_base under kl_form=flow_grpo / gaussian equals each form computed by
    hand from the policy's step Gaussians and the stored sigmas (Flow-GRPO's std_dev_t
    equations)."""
    from diffloop.config import SampleConfig

    torch.manual_seed(0)
    sample = SampleConfig(sde_type=sde_type)
    policy = load_sd3_policy(
        ModelConfig(pretrained=str(tiny_sd3)), LoraConfig(), device=CPU, sample=sample
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a LoRA that moves the mean away from the base model's
        for name, p in policy.named_trainable_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    gens = [torch.Generator().manual_seed(11 + i) for i in range(3)]
    eta = 0.7 if sde_type == "sde" else 0.8
    policy.train(False)
    traj = policy.sample(
        ["a cat", "a dog", "a ball"], gens, num_steps=4, eta=eta, guidance_scale=2.0
    )
    sampler = loops.SamplerSettings(num_steps=4, eta=eta, guidance_scale=2.0)
    step = torch.tensor([0, 1, 2])  # step 0 has sigma = 1: Flow-GRPO's sigmas[1] denominator
    with torch.no_grad():
        mean, std = policy.step_distribution(traj, step, eta=eta, guidance_scale=2.0)
        with policy.reference():
            ref = policy.step_distribution(traj, step, eta=eta, guidance_scale=2.0)[0]
    rows = torch.arange(3)
    s, s_next = traj.extra["sigmas"][rows, step], traj.extra["sigmas"][rows, step + 1]
    if sde_type == "sde":
        denom = torch.where(s == 1, traj.extra["second_sigma"], s)
        std_dev_t = eta * torch.sqrt(s / (1 - denom))
    else:
        std_dev_t = s_next * math.sin(eta * math.pi / 2)
    d2 = ((mean - ref) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    by_hand = {"flow_grpo": d2 / (2 * std_dev_t**2), "gaussian": d2 / (2 * std.reshape(-1) ** 2)}
    for form, expected in by_hand.items():
        settings = loops.LossSettings(ALGORITHMS["loop"].loss_fn, 1e-4, kl_coef=0.5, kl_form=form)
        adv = torch.zeros(3)
        _, stats = loops.step_loss(policy, traj, adv, step, sampler, settings, on_policy=True)
        assert expected.mean() > 0
        torch.testing.assert_close(stats["kl_to_base"], expected.mean(), rtol=1e-5, atol=0)


def test_flow_grpo_form_is_refused_on_a_ddim_model(tiny_sd, tmp_path):
    args = tiny_overrides(
        tiny_sd, tmp_path / "run", **{"train.kl_coef": 0.1, "train.kl_form": "flow_grpo"}
    )
    with pytest.raises(ConfigError, match="train.kl_form=flow_grpo is Flow-GRPO's KL for flow"):
        Trainer(load_config(None, args))


def test_kl_form_and_ema_fields_are_checked_by_check_config(tmp_path, capsys):
    out = f"output_dir={tmp_path / 'run'}"
    with pytest.raises(
        ConfigError, match="train.kl_form='flow-grpo' must be one of gaussian, flow_grpo"
    ):
        load_config(None, [out, "train.kl_form=flow-grpo"])
    assert main(["check-config", out, "train.kl_form=flow-grpo"]) != 0
    assert "train.kl_form" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.ema_decay is null"):
        load_config(None, [out, "train.ema_warmup=true"])
    assert main(["check-config", out, "train.ema_update_interval=8"]) != 0
    assert "train.ema_decay is null" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.ema_update_interval=0"):
        load_config(None, [out, "train.ema_decay=0.9", "train.ema_update_interval=0"])
    ok = [out, "train.ema_decay=0.9", "train.ema_warmup=true", "train.ema_update_interval=8"]
    assert main(["check-config", *ok]) == 0
    # the shapes model is local and a DDIM model: check-config knows it cannot take flow_grpo
    assert main(["check-config", *ok, "train.kl_form=flow_grpo"]) == 2
    assert "train.kl_form=flow_grpo is Flow-GRPO's KL" in capsys.readouterr().err


# ------------------------------------------------------------------------- the CPS clip range


def sd35_sigmas() -> torch.Tensor:
    """SD3.5's 10-step schedule: FlowMatchEulerDiscreteScheduler with its static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    return scheduler.sigmas.float()


def test_cps_surrogate_log_ratio_is_the_true_one_times_two_std_squared():
    """Flow-GRPO's CPS log-prob -mean((x' - mean)^2): its log-ratio between two means is the true
    mean-reduced log-ratio times 2 std^2, so its clip range eps is eps / (2 std^2) on the
    density."""
    from diffloop.core import gaussian_log_prob

    sigmas = sd35_sigmas()
    g = torch.Generator().manual_seed(2)
    x, v_old, v_new = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    for j in range(5):
        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        old, std = flow_step_mean_std(v_old, x, s, s_next, noise_level=0.8, sde_type="cps")
        new = flow_step_mean_std(v_new, x, s, s_next, noise_level=0.8, sde_type="cps")[0]
        x_next = old + std * torch.randn(x.shape, generator=g)
        old, new, std, x_next = old.double(), new.double(), std.double(), x_next.double()
        surrogate = -((x_next - new) ** 2).mean(dim=(1, 2, 3)) + ((x_next - old) ** 2).mean(
            dim=(1, 2, 3)
        )
        true = gaussian_log_prob(x_next, new, std, "mean") - gaussian_log_prob(
            x_next, old, std, "mean"
        )
        torch.testing.assert_close(surrogate / true, (2 * std**2).expand(2), rtol=1e-9, atol=0)


def test_two_std_squared_over_sd35_cps_steps_as_stated():
    """The values core/flow.py's docstring and sd35_fast_cps.yaml state."""
    sigmas = sd35_sigmas()
    zeros = torch.zeros(5, 1)
    std = flow_step_mean_std(
        zeros, zeros, sigmas[:5], sigmas[1:6], noise_level=0.8, sde_type="cps"
    )[1].reshape(-1)
    stated = torch.tensor([1.67, 1.51, 1.33, 1.13, 0.90])
    torch.testing.assert_close(2 * std**2, stated, rtol=0, atol=0.005)


# ------------------------------------------------------------------------- the shipped configs

# config -> (Flow-GRPO config it cites, its beta, its clip range if CPS)
CITED = {
    "sd35_pickscore.yaml": ("pickscore_sd3", 0.01, None),
    "sd35_geneval_blip_vqa.yaml": ("geneval_sd3", 0.04, None),
    "sd35_fast_cps.yaml": ("pickscore_sd3_fast_nocfg", 0.0, 1e-5),
    "flux_pickscore.yaml": ("pickscore_flux", 0.0, None),
    "flux_compbench_color.yaml": ("geneval_flux_fast", 0.0, 1e-5),
}
# Flow-GRPO's EMA blends G = gradient_accumulation_steps times per update (its ema.step runs per
# micro-batch): G = 2 on its 32-GPU SD3.5 layout, 6 on its FLUX one; decay 0.9 per blend.
BLENDS = {"sd35": 2, "flux": 6}


@pytest.mark.parametrize("name", sorted(CITED))
def test_shipped_flow_configs_carry_the_cited_runs_settings(name):
    _, beta, cps_clip = CITED[name]
    assert main(["check-config", name]) == 0
    t = load_config(packaged_config(name)).train
    assert t.kl_coef == beta
    assert beta == 0 or t.kl_form == "flow_grpo"  # beta is a Flow-GRPO-form weight
    assert t.ema_decay == pytest.approx(0.9 ** BLENDS[name.split("_")[0]], abs=0.005)
    assert t.ema_warmup and t.ema_update_interval == 8
    if cps_clip is not None:  # eps / (2 std^2) over the trained window steps (docstring values)
        sample = load_config(packaged_config(name)).sample
        assert sample.sde_type == "cps" and t.logprob_reduction == "mean"
        lo, hi = cps_clip / 1.67, cps_clip / 0.77
        assert lo <= t.clip_range <= hi, (name, t.clip_range)
