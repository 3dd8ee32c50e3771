"""FLUX.1 policy: parity with diffusers' FluxPipeline (packing, the mu-shifted schedule, the ODE
sample), the guidance-embedding path, windowed on-policy ratios, frozen weights, full-FT export,
loading errors, shipped configs, and the FSDP refusal, on the tiny FLUX of
``diffloop.testing.tiny_flux`` (the conformance suite covers LoRA export, resume and the ratio at
several minibatch sizes)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline

from diffloop import loops
from diffloop.config import (
    ConfigError,
    FluxConfig,
    LoraConfig,
    ModelConfig,
    SampleConfig,
    load_config,
)
from diffloop.policies.diffusers_policy import ModelLoadError
from diffloop.policies.families import detect_family, load_policy
from diffloop.policies.flux import (
    FLUX_COMPONENTS,
    FluxPolicy,
    latent_image_ids,
    load_flux_policy,
    pack_latents,
    unpack_latents,
)
from diffloop.testing.exports import (
    assert_full_export_reproduces_transformer,
    assert_lora_reload_reproduces_transformer,
)
from diffloop.testing.runs import kl_to_base_around_first_step, tiny_overrides
from diffloop.testing.tiny_flux import make_tiny_flux
from diffloop.trainer import Trainer

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a red dog on a bench"]
SEEDS = [11, 12]
STEPS = 4
G = 3.5  # FLUX.1-dev's guidance (FluxPipeline's default, Flow-GRPO's setting)


def policy_for(path, *, lora: bool = True, flux: FluxConfig | None = None, resolution=None,
               **sample) -> FluxPolicy:  # fmt: skip
    torch.manual_seed(0)
    sample = SampleConfig(**{"num_steps": STEPS, "eta": 0.7, "guidance_scale": G, **sample})
    model = ModelConfig(pretrained=str(path), flux=flux or FluxConfig(), resolution=resolution)
    return load_flux_policy(model, LoraConfig(enabled=lora), device=CPU, sample=sample)


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def settings(
    policy: FluxPolicy, eta: float = 0.7, guidance_scale: float = G
) -> loops.SamplerSettings:
    return loops.SamplerSettings(STEPS, eta, guidance_scale)


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    """A tiny FLUX.1-schnell-style pipeline: no guidance embedding, schnell's unshifted
    scheduler."""
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_schnell"), guidance_embeds=False)


# ------------------------------------------------------------------------------ FluxPipeline parity


def test_packing_round_trip_and_matches_flux_pipeline():
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (2, 3 * 4, 3 * 4)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 3, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x, rtol=0, atol=0)
    # the pipeline's unpack takes pixels and the VAE factor: 6 x 8 latents of an 8x VAE
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 64, 8), x, rtol=0, atol=0)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, CPU, torch.float32)
    torch.testing.assert_close(latent_image_ids(6, 8), expected_ids, rtol=0, atol=0)
    assert latent_image_ids(6, 8)[5].tolist() == [0.0, 1.0, 1.0]  # [0, row, col] of patch (1, 1)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 1, 5, 8))


def test_schedule_equals_flux_pipelines_at_two_resolutions(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    schedules = {}
    for resolution in (32, 64):  # 256 and 1024 image tokens: mu = 0.5 and 0.63
        policy = policy_for(tiny_flux, resolution=resolution)
        sigmas, timesteps = policy.schedule(6)
        pipe("a cat", num_inference_steps=6, guidance_scale=G, height=resolution, width=resolution,
             max_sequence_length=policy.max_sequence_length, output_type="latent")  # fmt: skip
        torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
        schedules[resolution] = sigmas
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    unshifted = torch.linspace(1, 1 / 6, 6)
    assert (schedules[32][:-1] - unshifted).abs().max() > 1e-3, "mu shifted nothing: proves nothing"
    assert (schedules[64][1:-1] > schedules[32][1:-1]).all()  # more tokens, more time at high noise
    with pytest.raises(ValueError, match="mu"):  # dev's scheduler needs mu: the family must pass it
        policy.scheduler.set_timesteps(6)


def test_ode_sample_equals_flux_pipelines_output_for_the_same_noise(tiny_flux):
    policy = policy_for(tiny_flux)
    policy.train(False)
    traj = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.0, guidance_scale=G)
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    expected = pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=G, height=32, width=32,
        max_sequence_length=policy.max_sequence_length, generator=generators(), output_type="pt",
    ).images  # fmt: skip
    assert expected.std() > 0.01  # not a blank image
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-5)
    assert torch.isnan(traj.log_probs).all()  # ODE steps carry no density
    # and a noise level > 0 moves the sample off the ODE path
    noisy = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.7, guidance_scale=G)
    assert (noisy.images - expected).abs().max() > 1e-3


# ------------------------------------------------------------------------------- guidance embedding


def test_guidance_is_an_input_one_forward_per_step_and_the_same_g_when_recomputed(tiny_flux):
    policy = policy_for(tiny_flux)
    calls = []

    def record(module, args, kwargs):
        calls.append((len(kwargs["hidden_states"]), kwargs["guidance"].clone()))

    handle = policy.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        traj = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.7, guidance_scale=G)
        assert len(calls) == STEPS  # one forward per step: no negative branch, no doubled batch
        step = torch.zeros(len(traj), dtype=torch.long)
        same = loops.transition_log_prob(policy, traj, step, settings(policy))[0]
        other = loops.transition_log_prob(policy, traj, step, settings(policy, guidance_scale=1.5))[
            0
        ]
    finally:
        handle.remove()
    assert all(
        n == len(PROMPTS) and torch.equal(g, torch.full((n,), G)) for n, g in calls[: STEPS + 1]
    )
    assert torch.equal(calls[-1][1], torch.full((2,), 1.5))
    assert (same - traj.log_probs[:, 0]).abs().max() <= 1e-6  # the same g: ratio 1
    # another g is another policy: a log-ratio far beyond float noise (clip ranges are ~1e-4)
    assert (other - traj.log_probs[:, 0]).abs().max() > 5e-5
    x, t = traj.latents[:, 0], traj.timesteps[:, 0]
    args = (traj.prompt_embeds, traj.negative_prompt_embeds, traj.extra)
    with torch.no_grad():
        v_g, v_1 = (policy.velocity(x, t, *args, g) for g in (G, 1.0))
    assert (v_g - v_1).abs().max() > 1e-2 * v_g.abs().max()


def test_schnell_has_no_guidance_embedding_and_no_shift(tiny_schnell):
    with pytest.raises(ConfigError, match="sample.guidance_scale=3.5.*no guidance embedding"):
        policy_for(tiny_schnell)
    policy = policy_for(tiny_schnell, guidance_scale=1.0)
    assert policy.guidance(2, 1.0) is None
    sigmas, _ = policy.schedule(STEPS)
    expected = torch.cat([torch.linspace(1, 1 / STEPS, STEPS), torch.zeros(1)])
    torch.testing.assert_close(sigmas, expected)  # schnell's scheduler: shift 1, no mu
    traj = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.7, guidance_scale=1.0)
    assert loops.onpolicy_logprob_err(policy, traj, settings(policy, guidance_scale=1.0)) <= 1e-5


def test_negative_prompt_is_refused(tiny_flux):
    with pytest.raises(ConfigError, match="sample.negative_prompt='blurry'.*no negative branch"):
        policy_for(tiny_flux, negative_prompt="blurry")
    policy = policy_for(tiny_flux)
    with pytest.raises(ConfigError, match="negative"):
        policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.7, guidance_scale=G,
                      negative_prompt="blurry")  # fmt: skip


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("window", [None, [1, 2]])
def test_ratio_exactly_one_windowed_or_not(tiny_flux, window, sde_type):
    policy = policy_for(tiny_flux, sde_window=window, sde_type=sde_type)
    prompts, seeds = PROMPTS * 2, list(range(4))
    traj = next(loops.sample_batches(policy, prompts, seeds, settings(policy), 4))[1]
    stored = traj.timesteps.shape[1]
    assert stored == (2 if window else STEPS - 1)
    assert traj.latents.shape[1:] == (stored + 1, 256, 4)  # packed (h/2 w/2, 4C) states
    worst = 0.0
    with torch.no_grad():
        for minibatch in (1, 2, 4):
            for start in range(0, 4, minibatch):
                batch = traj.index(slice(start, start + minibatch))
                for j in range(stored):
                    step = torch.full((len(batch),), j, dtype=torch.long)
                    log_prob = loops.transition_log_prob(policy, batch, step, settings(policy))[0]
                    assert torch.isfinite(log_prob).all()
                    worst = max(worst, float((log_prob - batch.log_probs[:, j]).abs().max()))
    assert worst <= 1e-5


def test_training_changes_only_the_adapter(tiny_flux, tmp_path):
    overrides = tiny_overrides(tiny_flux, tmp_path / "run", num_epochs=1,
                               **{"sample.guidance_scale": G, "sample.num_steps": 3})  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    policy = trainer.policy
    modules = {name: getattr(policy, name)
               for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}  # fmt: skip
    before = {
        (m, n): p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()
    }
    trainer.train()
    after = {(m, n): p for m, mod in modules.items() for n, p in mod.named_parameters()}
    changed = {k for k, p in after.items() if not torch.equal(p, before[k])}
    assert changed and all(m == "transformer" and "lora_" in n for m, n in changed), sorted(
        changed
    )[:3]
    assert any("lora_B" in n for _, n in changed)


def test_lora_export_keeps_alpha_and_reproduces_the_transformer(tiny_flux, tmp_path):
    """alpha = 2 rank (Flow-GRPO's r64 / a128): without the metadata diffusers would reload the
    adapter at scale 1 instead of 2."""
    torch.manual_seed(0)
    model = ModelConfig(pretrained=str(tiny_flux))
    policy = load_flux_policy(model, LoraConfig(rank=4, alpha=8), device=CPU,
                              sample=SampleConfig(guidance_scale=G))  # fmt: skip
    assert policy.peft_config.target_modules == set(policy.DEFAULT_LORA_TARGETS)
    assert_lora_reload_reproduces_transformer(
        policy, FluxPipeline.from_pretrained(tiny_flux), tmp_path / "lora", PROMPTS
    )


def test_full_fine_tuning_exports_a_loadable_flux_pipeline(tiny_flux, tmp_path):
    policy = policy_for(tiny_flux, lora=False)
    pipe = assert_full_export_reproduces_transformer(
        policy, FluxPipeline, tmp_path / "export", PROMPTS
    )
    images = pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                  output_type="pt").images  # fmt: skip
    assert images.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------- loading


def test_family_is_read_from_model_index(tiny_flux):
    assert detect_family(str(tiny_flux)) == "flux"
    config = load_config(None, [f"model.pretrained={tiny_flux}", f"sample.guidance_scale={G}"])
    policy = load_policy(config.model, config.lora, device=CPU, sample=config.sample)
    assert isinstance(policy, FluxPolicy) and policy.guidance_embeds


@pytest.mark.parametrize("component", FLUX_COMPONENTS)
def test_missing_component_is_a_clear_error(tiny_flux, tmp_path, component):
    broken = tmp_path / "flux"
    shutil.copytree(tiny_flux, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(
        ModelLoadError,
        match=rf"lacks the component folder\(s\) {component}/\. "
        r".*FluxPipeline.save_pretrained.*hf download black-forest-labs/FLUX.1-dev",
    ):
        policy_for(broken)


def test_unreadable_component_and_missing_directory(tiny_flux, tmp_path):
    broken = tmp_path / "flux"
    shutil.copytree(tiny_flux, broken)
    for f in (broken / "text_encoder_2").iterdir():
        f.unlink()
    with pytest.raises(ModelLoadError, match="could not load the text_encoder_2 .*text_encoder_2/"):
        policy_for(broken)
    with pytest.raises(ModelLoadError, match="no directory at"):
        policy_for(tmp_path / "nowhere")


def test_resolution_and_t5_length_are_checked(tiny_flux):
    with pytest.raises(ModelLoadError, match="model.resolution=33 must be a multiple of 2"):
        policy_for(tiny_flux, resolution=33)  # tiny VAE factor 1 x 2x2 packing
    with pytest.raises(ConfigError, match="model.flux.max_sequence_length=1000"):
        policy_for(tiny_flux, flux=FluxConfig(max_sequence_length=1000))
    policy = policy_for(tiny_flux, resolution=16, flux=FluxConfig(max_sequence_length=8))
    assert policy.latent_shape() == (64, 4) and policy.encode_prompts(PROMPTS).shape == (2, 8, 32)


def test_truncated_prompts_are_logged(tiny_flux, caplog):
    policy = policy_for(tiny_flux, flux=FluxConfig(max_sequence_length=4))
    with caplog.at_level("WARNING", logger="diffloop.policies.flux"):
        policy.encode_prompts(["a cat", "a red dog on a bench and a green car"])
    assert "1 of 2 prompts are longer than 4 tokens" in caplog.text


# ---------------------------------------------------------------------------------- configs, FSDP


def test_shipped_flux_configs_validate(capsys):
    from importlib.resources import files

    from diffloop.cli import main

    paths = sorted(p for p in files("diffloop.configs").iterdir() if p.name.startswith("flux_"))
    rewards = set()
    for path in paths:
        assert main(["check-config", path.name]) == 0, path.name
        config = load_config(str(path), [])
        rewards.add(config.reward.name)
        assert config.sample.negative_prompt == "" and config.lora.enabled
    assert {"blip_vqa", "pickscore"} <= rewards, rewards  # attribute binding and preference


def test_fsdp_and_deepspeed_configs_are_refused_before_anything_loads(monkeypatch, tmp_path):
    from diffloop.distributed import Distributed, ShardingNotSupported, requested_sharding

    assert requested_sharding({}) is None
    assert requested_sharding({"ACCELERATE_USE_FSDP": "false"}) is None
    assert requested_sharding({"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert requested_sharding({"ACCELERATE_USE_DEEPSPEED": "True"}) == "DeepSpeed"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ShardingNotSupported, match="configured for FSDP.*does not shard"):
        Distributed()
    config = load_config(None, [f"model.pretrained={tmp_path / 'no_model_here'}"])
    with pytest.raises(ShardingNotSupported):  # refused before the (missing) model is looked at
        Trainer(config)


# ---------------------------------------------------------------------------------- bench


def test_bench_tiny_flux_runs_through_the_policy_one_eval_per_step(tmp_path):
    from diffloop.tools.bench import bench_main

    out = tmp_path / "bench.json"
    assert (
        bench_main(["--shape", "tiny_flux", "--guidance-scale", "3.5", "--output", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    sample = result["items"]["sample"]
    assert {"sample", "train", "end_to_end"} <= set(result["items"])
    assert result["floor"]["unet_flop_per_eval"] > 0
    assert result["onpolicy_logprob_err"] <= 1e-5
    # guidance-distilled: batch x steps transformer evaluations, not twice that (no CFG branch)
    evals = sample["unet_evals_per_s"] * sample["median_s"]
    assert evals == pytest.approx(2 * 3)


def test_frozen_encoders_are_deterministic_even_when_built_in_train_mode():
    from diffloop.testing.tiny_flux import build_flux_components

    components = build_flux_components("tiny")
    assert components["text_encoder_2"].training  # T5 built from a config: dropout 0.1 active
    policy = FluxPolicy(components, LoraConfig(), device=CPU, sample=SampleConfig(guidance_scale=G))
    first, second = policy.encode_prompts(PROMPTS), policy.encode_prompts(PROMPTS)
    assert torch.equal(first, second)


def test_flux_dev_shape_is_flux1_dev():
    """The bench's "dev" transformer has FLUX.1-dev's size (built on the meta device: no memory)."""
    from diffusers import FluxTransformer2DModel

    from diffloop.testing.tiny_flux import FLUX_CONFIGS

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_CONFIGS["dev"]["transformer"], guidance_embeds=True)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.9e9, rel=0.01)


# ---------------------------------------------------------------------------------- the other tools


def test_grpo_with_kl_and_checkpointing_runs_on_flux(tiny_flux, tmp_path):
    rows = Trainer(load_config(None, tiny_overrides(
        tiny_flux, tmp_path / "grpo", num_epochs=1,
        **{"sample.num_steps": 3, "sample.guidance_scale": G, "train.algorithm": "grpo",
           "train.kl_coef": 0.1, "train.gradient_checkpointing": True, "sample.sde_type": "cps"},
    ))).train()  # fmt: skip
    assert rows[-1]["onpolicy_logprob_err"] <= 1e-5
    # kl_to_base is the epoch's mean over its trained steps: exactly 0 when every one of them came
    # before the epoch's only optimizer step (a fresh LoRA is the base model), positive otherwise.
    kl, updates = rows[-1]["kl_to_base"], rows[-1]["optimizer_steps"]
    assert (kl == 0) if updates == 1 else (kl > 0)


def test_kl_to_base_is_zero_before_the_first_update_and_positive_after_on_flux(tiny_flux, tmp_path):
    overrides = tiny_overrides(tiny_flux, tmp_path / "run", **{
        "sample.num_steps": 3, "sample.guidance_scale": G, "train.algorithm": "grpo",
        "train.kl_coef": 0.1, "sample.sde_type": "cps"})  # fmt: skip
    before, after = kl_to_base_around_first_step(load_config(None, overrides))
    assert before == [0.0] * len(before) and all(kl > 0 for kl in after)


def test_bf16_run_trains_with_a_finite_ratio(tiny_flux, tmp_path):
    rows = Trainer(load_config(None, tiny_overrides(
        tiny_flux, tmp_path / "bf16", num_epochs=1,
        **{"sample.num_steps": 3, "sample.guidance_scale": G, "train.mixed_precision": "bf16",
           "train.batch_size": 4},
    ))).train()  # fmt: skip
    assert rows[-1]["onpolicy_logprob_err"] <= 1e-5  # the training batch = the sampling batch
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("eta", ["0", "0.7"])
def test_sample_command_on_a_flux_directory(tiny_flux, tmp_path, eta):
    from diffloop.cli import main

    out = tmp_path / "samples"
    argv = ["sample", str(tiny_flux), "--prompt", "a cat", "--num-per-prompt", "2", "--steps", "3"]
    assert main([*argv, "--eta", eta, "--device", "cpu", "--output", str(out)]) == 0
    assert list(out.rglob("*.png"))


@pytest.mark.slow
def test_eval_report_and_variance_run_on_flux(tiny_flux, tmp_path):
    from diffloop.tools.evaluate import eval_main
    from diffloop.tools.report import report_main
    from diffloop.tools.variance import variance_main

    run = tmp_path / "run"
    rows = Trainer(load_config(None, tiny_overrides(tiny_flux, run, num_epochs=1, **{
        "sample.num_steps": 3, "sample.guidance_scale": G, "eval.prompts": "ddpo/simple_animals",
        "eval.num_prompts": 2, "eval.samples_per_prompt": 1,
    }))).train()  # fmt: skip
    assert "eval_reward_mean" in rows[0]
    out = tmp_path / "eval"
    argv = [str(run), "--compare", str(tiny_flux), "--prompts", "ddpo/simple_animals",
            "--num-prompts", "2", "--images-per-prompt", "1", "--steps", "3", "--device", "cpu",
            "--reward", "reward_fns:brightness", "--output", str(out)]  # fmt: skip
    assert eval_main(argv) == 0
    assert len(json.loads((out / "eval.json").read_text())["targets"]) == 2
    assert report_main([str(run), "--output", str(tmp_path / "report.html")]) == 0
    v = tmp_path / "v.json"
    argv = [f"model.pretrained={tiny_flux}", "sample.num_steps=3", "sample.guidance_scale=3.5",
            "sample.prompts_per_epoch=2", "sample.batch_size=4", "train.batch_size=2",
            "reward.name=reward_fns:brightness", "--algorithms", "loop@2", "--estimates", "2",
            "--output", str(v)]  # fmt: skip
    assert variance_main(argv) == 0
    (result,) = json.loads(v.read_text())["results"]
    assert result["trace_cov"] > 0
