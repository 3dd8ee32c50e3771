"""SDXL policy: parity with diffusers' StableDiffusionXLPipeline, training through the unchanged
trainer, export, resume, and the scheduler / VAE / negative-prompt traps, on the tiny SDXL built
from configs in ``diffloop.testing.tiny_sdxl``."""

from __future__ import annotations

import pytest
import torch

from diffloop.config import LoraConfig, ModelConfig, SDXLConfig, load_config
from diffloop.core import gaussian_log_prob
from diffloop.policies.diffusers_policy import ModelLoadError
from diffloop.policies.families import detect_family
from diffloop.policies.sdxl import SDXLPolicy, load_sdxl_policy
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import (
    STATEFUL_PPO,
    comparable,
    killed_at_epoch,
    kl_to_base_around_first_step,
    tiny_overrides,
)
from diffloop.testing.tiny_sdxl import build_sdxl_components
from diffloop.trainer import Trainer

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a dog on a bench"]
SEEDS = [11, 12]


def policy_for(path, lora: bool = True, **kwargs) -> SDXLPolicy:
    torch.manual_seed(0)
    return load_sdxl_policy(
        ModelConfig(pretrained=str(path), **kwargs.pop("model", {})),
        LoraConfig(enabled=lora),
        device=CPU,
        **kwargs,
    )


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def recomputed_log_prob(policy, traj, step, eta=1.0, guidance_scale=5.0) -> torch.Tensor:
    """log p_theta(x_{t-1} | x_t) of the recorded transitions, from the policy's step distribution
    (as the trainer computes it: core's gaussian_log_prob)."""
    mean, std = policy.step_distribution(traj, step, eta=eta, guidance_scale=guidance_scale)
    x_prev = traj.latents[torch.arange(len(traj)), step + 1]
    return gaussian_log_prob(x_prev, mean, std, policy.logprob_reduction)


def sdxl_run(model_dir, out, **extra):
    return Trainer(load_config(None, tiny_overrides(model_dir, out, **extra))).train()


# ---------------------------------------------------------------------------------------- parity


def replayed_noise(shape, num_steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x_T (N, C, H, W) and the per-step z's, drawn as the policy's contract says: generator i gives
    sample i's x_T, then one z per step."""
    gens = generators()
    x_t = torch.stack([torch.randn(shape, generator=g) for g in gens])
    steps = [torch.stack([torch.randn(shape, generator=g) for g in gens]) for _ in range(num_steps)]
    return x_t, steps


def scripted_ddim(config, noises: list[torch.Tensor]):
    """A diffusers DDIMScheduler whose stochastic steps use the given z's (variance_noise)."""
    from diffusers import DDIMScheduler

    class ScriptedNoiseDDIM(DDIMScheduler):
        def step(
            self,
            model_output,
            timestep,
            sample,
            eta=0.0,
            use_clipped_model_output=False,
            generator=None,
            variance_noise=None,
            return_dict=True,
        ):
            return super().step(
                model_output,
                timestep,
                sample,
                eta=eta,
                variance_noise=noises.pop(0),
                return_dict=return_dict,
            )

    # diffusers' own conversion, not diffloop's: SDXL's schedule, a non-degenerate last step.
    return ScriptedNoiseDDIM.from_config(config, set_alpha_to_one=False, clip_sample=False)


@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_trajectory_equals_diffusers_sdxl_pipeline(tiny_sdxl, negative_prompt):
    from diffusers import StableDiffusionXLPipeline

    steps, guidance = 4, 5.0
    policy = policy_for(tiny_sdxl, lora=False)
    traj = policy.sample(
        PROMPTS,
        generators(),
        num_steps=steps,
        eta=1.0,
        guidance_scale=guidance,
        negative_prompt=negative_prompt,
    )

    x_t, noises = replayed_noise(policy.latent_shape(), steps)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.scheduler = scripted_ddim(pipe.scheduler.config, noises)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPTS,
        negative_prompt=[negative_prompt] * 2 if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=1.0,
        latents=x_t.clone(),
        output_type="pt",
    ).images
    assert not noises, "the pipeline did not take one stochastic step per DDIM step"
    assert torch.equal(traj.latents[:, 0], x_t)
    assert traj.images.shape == images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(traj.images, images, atol=2e-5, rtol=0)
    # The comparison can fail: without the step noise the images are far apart.
    eta0 = policy.sample(
        PROMPTS,
        generators(),
        num_steps=steps,
        eta=1e-3,
        guidance_scale=guidance,
        negative_prompt=negative_prompt,
    ).images
    assert (eta0 - images).abs().max() > 1e-2


