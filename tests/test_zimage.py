"""Z-Image: the tiny model and tokenizer of ``diffloop.testing.tiny_zimage``; the pipeline
conventions (the chat template, the reversed time, the negated velocity, the pipeline's CFG) on
``ZImagePipeline`` itself through the reference harness ``zimage_pipeline_latents``; and the policy
against them: noise-0 samples equal the pipeline's, with and without CFG, with its normalization
and truncation options; the velocity is minus the transformer's output and a noise-0 step is the
scheduler's; captions keep their own lengths; loading errors; shipped configs. The conformance
suite (tests/test_policy_conformance.py) covers the ratio, adapters, export and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import ZImagePipeline

from diffloop.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    SampleConfig,
    ZImageConfig,
    load_config,
)
from diffloop.policies.families import detect_family, family, load_policy
from diffloop.policies.loading import ModelLoadError
from diffloop.policies.zimage import ZImagePolicy, load_zimage_policy
from diffloop.testing.tiny_zimage import (
    ZIMAGE_CONFIGS,
    build_zimage_components,
    make_qwen_tokenizer,
    zimage_pipeline_latents,
)

PROMPTS = ["a cat", "a red dog on a bench"]
SEEDS = [11, 12]
STEPS = 3
CPU = torch.device("cpu")
TEXT = 64  # max_sequence_length of the tests (the pipeline's 512 only costs text-encoder work)


@pytest.fixture(scope="module")
def tiny_zimage_dir(tiny_zimage):
    return tiny_zimage


@pytest.fixture(scope="module")
def pipe(tiny_zimage_dir):
    return ZImagePipeline.from_pretrained(tiny_zimage_dir)


def policy_for(path, *, lora: bool = True, guidance_scale: float = 1.0, **zimage) -> ZImagePolicy:
    torch.manual_seed(0)
    sample = SampleConfig(num_steps=STEPS, eta=0.7, guidance_scale=guidance_scale)
    model = ModelConfig(
        pretrained=str(path), resolution=32,
        zimage=ZImageConfig(**{"max_sequence_length": TEXT, **zimage}),
    )  # fmt: skip
    return load_zimage_policy(model, LoraConfig(enabled=lora), device=CPU, sample=sample)


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def noise(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ tokenizer


def test_chat_template_renders_a_prompt_as_qwen3():
    tokenizer = make_qwen_tokenizer()
    messages = [{"role": "user", "content": "a cat"}]
    kwargs = {"tokenize": False, "add_generation_prompt": True}
    thinking = tokenizer.apply_chat_template(messages, enable_thinking=True, **kwargs)
    assert thinking == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(messages, enable_thinking=False, **kwargs)
    assert plain == thinking + "<think>\n\n</think>\n\n"


def test_tokenizer_keeps_special_tokens_whole_and_round_trips_any_text():
    tokenizer = make_qwen_tokenizer()
    ids = tokenizer("<|im_start|>user\na zebra, 2 cats<|im_end|>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids) == "<|im_start|>user\na zebra, 2 cats<|im_end|>"
    # known words are one token each ("Ġcat"); unknown ones fall back to bytes
    assert len(tokenizer(" cat")["input_ids"]) == 1
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"


# ------------------------------------------------------------------------------ tiny model


def test_tiny_zimage_is_diffusers_layout_and_loads_back_offline(tiny_zimage_dir, pipe):
    index = json.loads((tiny_zimage_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["tokenizer"][1] == "Qwen2Tokenizer"
    assert pipe.scheduler.config.shift == 6.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.tokenizer.chat_template == make_qwen_tokenizer().chat_template
    in_memory = ZImagePipeline(**build_zimage_components("tiny"))
    for name in ("transformer", "text_encoder", "vae"):
        saved = getattr(pipe, name).state_dict()
        for key, value in getattr(in_memory, name).state_dict().items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    pad_tokens = pipe.transformer.x_pad_token, pipe.transformer.cap_pad_token
    assert all(bool(t.isfinite().all()) and float(t.detach().abs().sum()) > 0 for t in pad_tokens)


def test_weights_are_a_function_of_the_seed_and_leave_the_callers_rng_alone():
    state = torch.random.get_rng_state()
    a = build_zimage_components("tiny", seed=3)["transformer"].state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_zimage_components("tiny", seed=3)["transformer"].state_dict()
    c = build_zimage_components("tiny", seed=4)["transformer"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_real_config_counts():
    """The parameter counts docs/zimage.md's memory arithmetic uses, on meta tensors."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Model

    from diffloop.testing.tiny_zimage import qwen3_config

    config = ZIMAGE_CONFIGS["z_image"]
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**config["transformer"])
        text_encoder = Qwen3Model(qwen3_config(config["text_encoder"], make_qwen_tokenizer()))
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(6.155e9, rel=1e-3)
    assert sum(p.numel() for p in text_encoder.parameters()) == pytest.approx(4.022e9, rel=1e-3)


