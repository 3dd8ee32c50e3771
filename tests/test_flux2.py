"""FLUX.2 (dev and Klein) against diffusers' own pipelines, and the family's traps, on the tiny
pipelines of ``diffloop.testing.tiny_flux2`` (built in code; nothing downloaded). The policy
suite (ratio, adapters only, export, resume) runs on them in test_policy_conformance.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffloop.config import ConfigError, Flux2Config, LoraConfig, ModelConfig, SampleConfig
from diffloop.policies.flux2 import Flux2KleinPolicy, Flux2Policy
from diffloop.testing import tiny_flux2 as tf

PROMPTS = ["a photo of a cat", "a red dog on the moon"]
STEPS = 3
CPU = torch.device("cpu")


def _policy(pipe, **sample) -> Flux2Policy:
    """A LoRA policy on ``pipe``'s components (a fresh adapter leaves the model's output as is)."""
    components = dict(pipe.components)
    cls = Flux2Policy
    if "is_distilled" in pipe.config:
        cls = Flux2KleinPolicy
        components["is_distilled"] = bool(pipe.config.is_distilled)
    return cls(components, LoraConfig(rank=4, alpha=8), device=CPU,
               sample=SampleConfig(**sample) if sample else None)  # fmt: skip


def _noise(policy, n: int) -> torch.Tensor:
    """Sample i's initial noise as the policy draws it from generator i (the patchified shape the
    pipeline's latents argument takes)."""
    return torch.stack(
        [torch.randn(policy.noise_shape(), generator=torch.Generator().manual_seed(i))
         for i in range(n)]
    )  # fmt: skip


def _parity(make_pipe, guidance: float, negative_prompt: str = "") -> None:
    """policy.sample at noise level 0 == the pipeline from the same latents: every state of the
    trajectory and the images, to 1e-5."""
    policy = _policy(make_pipe(), guidance_scale=guidance, negative_prompt=negative_prompt)
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    traj = policy.sample(PROMPTS, generators, num_steps=STEPS, eta=0.0, guidance_scale=guidance,
                         negative_prompt=negative_prompt)  # fmt: skip
    ref = tf.reference_sample(
        make_pipe(), PROMPTS, _noise(policy, len(PROMPTS)), STEPS, guidance,
        negative_prompt=negative_prompt or None, max_sequence_length=policy.max_sequence_length,
    )  # fmt: skip
    stored = traj.latents.shape[1]
    torch.testing.assert_close(traj.latents, torch.stack(ref.trajectory[:stored], 1),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(traj.images, ref.images, atol=1e-5, rtol=0)


def test_dev_noise0_sample_equals_flux2_pipeline():
    _parity(tf.build_tiny_flux2, guidance=4.0)


def test_dev_guidance_value_reaches_the_transformer():
    """Another guidance value gives another sample (the embedding's input is not dropped)."""
    policy = _policy(tf.build_tiny_flux2())
    x = policy.initial_latents([torch.Generator().manual_seed(0)])
    embeds, negative, extra = policy.conditioning(PROMPTS[:1], "")
    t = torch.tensor([500.0])
    v1 = policy.velocity(x, t, embeds, negative, extra, 1.0)
    v4 = policy.velocity(x, t, embeds, negative, extra, 4.0)
    assert (v1 - v4).abs().max() > 1e-4


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_klein_base_noise0_sample_equals_pipeline_with_and_without_cfg(guidance):
    _parity(tf.build_tiny_flux2_klein, guidance=guidance)


def test_klein_base_negative_prompt_is_the_pipelines_negative_branch():
    _parity(tf.build_tiny_flux2_klein, guidance=4.0, negative_prompt="blue ball")


def _distilled_klein():
    return tf.build_tiny_flux2_klein(is_distilled=True)


def test_klein_distilled_noise0_sample_equals_pipeline_and_runs_one_branch():
    _parity(_distilled_klein, guidance=1.0)
    assert _policy(_distilled_klein()).evaluations_per_step(4.0) == 1  # as the pipeline: no CFG


@pytest.mark.parametrize(
    ("make", "sample", "match"),
    [
        (tf.build_tiny_flux2, {"negative_prompt": "blurry"}, "no negative branch"),
        (_distilled_klein, {"guidance_scale": 4.0}, "step-distilled"),
        (_distilled_klein, {"guidance_scale": 1.0, "negative_prompt": "blurry"}, "step-distilled"),
    ],
)  # fmt: skip
def test_settings_the_pipeline_would_ignore_are_refused(make, sample, match):
    with pytest.raises(ConfigError, match=match):
        _policy(make(), **sample)


@pytest.mark.parametrize("make", [tf.build_tiny_flux2, tf.build_tiny_flux2_klein])
def test_text_embeddings_equal_the_pipelines_encode_prompt(make):
    """The chat formatting and the hidden-state layers are the pipeline's (dev: system message,
    layers 10, 20, 30; Klein: thinking off, layers 9, 18, 27)."""
    policy = _policy(make())
    pipe = make()
    want = pipe.encode_prompt(PROMPTS, max_sequence_length=policy.max_sequence_length)[0]
    torch.testing.assert_close(policy.encode_prompts(PROMPTS), want, atol=0, rtol=0)


@pytest.mark.parametrize(("resolution", "steps"), [(32, 3), (64, 8)])
def test_schedule_equals_the_pipelines_empirical_mu_schedule(resolution, steps):
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    pipe = tf.build_tiny_flux2()
    policy = Flux2Policy(dict(tf.build_tiny_flux2().components), LoraConfig(enabled=False),
                         device=CPU, resolution=resolution)  # fmt: skip
    sigmas, timesteps = policy.schedule(steps)
    tokens = (resolution // pipe.vae_scale_factor // 2) ** 2
    mu = compute_empirical_mu(image_seq_len=tokens, num_steps=steps)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), atol=0, rtol=0)
    torch.testing.assert_close(timesteps, pipe.scheduler.timesteps.float(), atol=0, rtol=0)
    assert sigmas[1] > 1 - 1 / steps + 1e-3  # shifted towards noise: not the plain linspace


