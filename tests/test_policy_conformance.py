"""What every DiffusionPolicy must satisfy, checked for each policy of the registry ``POLICIES``.

- on-policy ratio exactly 1: the log-prob recomputed by the training path (``loops``) equals the one
  recorded while sampling, whatever minibatch the training pass groups the trajectories in;
- after optimizer steps only adapter (LoRA) weights changed; every frozen weight is bit-identical;
- the export reloads in diffusers and reproduces the trained model's output;
- a killed and resumed run writes the same metrics.jsonl as an uninterrupted one.

A new policy (SDXL, flow matching) is one more ``PolicyCase`` line in ``POLICIES``. Tiny models, few
steps: the whole suite runs in well under a minute on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from diffloop import loops
from diffloop.config import load_config
from diffloop.policies.base import DiffusionPolicy
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import (
    comparable,
    killed_at_epoch,
    tiny_overrides,
    worst_onpolicy_logprob_error,
)
from diffloop.trainer import Trainer


def _reload_sd_pipeline_unet(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """The way a user loads the export: ``StableDiffusionPipeline.load_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(lora_dir))
    return pipe.unet


def _reload_unet_adapter(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """A pixel-space model has no VAE, hence no StableDiffusionPipeline: load the adapter on its
    UNet."""
    from diffusers import UNet2DConditionModel

    from diffloop.policies.diffusers_policy import resolve_pretrained

    unet = UNet2DConditionModel.from_pretrained(
        resolve_pretrained(str(model_dir)), subfolder="unet"
    )
    unet.load_lora_adapter(
        str(lora_dir), prefix="unet", weight_name="pytorch_lora_weights.safetensors"
    )
    return unet


def _reload_sdxl_pipeline_unet(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    pipe.load_lora_weights(str(lora_dir))
    return pipe.unet


def _reload_sd3_pipeline_transformer(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """``StableDiffusion3Pipeline.load_lora_weights``; the transformer called like a UNet."""
    from diffusers import StableDiffusion3Pipeline

    from diffloop.policies.flow import DenoiserView

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    return DenoiserView(pipe.transformer)


def _reload_flux_pipeline_transformer(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """``FluxPipeline.load_lora_weights``; the transformer called like a UNet (t / 1000 inside)."""
    from diffusers import FluxPipeline

    from diffloop.policies.flow import DenoiserView

    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    return DenoiserView(pipe.transformer, timestep_scale=1 / 1000)


def _reload_flux2_pipeline_transformer(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """``Flux2Pipeline`` / ``Flux2KleinPipeline`` ``.load_lora_weights`` (the class named by
    model_index.json); the transformer called like a UNet (t / 1000 inside)."""
    from diffusers import DiffusionPipeline

    from diffloop.policies.flow import DenoiserView

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    return DenoiserView(pipe.transformer, timestep_scale=1 / 1000)


def _reload_qwen_image_pipeline_transformer(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """``QwenImagePipeline.load_lora_weights``; the transformer called like a UNet (t / 1000
    inside)."""
    from diffusers import QwenImagePipeline

    from diffloop.policies.flow import DenoiserView

    pipe = QwenImagePipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    return DenoiserView(pipe.transformer, timestep_scale=1 / 1000)


def _reload_zimage_pipeline_transformer(model_dir: Path, lora_dir: Path) -> torch.nn.Module:
    """``ZImagePipeline.load_lora_weights``; the transformer called like a UNet (``ZImageView``:
    lists of latents and captions, the reversed time, the negated output)."""
    from diffusers import ZImagePipeline

    from diffloop.policies.zimage import ZImageView

    pipe = ZImagePipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    return ZImageView(pipe.transformer)


@dataclass(frozen=True)
class PolicyCase:
    """One policy under test: its model (a conftest fixture name, or a ``model.pretrained`` value),
    the config overrides it needs, and how diffusers reloads its export (-> the UNet to compare)."""

    name: str
    model: str
    reload: Callable[[Path, Path], torch.nn.Module]
    overrides: dict = field(default_factory=dict)
    model_is_fixture: bool = True


POLICIES = [
    PolicyCase("tiny_sd_ddim", "tiny_sd", _reload_sd_pipeline_unet),
    PolicyCase("tiny_sd_v_prediction", "tiny_sd_v", _reload_sd_pipeline_unet),
    PolicyCase("shapes_pixel", "shapes", _reload_unet_adapter, model_is_fixture=False),
    PolicyCase("tiny_sdxl", "tiny_sdxl", _reload_sdxl_pipeline_unet),
    PolicyCase("tiny_sd3", "tiny_sd3", _reload_sd3_pipeline_transformer),
    PolicyCase(
        "tiny_flux_dev",
        "tiny_flux",
        _reload_flux_pipeline_transformer,
        {"sample.guidance_scale": 3.5},
    ),
    PolicyCase(
        "tiny_flux2_dev",
        "tiny_flux2",
        _reload_flux2_pipeline_transformer,
        {"sample.guidance_scale": 4.0},
    ),
    PolicyCase(
        "tiny_flux2_klein_cfg",
        "tiny_flux2_klein",
        _reload_flux2_pipeline_transformer,
        {"sample.guidance_scale": 4.0},
    ),
    PolicyCase(
        "tiny_qwen_image_true_cfg",
        "tiny_qwen_image",
        _reload_qwen_image_pipeline_transformer,
        {"sample.guidance_scale": 4.0, "model.resolution": 32},
    ),
    PolicyCase(
        "tiny_zimage_cfg",
        "tiny_zimage",
        _reload_zimage_pipeline_transformer,
        {
            "sample.guidance_scale": 4.0,
            "model.resolution": 32,
            "model.zimage.max_sequence_length": 64,
        },
    ),
]

STEPS = 3


@pytest.fixture(params=POLICIES, ids=lambda c: c.name)
def case(request):
    """(PolicyCase, model directory or name)."""
    c = request.param
    return c, request.getfixturevalue(c.model) if c.model_is_fixture else c.model


def overrides(case, out: Path, **extra) -> list[str]:
    c, model = case
    return tiny_overrides(model, out, **{"sample.num_steps": STEPS, **c.overrides, **extra})


def trainer(case, out: Path, **extra) -> Trainer:
    return Trainer(load_config(None, overrides(case, out, **extra)))


@pytest.mark.parametrize("minibatch", [1, 2, 4])
def test_ratio_is_exactly_one_on_policy(case, tmp_path, minibatch):
    t = trainer(case, tmp_path / "run")
    assert isinstance(t.policy, DiffusionPolicy)  # the protocol is all the trainer and loops use
    seeds = list(range(4))
    traj = next(
        loops.sample_batches(t.policy, ["a cat", "a dog on a bench"] * 2, seeds, t.sampler, 4)
    )[1]
    worst = 0.0
    with torch.no_grad():
        for start in range(0, 4, minibatch):
            batch = traj.index(slice(start, start + minibatch))
            for j in range(batch.timesteps.shape[1]):  # every stored step (a flow window: T - 1)
                step = torch.full((len(batch),), j, dtype=torch.long)
                log_prob = loops.transition_log_prob(t.policy, batch, step, t.sampler)[0]
                assert torch.isfinite(log_prob).all()
                worst = max(worst, float((log_prob - batch.log_probs[:, j]).abs().max()))
    assert worst <= 1e-5


FLOW_CASES = [c for c in POLICIES if c.model not in ("tiny_sd", "tiny_sd_v", "shapes", "tiny_sdxl")]


@pytest.mark.parametrize("minibatch", [1, 2, 4])
@pytest.mark.parametrize(
    "sampler", [{"sample.sde_type": "cps"}, {"sample.sde_window": [0, 1, 1]}], ids=["cps", "window"]
)
@pytest.mark.parametrize("flow_case", FLOW_CASES, ids=lambda c: c.name)
def test_flow_ratio_is_one_with_cps_and_with_a_window(
    flow_case, request, tmp_path, minibatch, sampler
):
    """The flow families' other samplers: CPS, and a window of stored SDE steps (the rest ODE)."""
    t = Trainer(
        load_config(
            None,
            tiny_overrides(
                request.getfixturevalue(flow_case.model),
                tmp_path / "run",
                **{"sample.num_steps": STEPS, **flow_case.overrides, **sampler},
            ),
        )
    )
    traj = next(
        loops.sample_batches(
            t.policy, ["a cat", "a dog on a bench"] * 2, list(range(4)), t.sampler, 4
        )
    )[1]
    stored = traj.timesteps.shape[1]
    assert stored == (1 if "sample.sde_window" in sampler else STEPS - 1)  # the window holds
    assert worst_onpolicy_logprob_error(t, traj, minibatch) <= 1e-5


def test_only_adapter_weights_change(case, tmp_path):
    t = trainer(case, tmp_path / "run", num_epochs=1)
    modules = {"unet": t.policy.unet, "text_encoder": t.policy.text_encoder, "vae": t.policy.vae}
    before = {(m, n): p.detach().clone() for m, mod in modules.items() if mod is not None
              for n, p in mod.named_parameters()}  # fmt: skip
    t.train()
    assert t.optimizer_steps >= 1
    after = {
        (m, n): p
        for m, mod in modules.items()
        if mod is not None
        for n, p in mod.named_parameters()
    }
    changed = {k for k, p in after.items() if not torch.equal(p, before[k])}
    adapter = {k for k in before if k[0] == "unet" and "lora_" in k[1]}
    assert changed and changed <= adapter, (
        f"frozen weights changed: {sorted(changed - adapter)[:3]}"
    )
    assert any("lora_B" in n for _, n in changed)


def test_export_reloads_in_diffusers_and_reproduces_the_trained_model(case, tmp_path):
    c, model = case
    t = trainer(case, tmp_path / "run", num_epochs=1, **{"train.learning_rate": 0.1})
    t.train()
    reloaded = c.reload(Path(model), tmp_path / "run" / "lora").eval()
    policy = t.policy
    policy.train(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *policy.latent_shape(), generator=g)
    cond = (
        policy.unet_conditioning(["a cat", "a red ball"])
        if hasattr(policy, "unet_conditioning")
        else {"encoder_hidden_states": policy.encode_prompts(["a cat", "a red ball"])}
    )
    ts = torch.tensor([500, 20])
    with torch.no_grad():
        trained = policy.unet(x, ts, **cond).sample
        got = reloaded(x, ts, **cond).sample
        with policy.reference():
            base = policy.unet(x, ts, **cond).sample
    assert (trained - base).abs().max() > 1e-4, (
        "training did not move the model: the check proves nothing"
    )
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-5)


def test_kill_and_resume_equals_uninterrupted(case, tmp_path):
    extra = {"num_epochs": 3}
    full = trainer(case, tmp_path / "full", **extra).train()
    with killed_at_epoch(2):
        trainer(case, tmp_path / "killed", **extra).train()
    trainer(case, tmp_path / "killed", resume=True, **extra).train()
    assert comparable(read_metrics(tmp_path / "killed" / "metrics.jsonl")) == comparable(full)


def test_header_counts_are_what_sampling_does(case, tmp_path):
    """``stored_steps`` is the number of log-probs a sampled trajectory holds and
    ``evaluations_per_step`` the denoiser rows one step runs per sample (counted by a forward
    pre-hook: 2 with CFG, 1 for guidance-distilled FLUX); the run header prints both."""
    from diffloop.config import trained_steps

    t = trainer(case, tmp_path / "run")
    rows: list[int] = []

    def count_rows(_module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        rows.append(len(x))  # a batch tensor, or Z-Image's list of latents

    handle = t.policy.denoiser.register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        traj = next(loops.sample_batches(t.policy, ["a cat", "a dog"], [0, 1], t.sampler, 2))[1]
    finally:
        handle.remove()
    g = t.config.sample.guidance_scale
    per_step = t.policy.evaluations_per_step(g)
    assert per_step == (1 if t.policy.guidance_distilled or g == 1.0 else 2)
    assert sum(rows) == 2 * STEPS * per_step
    assert traj.log_probs.shape[1] == t.policy.stored_steps(STEPS)
    assert t.arithmetic.unet_evals_per_sample == STEPS * per_step
    assert (
        t.arithmetic.trained_timesteps_per_sample
        == trained_steps(t.config, traj.log_probs.shape[1])[1]
    )