# ------------------------------------------------------------------- pipeline conventions


def test_harness_runs_the_pipeline_with_and_without_cfg_and_keeps_the_prompts(pipe):
    prompts = list(PROMPTS)
    x = noise()
    plain = zimage_pipeline_latents(pipe, prompts, x, num_steps=STEPS, max_sequence_length=64)
    guided = zimage_pipeline_latents(
        pipe, prompts, x, num_steps=STEPS, guidance_scale=3.0, max_sequence_length=64
    )
    assert prompts == PROMPTS  # the pipeline rewrites the list it gets: the harness copies
    assert plain.shape == guided.shape == x.shape
    assert bool(plain.isfinite().all()) and bool(guided.isfinite().all())
    assert (plain - guided).abs().max() > 1e-3
    again = zimage_pipeline_latents(pipe, prompts, x, num_steps=STEPS, max_sequence_length=64)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    images = zimage_pipeline_latents(
        pipe, prompts, x, num_steps=STEPS, max_sequence_length=64, output_type="pt"
    )
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1


def _captions(pipe, prompts, max_sequence_length=64):
    """The pipeline's own caption features: a list of (L_i, 16)."""
    embeds, _ = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    return embeds


def test_pipeline_feeds_reversed_time_and_steps_with_the_negated_output(pipe):
    """One pipeline step from sigma 1 to sigma_1: x' = x + (sigma_1 - 1) v with v = -output of the
    transformer at time (1000 - t) / 1000 = 0 (pure noise is time 0 for Z-Image)."""
    x = noise()
    after_one = zimage_pipeline_latents(pipe, PROMPTS, x, num_steps=1, max_sequence_length=64)
    captions = _captions(pipe, PROMPTS)
    with torch.no_grad():
        out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), torch.zeros(2), captions,
                               return_dict=False)[0]  # fmt: skip
    v = -torch.stack(out).squeeze(2).float()
    # 1 step: sigmas [1, 0] (linspace(1, 1/1, 1) shifted, then 0)
    torch.testing.assert_close(after_one, x + (0.0 - 1.0) * v, rtol=0, atol=1e-6)


