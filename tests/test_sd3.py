"""SD3 flow-matching policy: parity with diffusers' StableDiffusion3Pipeline, on-policy ratio with
and without a window, T5-optional conditioning, export, loading errors, shipped configs, and a
2-process run, on the tiny SD3 of ``diffloop.testing.tiny_flow`` (conftest ``tiny_sd3``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffloop import loops
from diffloop.config import ConfigError, LoraConfig, ModelConfig, SampleConfig, load_config
from diffloop.policies.diffusers_policy import ModelLoadError
from diffloop.policies.families import detect_family, load_policy
from diffloop.policies.sd3 import SD3Policy, load_sd3_policy
from diffloop.testing.runs import tiny_overrides
from diffloop.testing.tiny_flow import T5_TOKENS
from diffloop.trainer import Trainer

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a dog on a bench", "a red ball", "two cat"]


def policy_for(path, lora: bool = True, sample: SampleConfig | None = None, **kw) -> SD3Policy:
    torch.manual_seed(0)
    return load_sd3_policy(
        ModelConfig(pretrained=str(path)), LoraConfig(enabled=lora), device=CPU, sample=sample, **kw
    )


def generators(n, base=11):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def randomise_lora(policy: SD3Policy) -> None:
    """A fresh adapter has lora_B = 0 (the base model): give it weights that matter."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in policy.named_trainable_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_family_detection(tiny_sd3, tiny_sd):
    assert detect_family(str(tiny_sd3)) == "sd3"
    assert detect_family(str(tiny_sd)) == "sd"
    assert isinstance(
        load_policy(ModelConfig(pretrained=str(tiny_sd3)), LoraConfig(), device=CPU), SD3Policy
    )


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_sample_equals_the_diffusers_pipeline(tiny_sd3, guidance_scale):
    """Noise level 0 (every step an ODE step) from the same initial noise: the pipeline's image."""
    from diffusers import StableDiffusion3Pipeline

    policy = policy_for(tiny_sd3, lora=False)
    policy.train(False)
    prompts = PROMPTS[:2]
    traj = policy.sample(prompts, generators(2), num_steps=4, eta=0.0,
                         guidance_scale=guidance_scale, negative_prompt="blurry")  # fmt: skip
    assert torch.isnan(traj.log_probs).all()  # ODE steps have no density
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    out = pipe(
        prompts, negative_prompt="blurry", num_inference_steps=4, guidance_scale=guidance_scale,
        latents=policy.initial_latents(generators(2)), output_type="pt",
        max_sequence_length=T5_TOKENS,
    ).images  # fmt: skip
    torch.testing.assert_close(traj.images, out, atol=1e-5, rtol=0)


def test_windowed_trajectory_stores_only_the_window(tiny_sd3):
    sample = SampleConfig(sde_window=[1, 2])
    policy = policy_for(tiny_sd3, sample=sample)
    traj = policy.sample(PROMPTS[:2], generators(2), num_steps=5, eta=0.7, guidance_scale=3.0)
    sigmas = policy.scheduler.sigmas
    assert traj.latents.shape[:2] == (2, 3) and traj.log_probs.shape == (2, 2)
    torch.testing.assert_close(traj.extra["sigmas"][0], sigmas[1:4])
    torch.testing.assert_close(traj.timesteps[0], policy.scheduler.timesteps[1:3])
    assert torch.isfinite(traj.log_probs).all()
    # the ODE prefix is deterministic: the window's first state does not depend on the noise level
    ode = policy.sample(PROMPTS[:2], generators(2), num_steps=5, eta=0.0, guidance_scale=3.0)
    torch.testing.assert_close(traj.latents[:, 0], ode.latents[:, 0], atol=0, rtol=0)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("window", [None, [1, 2]])