def test_position_ids_stay_integers_in_bf16():
    """Text positions run to L - 1 > 256, which bf16 rounds (257 -> 256): the ids reach the
    transformer as the pipeline's int64."""
    policy = Flux2KleinPolicy(
        dict(tf.build_tiny_flux2_klein().components) | {"is_distilled": False},
        LoraConfig(enabled=False), device=CPU, weight_dtype=torch.bfloat16,
        flux2=Flux2Config(max_sequence_length=300),
    )  # fmt: skip
    seen = {}

    def capture(_module, _args, kwargs):
        seen.update(txt=kwargs["txt_ids"], img=kwargs["img_ids"])

    policy.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    x = policy.initial_latents([torch.Generator().manual_seed(0)])
    embeds, negative, extra = policy.conditioning(PROMPTS[:1], "")
    policy.velocity(x, torch.tensor([500.0]), embeds, negative, extra, 4.0)
    assert seen["txt"].dtype == torch.int64 and seen["img"].dtype == torch.int64
    assert seen["txt"][..., 3].unique().tolist() == list(range(300))


def test_family_and_is_distilled_are_read_from_model_index(tmp_path):
    from diffloop.policies.families import detect_family, load_policy

    dev = tf.make_tiny_flux2(tmp_path / "dev")
    klein = tf.make_tiny_flux2_klein(tmp_path / "klein", is_distilled=True)
    assert detect_family(str(dev)) == "flux2"
    assert detect_family(str(klein)) == "flux2_klein"
    lora = LoraConfig(rank=4, alpha=8)
    policy = load_policy(ModelConfig(pretrained=str(klein)), lora, device=CPU,
                         sample=SampleConfig(guidance_scale=1.0))  # fmt: skip
    assert isinstance(policy, Flux2KleinPolicy) and policy.is_distilled
    assert type(load_policy(ModelConfig(pretrained=str(dev)), lora, device=CPU)) is Flux2Policy


@pytest.mark.parametrize("folder", ["text_encoder", "tokenizer", "vae", "transformer"])
def test_a_missing_component_is_named_with_how_to_provide_it(tmp_path, folder):
    from diffloop.policies.families import load_policy
    from diffloop.policies.loading import ModelLoadError

    model = tf.make_tiny_flux2_klein(tmp_path / "klein")
    shutil.rmtree(Path(model) / folder)
    with pytest.raises(ModelLoadError, match=rf"{folder}/.*Flux2KleinPipeline\.save_pretrained"):
        load_policy(ModelConfig(pretrained=str(model)), LoraConfig(), device=CPU)


