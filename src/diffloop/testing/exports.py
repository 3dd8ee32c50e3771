"""Checks that an exported LoRA reloads in diffusers and reproduces the trained transformer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def perturb_lora_b(policy, std: float = 0.05) -> None:
    """Give every ``lora_B`` (zero at injection) seeded random values, so the adapter changes the
    model as a trained one would."""
    with torch.no_grad():
        for name, p in policy.named_trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))


def assert_lora_reload_reproduces_transformer(
    policy, pipe, out: Path, prompts: Sequence[str]
) -> None:
    """Export ``policy``'s (perturbed) LoRA to ``out``, load it into ``pipe`` (the base pipeline)
    with ``load_lora_weights`` and compare the transformers' outputs at two timesteps: the
    reloaded one equals the trained one (1e-5) and differs from the base (> 1e-3)."""
    perturb_lora_b(policy)
    policy.export(out)
    pipe.load_lora_weights(str(out))
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond, t = policy.unet_conditioning(list(prompts)), torch.tensor([0.5, 0.02])
    with torch.no_grad():
        trained = policy.transformer(hidden_states=x, timestep=t, **cond).sample
        got = pipe.transformer(hidden_states=x, timestep=t, **cond).sample
        with policy.reference():
            base = policy.transformer(hidden_states=x, timestep=t, **cond).sample
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-5)


def assert_full_export_reproduces_transformer(policy, pipeline_cls, out: Path, prompts):
    """Full fine-tuning: change the transformer's output projection (a "trained" model), export
    the whole pipeline to ``out`` and load it with ``pipeline_cls.from_pretrained``: its
    transformer gives the trained outputs (1e-6). Returns the loaded pipeline."""
    assert all("lora" not in n for n in policy.named_trainable_parameters())
    with torch.no_grad():
        policy.transformer.proj_out.weight.add_(0.05)
    policy.export(out)
    exported = pipeline_cls.from_pretrained(out)
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond, t = policy.unet_conditioning(list(prompts)), torch.tensor([0.5, 0.02])
    with torch.no_grad():
        trained = policy.transformer(hidden_states=x, timestep=t, **cond).sample
        got = exported.transformer(hidden_states=x, timestep=t, **cond).sample
    torch.testing.assert_close(got, trained, rtol=0, atol=1e-6)
    return exported