def test_ratio_is_exactly_one_at_any_minibatch_size(tiny_sd3, sde_type, window):
    policy = policy_for(tiny_sd3, sample=SampleConfig(sde_type=sde_type, sde_window=window))
    randomise_lora(policy)
    sampler = loops.SamplerSettings(num_steps=4, eta=0.8, guidance_scale=3.0)
    policy.check_sampling(4, 0.8)
    policy.train(False)
    traj = policy.sample(PROMPTS, generators(4), num_steps=4, eta=0.8, guidance_scale=3.0)
    policy.train(True)
    worst = 0.0
    with torch.no_grad():
        for minibatch in (1, 3, 4):
            for start in range(0, 4, minibatch):
                batch = traj.index(slice(start, start + minibatch))
                for j in range(batch.timesteps.shape[1]):
                    step = torch.full((len(batch),), j, dtype=torch.long)
                    lp = loops.transition_log_prob(policy, batch, step, sampler)[0]
                    worst = max(worst, float((lp - batch.log_probs[:, j]).abs().max()))
    assert worst <= 1e-5
    # and the ratio can move: another noise level gives other log-probs
    other = loops.SamplerSettings(num_steps=4, eta=0.5, guidance_scale=3.0)
    step = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        assert (
            loops.transition_log_prob(policy, traj, step, other)[0] - traj.log_probs[:, 0]
        ).abs().max() > 1e-3


