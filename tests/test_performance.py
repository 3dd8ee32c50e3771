"""Speed options (``performance.*``): each keeps the on-policy ratio at 1 and changes nothing else.

torch.compile is exercised with the ``aot_eager`` backend (dynamo tracing + AOT autograd, no code
generation): inductor on this CPU takes minutes per graph. docs/performance.md lists what was
measured with inductor.
"""

from __future__ import annotations

import pytest
import torch

from diffloop.config import ConfigError, LoraConfig, ModelConfig, PerformanceConfig, load_config
from diffloop.loops import SamplerSettings, transition_log_prob
from diffloop.policies.families import load_policy
from diffloop.testing.runs import run

STEPS = 3
SAMPLER = SamplerSettings(num_steps=STEPS, eta=1.0, guidance_scale=3.0)


def make_policy(model_dir, **perf) -> object:
    torch.manual_seed(0)
    policy = load_policy(
        ModelConfig(pretrained=str(model_dir)),
        LoraConfig(),
        device=torch.device("cpu"),
        performance=PerformanceConfig(**perf),
    )
    # peft starts LoRA B at zero (a no-op adapter): give the adapter a real update to merge and
    # trace.
    with torch.no_grad():
        for name, p in policy.named_trainable_parameters().items():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return policy


def sample(policy, seeds=(0, 1)):
    return policy.sample(
        ["a red cat", "a dog on a bench"][: len(seeds)],
        [torch.Generator().manual_seed(s) for s in seeds],
        num_steps=STEPS,
        eta=1.0,
        guidance_scale=3.0,
    )


def recomputed_log_probs(policy, traj) -> torch.Tensor:
    """(N, T) log-probs of the recorded transitions through the training path."""
    with torch.no_grad():
        steps = [
            transition_log_prob(policy, traj, torch.full((len(traj),), j), SAMPLER)[0]
            for j in range(STEPS)
        ]
    return torch.stack(steps, dim=1)


OPTIONS = {
    "channels_last": {"channels_last": True},
    "eager_attention": {"attention": "eager"},
    "merged_lora": {"merge_lora_for_sampling": True},
    "compiled_all": {"compile": "all", "compile_backend": "aot_eager"},
    "everything": {"compile": "sampling", "compile_backend": "aot_eager", "channels_last": True,
                   "merge_lora_for_sampling": True, "decode_batch_size": 1},
}  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_keeps_ratio_one_and_samples_the_same_policy(tiny_sd, name):
    baseline = sample(make_policy(tiny_sd))
    policy = make_policy(tiny_sd, **OPTIONS[name])
    traj = sample(policy)
    # Ratio 1: the training path (maybe eager, maybe compiled) recomputes the sampled log-probs.
    assert (recomputed_log_probs(policy, traj) - traj.log_probs).abs().max() < 1e-5
    # And it is the same policy as without the option: same noise, same trajectory.
    assert (traj.latents - baseline.latents).abs().max() < 1e-4
    assert (traj.log_probs - baseline.log_probs).abs().max() < 1e-5


def test_compiled_module_is_the_one_called(tiny_sd):
    policy = make_policy(tiny_sd, compile="sampling", compile_backend="aot_eager")
    assert isinstance(policy._unet_for["sampling"], torch._dynamo.eval_frame.OptimizedModule)
    assert policy._unet_for["training"] is policy.unet
    # Shared parameters: a LoRA update reaches the compiled sampler.
    before = sample(policy).latents
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(2.0)
    assert (sample(policy).latents - before).abs().max() > 1e-4


def test_merged_lora_restores_the_exact_base_weights_and_is_the_adapted_policy(tiny_sd):
    policy = make_policy(tiny_sd, merge_lora_for_sampling=True)
    base = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if not p.requires_grad}
    traj = sample(policy)
    after = {n: p.detach() for n, p in policy.unet.named_parameters() if not p.requires_grad}
    assert all(torch.equal(base[n], after[n]) for n in base), (
        "base weights drifted after merge/unmerge"
    )
    # The merged sampler includes the adapter: it differs from the base model (adapter disabled).
    with policy.reference():
        base_traj = sample(policy)
    assert (traj.latents - base_traj.latents).abs().max() > 1e-3
    # Training recomputes the merged sampler's log-probs with the unmerged adapter.
    assert (recomputed_log_probs(policy, traj) - traj.log_probs).abs().max() < 1e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("performance.compile=everything", "performance.compile='everything' must be one of"),
        ("performance.compile_mode=fast", "performance.compile_mode='fast'"),
        ("performance.attention=flash", "performance.attention='flash'"),
        ("performance.decode_batch_size=0", "performance.decode_batch_size=0"),
    ],
)
def test_invalid_performance_options_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_merged_lora_in_half_precision_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="rounded away"):
        load_config(
            None, ["performance.merge_lora_for_sampling=true", "train.mixed_precision=bf16"]
        )
    with pytest.raises(ConfigError, match="lora.enabled=true"):
        load_config(None, ["performance.merge_lora_for_sampling=true", "lora.enabled=false"])


def test_trainer_with_every_option_stays_on_policy(tiny_sd, tmp_path):
    rows = run(tiny_sd, tmp_path / "run", num_epochs=1, **{
        "train.batch_size": 4, "performance.compile": "all",
        "performance.compile_backend": "aot_eager",
        "performance.channels_last": True, "performance.merge_lora_for_sampling": True,
    })  # fmt: skip
    assert rows[0]["optimizer_steps"] == 1
    assert rows[0]["onpolicy_logprob_err"] < 1e-5


def test_backend_flags_are_set_by_the_trainer_function_not_by_a_policy(tiny_sd):
    from diffloop.performance import set_backend_flags

    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_num_threads(),
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        make_policy(tiny_sd, allow_tf32=False)  # building a policy leaves process-wide flags alone
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_backend_flags(PerformanceConfig(allow_tf32=False), torch.device("cuda"), cpu_threads=1)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_num_threads() == 1
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, threads = saved
        torch.set_num_threads(threads)