def test_pipeline_cfg_is_pos_plus_s_times_pos_minus_neg(pipe):
    """The pipeline's guidance_scale s: pos + s (pos - neg) (diffloop's w = s + 1), both branches
    in one call with the positive captions first; cfg_normalization k caps the guided norm."""
    x = noise()
    s = 2.5
    captions = _captions(pipe, PROMPTS)
    negatives = _captions(pipe, ["", ""])
    with torch.no_grad():
        out = pipe.transformer(list(x.repeat(2, 1, 1, 1).unsqueeze(2).unbind(0)), torch.zeros(4),
                               captions + negatives, return_dict=False)[0]  # fmt: skip
    pos, neg = torch.stack(out[:2]).squeeze(2).float(), torch.stack(out[2:]).squeeze(2).float()
    guided = pos + s * (pos - neg)
    after_one = zimage_pipeline_latents(
        pipe, PROMPTS, x, num_steps=1, guidance_scale=s, max_sequence_length=64
    )
    torch.testing.assert_close(after_one, x + guided, rtol=0, atol=1e-5)
    # normalization with k = 1: each sample's guided output scaled to the positive's norm
    norm = torch.linalg.vector_norm
    capped = torch.stack(
        [g * (norm(p) / norm(g)) if norm(g) > norm(p) else g for g, p in zip(guided, pos)]
    )
    normalized = zimage_pipeline_latents(
        pipe, PROMPTS, x, num_steps=1, guidance_scale=s, cfg_normalization=1.0,
        max_sequence_length=64,
    )  # fmt: skip
    torch.testing.assert_close(normalized, x + capped, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ the policy


@pytest.mark.parametrize(
    "w, zimage",
    [(1.0, {}), (4.0, {}), (4.0, {"cfg_normalization": 1.0}), (4.0, {"cfg_truncation": 0.5})],
    ids=["no_cfg", "cfg", "cfg_normalization", "cfg_truncation"],
)
def test_noise_0_sample_equals_the_pipelines_images_from_the_same_noise(
    tiny_zimage_dir, pipe, w, zimage
):
    """diffloop's w is the pipeline's guidance_scale + 1; truncation 0.5 turns CFG off on the
    later steps of the 3 (time 1 - sigma > 0.5), normalization caps the guided norm."""
    policy = policy_for(tiny_zimage_dir, guidance_scale=w, **zimage)
    traj = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.0, guidance_scale=w)
    noise = torch.stack([torch.randn(16, 16, 16, generator=g) for g in generators()])
    expected = zimage_pipeline_latents(
        pipe, PROMPTS, noise, num_steps=STEPS, guidance_scale=w - 1, max_sequence_length=TEXT,
        output_type="pt", **zimage,
    )  # fmt: skip
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-5)


def test_schedule_is_the_pipelines(tiny_zimage_dir, pipe):
    policy = policy_for(tiny_zimage_dir)
    sigmas, timesteps = policy.schedule(STEPS)
    zimage_pipeline_latents(pipe, PROMPTS, noise(), num_steps=STEPS, max_sequence_length=TEXT)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    torch.testing.assert_close(timesteps, pipe.scheduler.timesteps.float(), rtol=0, atol=0)
    assert float(sigmas[1]) > 0.9  # shift 6 keeps the first steps near pure noise


def test_velocity_is_minus_the_transformer_output_and_a_noise_0_step_is_the_schedulers(
    tiny_zimage_dir,
):
    """The flow convention of core.flow: v = -output at the time (1000 - t) / 1000, and the SDE
    step's mean at noise level 0 is FlowMatchEulerDiscreteScheduler.step with v."""
    from diffloop.core import flow_step_mean_std

    policy = policy_for(tiny_zimage_dir)
    policy.train(False)
    sigmas, timesteps = policy.schedule(STEPS)
    x = noise()
    embeds, negative, extra = policy.conditioning(PROMPTS, "")
    t = timesteps[1].expand(2)
    with torch.no_grad():
        v = policy.velocity(x, t, embeds, negative, extra, 1.0)
        captions = policy.branch_kwargs(embeds, extra, negative=False)["cap_feats"]
        out = policy.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions,
                                 return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(v, -torch.stack(out).squeeze(2).float(), rtol=0, atol=0)
    mean, std = flow_step_mean_std(v, x, sigmas[1], sigmas[2], noise_level=0.0)
    scheduler = policy.scheduler
    scheduler._step_index = None
    scheduler.set_begin_index(1)
    expected = scheduler.step(v, timesteps[1], x, return_dict=False)[0]
    torch.testing.assert_close(mean, expected, rtol=0, atol=0)
    assert float(std.abs().max()) == 0.0