def test_without_t5_the_t5_part_is_zeros(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path / "no_t5"
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **no_t5).save_pretrained(path)
    assert json.loads((path / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    policy = policy_for(path, lora=False)
    assert policy.text_encoder_3 is None
    embeds, pooled = policy.encode_prompts_with_pooled(PROMPTS[:2])
    assert embeds.shape[1] == 77 + 256 and not embeds[:, 77:].any()
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **no_t5)
    # each prompt is encoded alone (a cached embedding never depends on its batch)
    alone = [pipe.encode_prompt([p], None, None, do_classifier_free_guidance=False)
             for p in PROMPTS[:2]]  # fmt: skip
    ref, ref_pooled = (torch.cat([a[i] for a in alone]) for i in (0, 2))
    torch.testing.assert_close(embeds, ref, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=0, rtol=0)


@pytest.mark.parametrize(
    "component",
    [
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
        "vae",
    ],
)
def test_missing_component_is_named(tiny_sd3, tmp_path, component):
    path = tmp_path / "broken"
    shutil.copytree(tiny_sd3, path, ignore=shutil.ignore_patterns(component))
    with pytest.raises(ModelLoadError, match=f"{component}/") as e:
        policy_for(path)
    assert "save_pretrained" in str(e.value)
    if component in ("text_encoder_3", "tokenizer_3"):
        assert "[null, null]" in str(e.value)  # how to run without T5


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no directory"):
        load_sd3_policy(ModelConfig(pretrained=str(tmp_path / "nope")), LoraConfig(), device=CPU)


def test_sampling_settings_are_checked(tiny_sd3):
    policy = policy_for(tiny_sd3)
    with pytest.raises(ConfigError, match="sample.eta"):
        policy.check_sampling(4, 1.5)
    with pytest.raises(ConfigError, match="sample.sde_window"):
        policy_for(tiny_sd3, sample=SampleConfig(sde_window=[2, 2])).check_sampling(4, 0.7)
    with pytest.raises(ConfigError, match="sample.sde_window"):
        load_config(None, ["sample.num_steps=4", "sample.sde_window=[3, 1]"])
    with pytest.raises(ConfigError, match="sample.sde_type"):
        load_config(None, ["sample.sde_type=ode"])


def test_only_adapter_weights_change_in_a_run(tiny_sd3, tmp_path):
    t = Trainer(load_config(None, tiny_overrides(tiny_sd3, tmp_path / "run", num_epochs=1,
                                                 **{"sample.num_steps": 3})))  # fmt: skip
    p = t.policy
    modules = {
        n: getattr(p, n)
        for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    }
    before = {
        (m, n): w.detach().clone() for m, mod in modules.items() for n, w in mod.named_parameters()
    }
    t.train()
    changed = {
        k
        for k, w in before.items()
        if not torch.equal(dict(modules[k[0]].named_parameters())[k[1]], w)
    }
    assert changed and all(m == "transformer" and "lora_" in n for m, n in changed)
    targets = {n.split(".lora_")[0].split("transformer_blocks.0.")[-1] for _, n in changed}
    # (the one block is the last, context_pre_only: it has no ff_context)
    assert {"attn.to_q", "attn.add_q_proj", "ff.net.0.proj", "ff.net.2"} <= targets


def test_full_fine_tuning_exports_a_loadable_pipeline(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    policy = policy_for(tiny_sd3, lora=False)
    with torch.no_grad():
        policy.transformer.pos_embed.proj.weight.add_(0.1)  # a "trained" weight
    policy.export(tmp_path / "full")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "full")
    for (name, a), b in zip(
        policy.transformer.state_dict().items(), pipe.transformer.state_dict().values()
    ):
        assert torch.equal(a, b), name


def test_lora_export_reproduces_a_randomised_adapter(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    policy = policy_for(tiny_sd3, lora=True)
    randomise_lora(policy)
    policy.export(tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = policy.unet_conditioning(PROMPTS[:2])
    t = torch.tensor([900.0, 150.0])
    with torch.no_grad():
        ours = policy.transformer(hidden_states=x, timestep=t, **cond).sample
        theirs = pipe.transformer(hidden_states=x, timestep=t, **cond).sample
        with policy.reference():
            base = policy.transformer(hidden_states=x, timestep=t, **cond).sample
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["sd35_geneval_blip_vqa.yaml", "sd35_pickscore.yaml", "sd35_fast_cps.yaml"]
)
def test_shipped_sd35_configs_validate(name):
    from diffloop.cli import main
    from diffloop.config import packaged_config

    assert main(["check-config", name]) == 0
    config = load_config(packaged_config(name))
    assert config.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"


def test_tiny_sd3_runs_other_algorithms_with_kl_and_checkpointing(tiny_sd3, tmp_path):
    rows = Trainer(load_config(None, tiny_overrides(
        tiny_sd3, tmp_path / "grpo", num_epochs=1,
        **{"sample.num_steps": 3, "train.algorithm": "grpo", "train.kl_coef": 0.1,
           "train.gradient_checkpointing": True, "sample.sde_type": "cps"},
    ))).train()  # fmt: skip
    assert rows[-1]["onpolicy_logprob_err"] <= 1e-5 and "kl_to_base" in rows[-1]


@pytest.mark.slow
def test_two_processes_match_one_on_sd3(tiny_sd3, tmp_path, two_processes_and_one):
    common = {"sample.prompts_per_epoch": 2, "sample.samples_per_prompt": 2, "sample.batch_size": 2,
              "train.batch_size": 1, "num_epochs": 1, "sample.num_steps": 3}  # fmt: skip
    rank0, rank1, one = two_processes_and_one(tiny_sd3, tmp_path, 2, **common)
    assert rank0.keys() == one.keys() and len(one) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=2e-5)


def test_resolution_sets_the_latent_size(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(0)
    model = ModelConfig(pretrained=str(tiny_sd3), resolution=16)
    policy = load_sd3_policy(model, LoraConfig(enabled=False), device=CPU)
    assert policy.latent_shape() == (4, 8, 8)
    traj = policy.sample(PROMPTS[:1], generators(1), num_steps=3, eta=0.0, guidance_scale=1.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    out = pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
               latents=policy.initial_latents(generators(1)), output_type="pt",
               max_sequence_length=T5_TOKENS).images  # fmt: skip
    assert traj.images.shape == out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(traj.images, out, atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="model.resolution=15"):
        load_sd3_policy(
            ModelConfig(pretrained=str(tiny_sd3), resolution=15), LoraConfig(), device=CPU
        )


def test_bench_runs_the_sd3_policy(tmp_path):
    from diffloop.tools.bench import bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--shape", "tiny_sd3", "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"sample", "train", "end_to_end"} <= set(result["items"])
    assert result["onpolicy_logprob_err"] <= 1e-5
    assert result["floor"]["unet_flop_per_eval"] > 0


def test_sd35_medium_builder_has_its_shapes():
    """``bench --shape sd35``'s networks: SD3.5-medium's configs (CLIP-G is SDXL's
    text_encoder_2)."""
    from diffloop.testing.tiny_flow import build_sd3_components

    c = build_sd3_components("sd35_medium", device="meta")
    counts = {
        k: sum(p.numel() for p in c[k].parameters())
        for k in ("transformer", "text_encoder", "text_encoder_2")
    }
    assert counts["text_encoder"] == 123_650_304 and counts["text_encoder_2"] == 694_659_840
    assert 2.2e9 < counts["transformer"] < 2.6e9 and c["text_encoder_3"] is None
    assert (
        c["vae"].config.latent_channels == 16
        and c["transformer"].config.pooled_projection_dim == 2048
    )


@pytest.mark.parametrize("eta", ["0", "0.7"])
def test_sample_command_on_an_sd3_directory(tiny_sd3, tmp_path, eta):
    from diffloop.cli import main

    out = tmp_path / "samples"
    argv = ["sample", str(tiny_sd3), "--prompt", "a cat", "--num-per-prompt", "2", "--steps", "3"]
    assert main([*argv, "--eta", eta, "--device", "cpu", "--output", str(out)]) == 0
    assert list(out.rglob("*.png"))


def test_bf16_run_trains_with_a_finite_ratio(tiny_sd3, tmp_path):
    rows = Trainer(load_config(None, tiny_overrides(
        tiny_sd3, tmp_path / "bf16", num_epochs=1,
        **{"sample.num_steps": 3, "train.mixed_precision": "bf16", "train.batch_size": 4},
    ))).train()  # fmt: skip
    assert rows[-1]["onpolicy_logprob_err"] <= 1e-5  # the training batch = the sampling batch
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.slow
def test_eval_report_and_variance_run_on_sd3(tiny_sd3, tmp_path):
    from diffloop.tools.evaluate import eval_main
    from diffloop.tools.report import report_main
    from diffloop.tools.variance import variance_main

    run = tmp_path / "run"
    rows = Trainer(load_config(None, tiny_overrides(tiny_sd3, run, num_epochs=1, **{
        "sample.num_steps": 3, "sample.sde_type": "cps", "eval.prompts": "ddpo/simple_animals",
        "eval.num_prompts": 2, "eval.samples_per_prompt": 1,
    }))).train()  # fmt: skip
    assert "eval_reward_mean" in rows[0]
    out = tmp_path / "eval"
    argv = [str(run), "--compare", str(tiny_sd3), "--prompts", "ddpo/simple_animals",
            "--num-prompts", "2", "--images-per-prompt", "1", "--steps", "3", "--device", "cpu",
            "--reward", "reward_fns:brightness", "--output", str(out)]  # fmt: skip
    assert eval_main(argv) == 0
    assert len(json.loads((out / "eval.json").read_text())["targets"]) == 2
    assert report_main([str(run), "--output", str(tmp_path / "report.html")]) == 0
    v = tmp_path / "v.json"
    argv = [f"model.pretrained={tiny_sd3}", "sample.num_steps=3", "sample.prompts_per_epoch=2",
            "sample.batch_size=4", "train.batch_size=2", "reward.name=reward_fns:brightness",
            "--algorithms", "loop@2", "--estimates", "2", "--output", str(v)]  # fmt: skip
    assert variance_main(argv) == 0
    (result,) = json.loads(v.read_text())["results"]
    assert result["trace_cov"] > 0


def test_random_window_start_per_sample(tiny_sd3):
    """[first, last, length]: each sample's start drawn from its own generator; the stored sigmas
    and timesteps are its window's, the ratio is exactly 1, and a sample ignores its batch mates."""
    policy = policy_for(tiny_sd3, sample=SampleConfig(sde_window=[0, 3, 2]))
    policy.check_sampling(6, 0.7)
    gens = generators(6)
    traj = policy.sample(PROMPTS + PROMPTS[:2], gens, num_steps=6, eta=0.7, guidance_scale=3.0)
    sigmas, timesteps = policy.scheduler.sigmas, policy.scheduler.timesteps
    starts = [int((sigmas == row[0]).nonzero()) for row in traj.extra["sigmas"]]
    assert len(set(starts)) > 1 and all(0 <= s <= 3 for s in starts)
    for i, s in enumerate(starts):
        torch.testing.assert_close(traj.extra["sigmas"][i], sigmas[s : s + 3], atol=0, rtol=0)
        torch.testing.assert_close(traj.timesteps[i], timesteps[s : s + 2], atol=0, rtol=0)
    assert torch.isfinite(traj.log_probs).all() and torch.isfinite(traj.latents).all()
    sampler = loops.SamplerSettings(num_steps=6, eta=0.7, guidance_scale=3.0)
    assert loops.onpolicy_logprob_err(policy, traj, sampler) <= 1e-5
    alone = policy.sample(
        PROMPTS[3:4], generators(1, base=14), num_steps=6, eta=0.7, guidance_scale=3.0
    )
    torch.testing.assert_close(alone.latents[0], traj.latents[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.images[0], traj.images[3], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="sample.sde_window"):
        load_config(None, ["sample.num_steps=6", "sample.sde_window=[0, 4, 2]"])
    assert load_config(
        None, ["sample.num_steps=6", "sample.sde_window=[0, 3, 2]"]
    ).sample.sde_window == [0, 3, 2]
