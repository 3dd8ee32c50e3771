"""Qwen-Image policy: parity with diffusers' QwenImagePipeline (the template and its dropped prefix,
packing, the mu-shifted schedule with its terminal stretch, the noise-0 sample with and without true
CFG), the masked text of prompts of different lengths, windowed on-policy ratios, frozen weights,
exports, loading errors and shipped configs, on the tiny Qwen-Image of
``diffloop.testing.tiny_qwen_image`` (the conformance suite covers LoRA export, resume and the ratio
at several minibatch sizes)."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import QwenImagePipeline

from diffloop import loops
from diffloop.config import LoraConfig, ModelConfig, QwenImageConfig, SampleConfig, load_config
from diffloop.policies.families import detect_family, load_policy
from diffloop.policies.loading import ModelLoadError
from diffloop.policies.qwen_image import (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_DROP,
    QWEN_IMAGE_COMPONENTS,
    QwenImagePolicy,
    load_qwen_image_policy,
    true_cfg,
)
from diffloop.testing.exports import (
    assert_full_export_reproduces_transformer,
    assert_lora_reload_reproduces_transformer,
)
from diffloop.testing.tiny_qwen_image import (
    make_qwen_tokenizer,
    pipeline_initial_latents,
    pipeline_reference,
)

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a red dog on the moon and two blue horse"]  # 2 and 10 tokens
SEEDS = [11, 12]
STEPS = 4
W = 4.0  # true_cfg_scale: QwenImagePipeline's default, Flow-Factory's and verl-omni's
SIZE = 32  # pixels: 8 x 8 latents of the tiny VAE, 16 packed tokens


def policy_for(path, *, lora: bool = True, qwen_image: QwenImageConfig | None = None,
               resolution=SIZE, **sample) -> QwenImagePolicy:  # fmt: skip
    torch.manual_seed(0)
    sample = SampleConfig(**{"num_steps": STEPS, "eta": 0.7, "guidance_scale": W, **sample})
    model = ModelConfig(
        pretrained=str(path), qwen_image=qwen_image or QwenImageConfig(), resolution=resolution
    )
    return load_qwen_image_policy(model, LoraConfig(enabled=lora), device=CPU, sample=sample)


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def settings(eta: float = 0.7, guidance_scale: float = W) -> loops.SamplerSettings:
    return loops.SamplerSettings(STEPS, eta, guidance_scale)


@pytest.fixture(scope="module")
def pipe(tiny_qwen_image):
    return QwenImagePipeline.from_pretrained(tiny_qwen_image)


# ---------------------------------------------------------------------- QwenImagePipeline parity


def test_template_and_dropped_prefix_are_the_pipelines(pipe):
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == PROMPT_TEMPLATE_DROP
    # the in-code tokenizer splits the template as Qwen2.5-VL's: the prefix is exactly 34 tokens
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(make_qwen_tokenizer()(prefix).input_ids) == PROMPT_TEMPLATE_DROP


def test_text_equals_the_pipelines_encode_prompt_and_masks_the_shorter_prompt(
    tiny_qwen_image, pipe
):
    policy = policy_for(tiny_qwen_image)
    embeds, _, extra = policy.conditioning(PROMPTS, " ")
    expected, expected_mask = pipe.encode_prompt(PROMPTS, device=CPU, max_sequence_length=512)
    length = expected.shape[1]  # the longest prompt's tokens + the template's 5 closing tokens
    assert length == 15 and embeds.shape[1] == policy.max_sequence_length == 512
    # each prompt is encoded alone (so a cached embedding never depends on its batch): exactly
    # the pipeline's encoding of that prompt alone, and the batch's up to its padding's rounding
    for i, prompt in enumerate(PROMPTS):
        alone, _ = pipe.encode_prompt([prompt], device=CPU, max_sequence_length=512)
        torch.testing.assert_close(embeds[i : i + 1, : alone.shape[1]], alone, rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, :length], expected, rtol=0, atol=1e-6)
    assert extra["prompt_embeds_mask"][:, :length].tolist() == expected_mask.tolist()
    assert extra["prompt_embeds_mask"].sum(1).tolist() == [7, 15]  # 2 + 5 and 10 + 5 tokens
    assert not embeds[0, 7:].any()  # zero-padded as the pipeline pads
    # a batch of one prompt: no mask, as the pipeline's encode_prompt (every token valid)
    kwargs = policy.branch_kwargs(embeds[:1], {k: v[:1] for k, v in extra.items()}, False)
    assert kwargs["encoder_hidden_states"].shape[1] == 7
    assert kwargs["encoder_hidden_states_mask"] is None


def test_schedule_equals_the_pipelines_with_its_terminal_stretch(tiny_qwen_image, pipe):
    for resolution in (32, 64):  # 16 and 64 image tokens
        policy = policy_for(tiny_qwen_image, resolution=resolution)
        sigmas, timesteps = policy.schedule(6)
        pipe("a cat", num_inference_steps=6, height=resolution, width=resolution,
             true_cfg_scale=1.0, output_type="latent")  # fmt: skip
        torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert float(sigmas[-2]) == pytest.approx(0.02)  # shift_terminal


@pytest.mark.parametrize("guidance_scale", [1.0, W], ids=["one_branch", "true_cfg"])
def test_ode_sample_equals_the_pipelines_images_from_the_same_latents(
    tiny_qwen_image, pipe, guidance_scale
):
    policy = policy_for(tiny_qwen_image, guidance_scale=guidance_scale, negative_prompt=" ")
    policy.train(False)
    traj = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.0,
                         guidance_scale=guidance_scale, negative_prompt=" ")  # fmt: skip
    latents = torch.cat([pipeline_initial_latents(pipe, 1, SIZE, g) for g in generators()])
    expected = pipeline_reference(pipe, PROMPTS, latents, num_steps=STEPS, resolution=SIZE,
                                  guidance_scale=guidance_scale, negative_prompt=" ")  # fmt: skip
    assert expected.std() > 0.01  # not a blank image
    torch.testing.assert_close(traj.images, expected, rtol=0, atol=1e-5)
    assert torch.isnan(traj.log_probs).all()  # ODE steps carry no density


def test_true_cfg_rescales_to_the_conditional_norm_and_changes_the_sample(tiny_qwen_image, pipe):
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    v = true_cfg(cond, uncond, W)
    torch.testing.assert_close(v.norm(dim=-1), cond.norm(dim=-1))
    plain = uncond + W * (cond - uncond)
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True),
                               plain / plain.norm(dim=-1, keepdim=True))  # fmt: skip
    policy = policy_for(tiny_qwen_image)
    one = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.0, guidance_scale=1.0)
    two = policy.sample(PROMPTS, generators(), num_steps=STEPS, eta=0.0, guidance_scale=W)
    assert (one.images - two.images).abs().max() > 1e-3
    assert policy.evaluations_per_step(W) == 2 and policy.evaluations_per_step(1.0) == 1


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("window", [None, [0, 1, 2]])
def test_ratio_exactly_one_windowed_or_not(tiny_qwen_image, window, sde_type):
    policy = policy_for(tiny_qwen_image, sde_window=window, sde_type=sde_type)
    prompts, seeds = PROMPTS * 2, list(range(4))
    traj = next(loops.sample_batches(policy, prompts, seeds, settings(), 4))[1]
    stored = traj.timesteps.shape[1]
    assert stored == (2 if window else STEPS - 1)
    assert traj.latents.shape[1:] == (stored + 1, 16, 16)  # packed (h/2 w/2, 4C) states
    worst = 0.0
    with torch.no_grad():
        for minibatch in (1, 2, 4):
            for start in range(0, 4, minibatch):
                batch = traj.index(slice(start, start + minibatch))
                for j in range(stored):
                    step = torch.full((len(batch),), j, dtype=torch.long)
                    log_prob = loops.transition_log_prob(policy, batch, step, settings())[0]
                    assert torch.isfinite(log_prob).all()
                    worst = max(worst, float((log_prob - batch.log_probs[:, j]).abs().max()))
    assert worst <= 1e-5


def test_lora_export_keeps_alpha_and_reproduces_the_transformer(tiny_qwen_image, pipe, tmp_path):
    torch.manual_seed(0)
    model = ModelConfig(pretrained=str(tiny_qwen_image), resolution=SIZE)
    policy = load_qwen_image_policy(model, LoraConfig(rank=4, alpha=8), device=CPU)
    assert policy.peft_config.target_modules == set(policy.DEFAULT_LORA_TARGETS)
    assert_lora_reload_reproduces_transformer(
        policy, QwenImagePipeline.from_pretrained(tiny_qwen_image), tmp_path / "lora", PROMPTS
    )


def test_full_fine_tuning_exports_a_loadable_pipeline(tiny_qwen_image, tmp_path):
    policy = policy_for(tiny_qwen_image, lora=False)
    assert_full_export_reproduces_transformer(
        policy, QwenImagePipeline, tmp_path / "export", PROMPTS
    )


# ---------------------------------------------------------------------------------- loading


def test_family_is_read_from_model_index(tiny_qwen_image):
    assert detect_family(str(tiny_qwen_image)) == "qwen_image"
    config = load_config(None, [f"model.pretrained={tiny_qwen_image}", f"model.resolution={SIZE}"])
    policy = load_policy(config.model, config.lora, device=CPU, sample=config.sample)
    assert isinstance(policy, QwenImagePolicy)


@pytest.mark.parametrize("component", QWEN_IMAGE_COMPONENTS)
def test_missing_component_is_a_clear_error(tiny_qwen_image, tmp_path, component):
    broken = tmp_path / "qwen"
    shutil.copytree(tiny_qwen_image, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(
        ModelLoadError,
        match=rf"lacks the component folder\(s\) {component}/\. "
        r".*QwenImagePipeline.save_pretrained.*hf download Qwen/Qwen-Image",
    ):
        policy_for(broken)


def test_text_length_is_checked_and_long_prompts_are_logged(tiny_qwen_image, caplog):
    from diffloop.config import ConfigError

    with pytest.raises(ConfigError, match="model.qwen_image.max_sequence_length=2000"):
        policy_for(tiny_qwen_image, qwen_image=QwenImageConfig(max_sequence_length=2000))
    policy = policy_for(tiny_qwen_image, qwen_image=QwenImageConfig(max_sequence_length=8))
    with caplog.at_level("WARNING", logger="diffloop.policies.qwen_image"):
        embeds, _, extra = policy.conditioning(PROMPTS, "")
    assert embeds.shape[1] == 8 and extra["prompt_embeds_mask"].sum(1).tolist() == [7, 8]
    assert "1 of 2 prompts are longer than 8 tokens" in caplog.text


def test_shipped_qwen_image_configs_validate(capsys):
    from importlib.resources import files

    from diffloop.cli import main

    paths = sorted(p for p in files("diffloop.configs").iterdir()
                   if p.name.startswith("qwen_image_"))  # fmt: skip
    names = [p.name for p in paths]
    assert names == [
        "qwen_image_compbench_color.yaml",
        "qwen_image_lora_48gb.yaml",  # the one-48-GB-card recipe (docs/recipes.md)
        "qwen_image_pickscore.yaml",
    ]
    rewards = set()
    for path in paths:
        assert main(["check-config", str(path)]) == 0, capsys.readouterr()
        rewards.add(load_config(str(path)).reward.name)
    assert rewards == {"blip_vqa", "pickscore"}  # one binding, one preference reward


def test_edit_variants_and_guidance_embeddings_are_refused(tiny_qwen_image, tmp_path):
    import json

    broken = tmp_path / "qwen"
    shutil.copytree(tiny_qwen_image, broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps({**config, "zero_cond_t": True}))
    with pytest.raises(ModelLoadError, match="zero_cond_t=true .*text-to-image QwenImagePipeline"):
        policy_for(broken)
    index = json.loads((tiny_qwen_image / "model_index.json").read_text())
    (broken / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "QwenImageEditPipeline"})
    )
    with pytest.raises(ModelLoadError, match="QwenImageEditPipeline"):
        detect_family(str(broken))


# ------------------------------------------------------------------------- text-encoder offload


def test_offloaded_text_encoder_encodes_the_same_and_stays_off_between_uses(tiny_qwen_image):
    """On a CPU-only machine "off the accelerator" cannot be observed by device: the encoder's
    moves are counted instead (to the policy's device for each encoding, back to CPU after)."""
    model = ModelConfig(pretrained=str(tiny_qwen_image), resolution=SIZE,
                        offload_text_encoders=True)  # fmt: skip
    torch.manual_seed(0)
    policy = load_qwen_image_policy(model, LoraConfig(), device=CPU)
    assert policy.offload_text_encoders
    moves = []
    original = policy.text_encoder.to
    policy.text_encoder.to = lambda *a, **k: moves.append(a[0]) or original(*a, **k)
    embeds, negative, _ = policy.conditioning(PROMPTS, " ")
    assert [str(m) for m in moves] == ["cpu", "cpu"]  # to the device (here the CPU), then back
    plain = policy_for(tiny_qwen_image)
    expected = plain.conditioning(PROMPTS, " ")
    torch.testing.assert_close(embeds, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(negative, expected[1], rtol=0, atol=0)


def test_offload_is_implemented_by_every_family(tiny_flux):
    """The base moves the text encoders (``text_encoders_on_device``): FLUX.1, once refused, now
    offloads too (the deprecated field read as model.text_encoder_device=offload)."""
    config = load_config(None, [f"model.pretrained={tiny_flux}", "model.offload_text_encoders=true",
                                "sample.guidance_scale=3.5"])  # fmt: skip
    assert config.model.text_encoder_device == "offload"
    policy = load_policy(config.model, config.lora, device=CPU, sample=config.sample)
    assert policy.offload_text_encoders
    assert {e.device.type for e in policy.text_encoders()} == {"cpu"}


# ---------------------------------------------------------------------------------- bench


def test_bench_tiny_qwen_image_counts_two_evaluations_per_step_and_is_on_policy(tmp_path):
    import json

    from diffloop.tools.bench import bench_main

    out = tmp_path / "bench_qwen_image.json"
    argv = ["--shape", "tiny_qwen_image", "--device", "cpu", "--steps", "2", "--sample-batch",
            "1", "--train-batch", "1", "--repeats", "1", "--warmup", "0",
            "--output", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    sample = result["items"]["sample"]
    # true CFG (the shape's guidance 4): two transformer calls per sample and step
    assert sample["unet_evals_per_s"] == pytest.approx(2 * 2 * 1 / sample["median_s"], rel=1e-12)
    assert result["floor"]["unet_flop_per_eval"] > 0
    assert result["onpolicy_logprob_err"] <= 1e-5


def test_qwen_image_shape_is_qwen_image():
    """The bench's qwen_image shape is Qwen/Qwen-Image's transformer and VAE (counted on the meta
    device): 20.43e9 and 0.127e9 parameters."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from diffloop.testing.tiny_qwen_image import QWEN_IMAGE_CONFIGS
    from diffloop.tools.bench.models import QWEN_IMAGE_SHAPES

    size, resolution = QWEN_IMAGE_SHAPES["qwen_image"]
    configs = QWEN_IMAGE_CONFIGS[size]
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**configs["transformer"])
        vae = AutoencoderKLQwenImage(**configs["vae"])
    assert sum(p.numel() for p in transformer.parameters()) == 20_430_401_088
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert resolution == 512