def test_captions_keep_their_lengths_and_a_batch_equals_its_samples(tiny_zimage_dir, pipe):
    """Each caption reaches the transformer cut to its own length (the transformer pads it to 32
    with a learned token: zero padding would be another input); the captions are the pipeline's,
    and a batch of prompts of different lengths gives each sample's own velocity."""
    policy = policy_for(tiny_zimage_dir)
    policy.train(False)
    prompts = ["a cat", "a red dog on a bench and a blue car"]
    embeds, negative, extra = policy.conditioning(prompts, "")
    lengths = extra["prompt_lengths"].tolist()
    assert lengths[0] < lengths[1] and embeds.shape[1] == TEXT
    for caption, own in zip(policy.branch_kwargs(embeds, extra, False)["cap_feats"], _captions(
        pipe, prompts, TEXT
    )):  # fmt: skip
        torch.testing.assert_close(caption, own, rtol=0, atol=0)
    x, t = noise(), torch.full((2,), 700.0)
    with torch.no_grad():
        both = policy.velocity(x, t, embeds, negative, extra, 4.0)
        for i in range(2):
            one = {k: v[i : i + 1] for k, v in extra.items()}
            alone = policy.velocity(x[i : i + 1], t[:1], embeds[i : i + 1], negative[i : i + 1],
                                    one, 4.0)  # fmt: skip
            torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=1e-5)
        padded = {**extra, "prompt_lengths": torch.full_like(extra["prompt_lengths"], TEXT)}
        zero_padded = policy.velocity(x, t, embeds, negative, padded, 4.0)
    assert (zero_padded - both).abs().max() > 1e-3


def test_each_distinct_prompt_is_encoded_once_and_the_prompts_are_left_alone(tiny_zimage_dir):
    policy = policy_for(tiny_zimage_dir)
    rows: list[int] = []
    handle = policy.text_encoder.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True
    )
    prompts = ["a cat"] * 3 + ["a dog"] * 3
    try:
        embeds, _, extra = policy.conditioning(prompts, "blurry")
    finally:
        handle.remove()
    assert prompts == ["a cat"] * 3 + ["a dog"] * 3
    # the two distinct prompts, each alone (a batch of one: no embedding depends on its batch),
    # then the negative prompt once
    assert rows == [1, 1, 1]
    torch.testing.assert_close(embeds[0], embeds[2], rtol=0, atol=0)
    assert len(set(extra["negative_lengths"].tolist())) == 1


def test_truncation_is_per_sample_when_samples_are_at_different_times(tiny_zimage_dir):
    """Training batches mix window steps: cfg_truncation decides per sample, as the pipeline does
    per step."""
    policy = policy_for(tiny_zimage_dir, guidance_scale=4.0, cfg_truncation=0.5)
    policy.train(False)
    embeds, negative, extra = policy.conditioning(PROMPTS, "")
    x, t = noise(), torch.tensor([900.0, 200.0])  # times 0.1 (CFG) and 0.8 (truncated)
    with torch.no_grad():
        mixed = policy.velocity(x, t, embeds, negative, extra, 4.0)
        cfg = policy.velocity(x[:1], t[:1], embeds[:1], negative[:1],
                              {k: v[:1] for k, v in extra.items()}, 4.0)  # fmt: skip
        plain = policy.velocity(x[1:], t[1:], embeds[1:], negative[1:],
                                {k: v[1:] for k, v in extra.items()}, 1.0)  # fmt: skip
    torch.testing.assert_close(mixed, torch.cat([cfg, plain]), rtol=0, atol=1e-5)