def test_empty_negative_prompt_is_zeros_stored_and_reused(tiny_sdxl):
    policy = policy_for(tiny_sdxl)
    traj = policy.sample(PROMPTS, generators(), num_steps=3, eta=1.0, guidance_scale=5.0)
    assert torch.count_nonzero(traj.negative_prompt_embeds) == 0
    assert torch.count_nonzero(traj.extra["negative_pooled_prompt_embeds"]) == 0
    assert traj.prompt_embeds.shape == (2, 77, 64) and traj.extra["pooled_prompt_embeds"].shape == (
        2,
        32,
    )
    assert traj.extra["add_time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    for j in range(3):
        step = torch.full((2,), j)
        assert torch.equal(recomputed_log_prob(policy, traj, step), traj.log_probs[:, j])
    # Recomputation uses the stored negative conditioning, not a fresh encoding of "" (not zero).
    encoded = policy.encode_prompts_with_pooled([""] * 2)
    assert encoded[0].abs().max() > 0 and encoded[1].abs().max() > 0


def test_micro_conditioning_is_configurable(tiny_sdxl):
    sdxl = SDXLConfig(
        original_size=[1024, 768], crops_coords_top_left=[16, 8], target_size=[64, 64]
    )
    policy = policy_for(tiny_sdxl, model={"sdxl": sdxl})
    assert policy.add_time_ids(1).tolist() == [[1024, 768, 16, 8, 64, 64]]
    base = policy_for(tiny_sdxl).sample(
        PROMPTS, generators(), num_steps=2, eta=1.0, guidance_scale=5.0
    )
    moved = policy.sample(PROMPTS, generators(), num_steps=2, eta=1.0, guidance_scale=5.0)
    assert (base.latents[:, -1] - moved.latents[:, -1]).abs().max() > 1e-4
    smaller = policy_for(tiny_sdxl, model={"sdxl": SDXLConfig(resolution=32)})
    traj = smaller.sample(
        PROMPTS[:1], generators(SEEDS[:1]), num_steps=2, eta=1.0, guidance_scale=5.0
    )
    assert traj.latents.shape[-3:] == (4, 16, 16) and traj.images.shape[-2:] == (32, 32)
    assert traj.extra["add_time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


def test_sample_does_not_depend_on_batch_mates(tiny_sdxl):
    policy = policy_for(tiny_sdxl)
    both = policy.sample(PROMPTS, generators(), num_steps=2, eta=1.0, guidance_scale=5.0)
    alone = policy.sample(
        PROMPTS[1:], generators(SEEDS[1:]), num_steps=2, eta=1.0, guidance_scale=5.0
    )
    # Equal up to batched-matmul rounding (1e-5); another noise draw would differ by O(1).
    torch.testing.assert_close(both.latents[1:], alone.latents, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- loading traps


def test_euler_scheduler_is_converted_safely(tiny_sdxl):
    from diffusers import DDIMScheduler

    naive = DDIMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")
    assert naive.config.set_alpha_to_one and naive.config.clip_sample, (
        "the fixture must carry the defect"
    )
    scheduler = policy_for(tiny_sdxl).scheduler
    assert not scheduler.config.set_alpha_to_one and not scheduler.config.clip_sample
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1


def test_euler_model_trains_with_finite_weights(tiny_sdxl, tmp_path):
    """Regression: DDIM's defaults on SDXL's Euler config: last step's std 0, NaN weights."""
    out = tmp_path / "run"
    config = load_config(None, tiny_overrides(tiny_sdxl, out, num_epochs=2))
    trainer = Trainer(config)
    rows = trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.policy.trainable_parameters())
    assert all(r["loss"] == r["loss"] for r in rows) and rows[-1]["optimizer_steps"] == 4


def test_missing_component_is_named(tiny_sdxl, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(
        ModelLoadError, match=r"tokenizer_2/.*StableDiffusionXLPipeline.save_pretrained"
    ):
        policy_for(broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelLoadError, match="refiner"):
        policy_for(broken)


def test_sample_command_on_an_sdxl_directory(tiny_sdxl, tmp_path):
    from diffloop.cli import main

    out = tmp_path / "samples"
    argv = ["sample", str(tiny_sdxl), "--prompt", "a cat", "--num-per-prompt", "2", "--steps", "2"]
    assert main([*argv, "--device", "cpu", "--output", str(out)]) == 0
    assert list(out.rglob("*.png"))


def test_family_detection(tiny_sdxl, tiny_sd):
    assert detect_family(str(tiny_sdxl)) == "sdxl"
    assert detect_family(str(tiny_sd)) == "sd"
    assert detect_family("shapes") == "sd"


def test_vae_decodes_in_fp32_when_config_asks(tiny_sdxl, tmp_path):
    import json
    import shutil

    policy = policy_for(tiny_sdxl, weight_dtype=torch.bfloat16)
    assert policy.vae.dtype == torch.float32 and policy.unet.dtype == torch.bfloat16
    assert policy.text_encoder_2.dtype == torch.bfloat16
    traj = policy.sample(PROMPTS, generators(), num_steps=2, eta=1.0, guidance_scale=5.0)
    assert torch.isfinite(traj.images).all() and torch.isfinite(traj.log_probs).all()
    # A user-given fp16-safe VAE (force_upcast false) decodes in the weight dtype.
    safe = tmp_path / "fp16_safe_vae"
    shutil.copytree(tiny_sdxl / "vae", safe)
    cfg = json.loads((safe / "config.json").read_text())
    (safe / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    policy = policy_for(
        tiny_sdxl, weight_dtype=torch.bfloat16, model={"sdxl": SDXLConfig(vae=str(safe))}
    )
    assert policy.vae.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("train_batch", [1, 2, 4])
def test_ratio_is_one_on_policy_at_any_minibatch_size(tiny_sdxl, tmp_path, train_batch):
    rows = sdxl_run(
        tiny_sdxl,
        tmp_path / "run",
        num_epochs=1,
        **{"train.batch_size": train_batch, "train.gradient_accumulation_steps": 4 // train_batch},
    )
    assert rows[0]["optimizer_steps"] == 1
    assert rows[0]["onpolicy_logprob_err"] < 1e-5


def test_only_adapter_weights_change_and_export_reproduces_unet(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    trainer = Trainer(
        load_config(
            None, tiny_overrides(tiny_sdxl, out, num_epochs=1, **{"train.learning_rate": 0.1})
        )
    )
    unet = trainer.policy.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    frozen = [
        m for m in (trainer.policy.text_encoder, trainer.policy.text_encoder_2, trainer.policy.vae)
    ]
    frozen_before = [[p.detach().clone() for p in m.parameters()] for m in frozen]
    trainer.train()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), "a frozen UNet parameter changed"
    assert any("lora_B" in n for n in changed)
    for module, saved in zip(frozen, frozen_before):
        assert all(torch.equal(p, q) for p, q in zip(module.parameters(), saved))

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.load_lora_weights(str(out / "lora"))
    assert pipe.unet.peft_config["default_0"].lora_alpha == 4.0
    traj = trainer.policy.sample(PROMPTS, generators(), num_steps=2, eta=1.0, guidance_scale=5.0)
    x, t = traj.latents[:, 1], traj.timesteps[:, 1]
    added = {
        "text_embeds": traj.extra["pooled_prompt_embeds"],
        "time_ids": traj.extra["add_time_ids"],
    }
    with torch.no_grad():
        trained = unet(
            x, t, encoder_hidden_states=traj.prompt_embeds, added_cond_kwargs=added
        ).sample
        reloaded = pipe.unet(
            x, t, encoder_hidden_states=traj.prompt_embeds, added_cond_kwargs=added
        ).sample
        with trainer.policy.reference():
            base = unet(
                x, t, encoder_hidden_states=traj.prompt_embeds, added_cond_kwargs=added
            ).sample
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)
    assert (trained - base).abs().max() > 1e-4, "training did not move the UNet"


def test_full_fine_tuning_exports_a_loadable_pipeline(tiny_sdxl, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    out = tmp_path / "run"
    trainer = Trainer(
        load_config(
            None,
            tiny_overrides(
                tiny_sdxl, out, num_epochs=1, **{"lora.enabled": False, "train.learning_rate": 1e-3}
            ),
        )
    )
    trainer.train()
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "model", add_watermarker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.scheduler.config.set_alpha_to_one
    trained = dict(trainer.policy.unet.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in pipe.unet.named_parameters())
    assert detect_family(str(out / "model")) == "sdxl"


def test_kill_and_resume_equals_uninterrupted(tiny_sdxl, tmp_path):
    extra = {"num_epochs": 3, **STATEFUL_PPO}
    full = sdxl_run(tiny_sdxl, tmp_path / "full", **extra)
    out = tmp_path / "killed"
    with killed_at_epoch(2):
        sdxl_run(tiny_sdxl, out, **extra)
    sdxl_run(tiny_sdxl, out, resume=True, **extra)
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(full)


@pytest.mark.parametrize("algorithm", ["grpo", "reinforce_loo"])
def test_other_algorithms_gradient_checkpointing_and_kl(tiny_sdxl, tmp_path, algorithm):
    rows = sdxl_run(
        tiny_sdxl,
        tmp_path / "run",
        num_epochs=1,
        **{
            "train.algorithm": algorithm,
            "train.gradient_checkpointing": True,
            "train.log_kl_to_base": True,
            "sample.negative_prompt": "blurry",
        },
    )
    assert rows[0]["onpolicy_logprob_err"] < 1e-5
    # kl_to_base is the epoch's mean over its trained steps: exactly 0 when every one of them came
    # before the epoch's only optimizer step (a fresh LoRA is the base model), positive otherwise.
    kl, updates = rows[0]["kl_to_base"], rows[0]["optimizer_steps"]
    assert (kl == 0) if updates == 1 else (kl > 0)


def test_kl_to_base_is_zero_before_the_first_update_and_positive_after(tiny_sdxl, tmp_path):
    overrides = tiny_overrides(tiny_sdxl, tmp_path / "run", **{"sample.negative_prompt": "blurry"})
    before, after = kl_to_base_around_first_step(load_config(None, overrides))
    assert before == [0.0] * len(before) and all(kl > 0 for kl in after)


# ------------------------------------------------------------------------ bench builder, configs


def test_tiny_random_sdxl_builder_samples_and_trains():
    policy = SDXLPolicy(build_sdxl_components("tiny"), LoraConfig(), device=CPU)
    traj = policy.sample(
        ["a red cat"], generators(SEEDS[:1]), num_steps=2, eta=1.0, guidance_scale=5.0
    )
    lp = recomputed_log_prob(policy, traj, torch.tensor([1]))
    lp.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.equal(lp.detach(), traj.log_probs[:, 1])
    # Direct UNet calls (export checks, FLOP counts) get the same conditioning as the sampler.
    with torch.no_grad():
        direct = policy.unet(
            traj.latents[:, 1], traj.timesteps[:, 1], **policy.unet_conditioning(["a red cat"])
        )
        guided = policy._guided_prediction(
            traj.latents[:, 1],
            traj.timesteps[:, 1],
            traj.prompt_embeds,
            traj.negative_prompt_embeds,
            1.0,
            extra=traj.extra,
        )
    torch.testing.assert_close(direct.sample, guided, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sdxl_compressibility.yaml", "sdxl_low_memory.yaml"])
def test_shipped_sdxl_configs_validate(name):
    from diffloop.cli import main
    from diffloop.config import packaged_config

    assert main(["check-config", name]) == 0
    config = load_config(packaged_config(name))
    assert config.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.train.logprob_reduction == "mean" and config.train.clip_range < 1e-4


def test_base_builder_has_sdxl_base_parameter_counts():
    """The bench's "base" shapes are SDXL base 1.0's (parameter counts of its four networks)."""
    c = build_sdxl_components("base", device="meta")
    counts = {
        k: sum(p.numel() for p in c[k].parameters())
        for k in ("unet", "text_encoder", "text_encoder_2", "vae")
    }
    assert counts == {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    }


@pytest.mark.slow
def test_eval_report_variance_and_bf16_run_on_sdxl(tiny_sdxl, tmp_path, capsys):
    import json

    from diffloop.tools.evaluate import eval_main
    from diffloop.tools.report import report_main
    from diffloop.tools.variance import variance_main

    run = tmp_path / "run"
    rows = sdxl_run(
        tiny_sdxl,
        run,
        num_epochs=1,
        **{
            "eval.prompts": "ddpo/simple_animals",
            "eval.num_prompts": 2,
            "eval.samples_per_prompt": 1,
            "train.mixed_precision": "bf16",
        },
    )
    assert "eval_reward_mean" in rows[0] and rows[0]["onpolicy_logprob_err"] < 0.2
    out = tmp_path / "eval"
    assert (
        eval_main(
            [
                str(run),
                "--compare",
                str(tiny_sdxl),
                "--prompts",
                "ddpo/simple_animals",
                "--num-prompts",
                "2",
                "--images-per-prompt",
                "1",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--reward",
                "reward_fns:brightness",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert len(json.loads((out / "eval.json").read_text())["targets"]) == 2
    assert report_main([str(run), "--output", str(tmp_path / "report.html")]) == 0
    v = tmp_path / "v.json"
    assert (
        variance_main(
            [
                f"model.pretrained={tiny_sdxl}",
                "sample.num_steps=2",
                "sample.prompts_per_epoch=2",
                "sample.batch_size=4",
                "train.batch_size=2",
                "reward.name=reward_fns:brightness",
                "--algorithms",
                "loop@2",
                "--estimates",
                "2",
                "--output",
                str(v),
            ]
        )
        == 0
    )
    (result,) = json.loads(v.read_text())["results"]
    assert result["trace_cov"] > 0


@pytest.mark.slow
def test_two_processes_match_one_on_sdxl(tiny_sdxl, tmp_path, two_processes_and_one):
    common = {
        "sample.prompts_per_epoch": 2,
        "sample.samples_per_prompt": 2,
        "sample.batch_size": 2,
        "train.batch_size": 1,
        "num_epochs": 1,
    }
    rank0, rank1, one = two_processes_and_one(tiny_sdxl, tmp_path, 2, **common)
    assert rank0.keys() == one.keys() and len(one) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_compare_sweep_runs_on_sdxl(tiny_sdxl, tmp_path):
    import json

    import yaml

    from diffloop.tools.sweep import compare_main

    common = [
        o
        for o in tiny_overrides(tiny_sdxl, tmp_path / "unused")
        if not o.startswith(("output_dir", "num_"))
    ]
    common += [
        "eval.prompts=ddpo/simple_animals",
        "eval.num_prompts=2",
        "eval.samples_per_prompt=1",
    ]
    sweep = {
        "base": "shapes.yaml", "overrides": common, "budget": {"prompts": 2}, "seeds": [0],
        "output_dir": str(tmp_path / "out"),
        "runs": [{"name": "loop_k2", "overrides": ["train.algorithm=loop"]},
                 {"name": "reinforce_loo", "overrides": ["train.algorithm=reinforce_loo"]}],
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert compare_main([str(path)]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert {r["name"] for r in rows} == {"loop_k2", "reinforce_loo"}