def test_full_fine_tune_exports_a_loadable_klein_pipeline_with_is_distilled(tmp_path):
    from diffusers import Flux2KleinPipeline

    pipe = tf.build_tiny_flux2_klein(is_distilled=True)
    policy = Flux2KleinPolicy(dict(pipe.components) | {"is_distilled": True},
                              LoraConfig(enabled=False), device=CPU)  # fmt: skip
    policy.export(tmp_path / "full")
    assert Flux2KleinPipeline.from_pretrained(tmp_path / "full").config.is_distilled


@pytest.mark.parametrize(("shape", "guidance", "per_step"),
                         [("tiny_flux2", 4.0, 1), ("tiny_flux2_klein", 4.0, 2)])  # fmt: skip
def test_bench_shapes_count_the_families_evaluations(tmp_path, shape, guidance, per_step):
    """``diffloop bench --shape flux2 | flux2_klein`` runs on the tiny sizes: dev's guidance is an
    input (one evaluation per sample and step), the undistilled Klein runs CFG (two); FLOPs are
    counted."""
    import json

    from diffloop.tools.bench import bench_main

    out = tmp_path / "bench.json"
    argv = ["--shape", shape, "--device", "cpu", "--steps", "2", "--sample-batch", "1",
            "--train-batch", "1", "--repeats", "1", "--warmup", "0", "--guidance-scale",
            str(guidance), "--output", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    sample = result["items"]["sample"]
    assert sample["unet_evals_per_s"] == pytest.approx(per_step * 2 / sample["median_s"], rel=1e-12)
    assert result["floor"]["unet_flop_per_eval"] > 0


def test_offloaded_text_encoder_encodes_on_the_device_and_waits_in_cpu_memory(tmp_path):
    """model.offload_text_encoders: the encoder runs on the policy's device while it encodes (each
    prompt once per sampling call) and is back in CPU memory between uses; the embeddings are the
    same as without offloading."""
    from diffloop.policies.families import load_policy

    model = tf.make_tiny_flux2_klein(tmp_path / "klein")
    devices: list[str] = []
    policy = load_policy(ModelConfig(pretrained=str(model), offload_text_encoders=True),
                         LoraConfig(rank=4, alpha=8), device=CPU)  # fmt: skip
    plain = load_policy(ModelConfig(pretrained=str(model)), LoraConfig(rank=4, alpha=8), device=CPU)
    calls = policy.text_encoder.register_forward_pre_hook(
        lambda module, _args: devices.append(next(module.parameters()).device.type)
    )
    moves: list[str] = []
    to = policy.text_encoder.to

    def recording_to(device, *args, **kwargs):
        moves.append(str(device))
        return to(device, *args, **kwargs)

    policy.text_encoder.to = recording_to
    embeds, negative, _ = policy.conditioning(PROMPTS, "")
    calls.remove()
    # each prompt alone (a batch of one), then the negative prompt: once each
    assert devices == ["cpu"] * (len(PROMPTS) + 1)
    assert moves == ["cpu", "cpu"]  # to the policy's device (cpu here), then back to cpu
    want, want_negative, _ = plain.conditioning(PROMPTS, "")
    torch.testing.assert_close(embeds, want, atol=0, rtol=0)
    torch.testing.assert_close(negative, want_negative, atol=0, rtol=0)


@pytest.mark.parametrize("layers", [[], [1, 2, 40], [-1, 2, 3]])
def test_text_layers_outside_the_encoder_are_refused(layers):
    with pytest.raises(ConfigError, match="text_encoder_out_layers"):
        Flux2Policy(dict(tf.build_tiny_flux2().components), LoraConfig(enabled=False), device=CPU,
                    flux2=Flux2Config(text_encoder_out_layers=layers))  # fmt: skip


def test_text_layers_of_another_width_are_refused():
    """Two layers of a 16-wide encoder give 32 features; the transformer expects 48."""
    from diffloop.policies.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="joint_attention_dim=48"):
        Flux2Policy(dict(tf.build_tiny_flux2().components), LoraConfig(enabled=False), device=CPU,
                    flux2=Flux2Config(text_encoder_out_layers=[10, 20]))  # fmt: skip