def test_offloaded_text_encoder_waits_in_cpu_memory_and_encodes_the_same(tiny_zimage_dir):
    policy = policy_for(tiny_zimage_dir)
    offloaded = ZImagePolicy.from_model(
        ModelConfig(pretrained=str(tiny_zimage_dir), resolution=32, offload_text_encoders=True,
                    zimage=ZImageConfig(max_sequence_length=TEXT)),
        LoraConfig(), device=CPU, sample=SampleConfig(),
    )  # fmt: skip
    assert offloaded.offload_text_encoders and not policy.offload_text_encoders
    a, b = policy.conditioning(PROMPTS, ""), offloaded.conditioning(PROMPTS, "")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert offloaded.text_encoder.device.type == "cpu"


def test_family_is_read_from_model_index(tiny_zimage_dir):
    assert detect_family(str(tiny_zimage_dir)) == "zimage"
    config = load_config(
        None, [f"model.pretrained={tiny_zimage_dir}", "model.resolution=32",
               "model.zimage.max_sequence_length=64"],
    )  # fmt: skip
    assert isinstance(load_policy(config.model, config.lora, device=CPU), ZImagePolicy)


@pytest.mark.parametrize("component", [c.name for c in family("zimage").components])
def test_missing_component_is_a_clear_error(tiny_zimage_dir, tmp_path, component):
    broken = tmp_path / "zimage"
    shutil.copytree(tiny_zimage_dir, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(
        ModelLoadError,
        match=rf"lacks the component folder\(s\) {component}/\. "
        r".*ZImagePipeline.save_pretrained.*hf download Tongyi-MAI/Z-Image",
    ):
        policy_for(broken)


def test_resolution_and_text_length_are_checked(tiny_zimage_dir):
    with pytest.raises(ModelLoadError, match=r"model.resolution=30 must be a multiple of 4"):
        load_zimage_policy(ModelConfig(pretrained=str(tiny_zimage_dir), resolution=30),
                           LoraConfig(), device=CPU)  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.zimage.max_sequence_length=2000"):
        load_zimage_policy(
            ModelConfig(pretrained=str(tiny_zimage_dir), resolution=32,
                        zimage=ZImageConfig(max_sequence_length=2000)),
            LoraConfig(), device=CPU,
        )  # fmt: skip


def test_full_fine_tuning_exports_a_loadable_zimage_pipeline(tiny_zimage_dir, tmp_path):
    policy = policy_for(tiny_zimage_dir, lora=False)
    with torch.no_grad():
        policy.transformer.x_pad_token.add_(1.0)
    policy.export(tmp_path / "export")
    reloaded = ZImagePipeline.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(
        reloaded.transformer.x_pad_token, policy.transformer.x_pad_token.detach(), rtol=0, atol=0
    )
    assert reloaded.scheduler.config.shift == 6.0


def test_shipped_zimage_configs_validate(capsys):
    from importlib import resources

    from diffloop.cli import main

    configs = sorted((resources.files("diffloop") / "configs").glob("zimage_*.yaml"))
    assert [p.name for p in configs] == [
        "zimage_pickscore.yaml",
        "zimage_turbo_compbench_color.yaml",
    ]
    for path in configs:
        assert main(["check-config", str(path)]) == 0
        config = load_config(str(path))
        assert config.lora.target_modules[:1] == ["attention.to_q"]
        assert config.sample.sde_window == [1, 3, 1] and config.train.clip_range == 1e-4
    assert "OK" in capsys.readouterr().out


def test_bench_tiny_zimage_counts_two_evaluations_per_step_with_cfg(tmp_path):
    from diffloop.tools.bench import bench_main

    out = tmp_path / "bench_zimage.json"
    argv = ["--shape", "tiny_zimage", "--device", "cpu", "--steps", "2", "--sample-batch", "1",
            "--train-batch", "1", "--repeats", "1", "--warmup", "0", "--output",
            str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    sample = result["items"]["sample"]
    assert sample["unet_evals_per_s"] == pytest.approx(1 * 2 * 2 / sample["median_s"], rel=1e-12)
    assert result["floor"]["unet_flop_per_eval"] > 0
