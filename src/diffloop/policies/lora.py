"""A policy's LoRA adapter: injection (peft, trainables in fp32), folding into the base weights for
sampling, and the diffusers LoRA file.

A policy names its adapted module by the attribute ``lora_component`` ("unet" or "transformer",
also the key prefix of diffusers' LoRA files) and the diffusers loader mixin that writes and reads
its LoRA by ``lora_loader`` (a class name in ``diffusers.loaders``, e.g.
``StableDiffusionXLLoraLoaderMixin``). Nothing here imports a pipeline class. ``diffloop.export``
uses these functions for the files it writes around the diffusers file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from diffloop.config import LoraConfig

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_module(policy: Any) -> torch.nn.Module:
    """The adapted module of ``policy`` (``policy.lora_component``: its unet or transformer)."""
    return getattr(policy, policy.lora_component)


def lora_loader(policy: Any) -> type:
    """The diffusers loader mixin class named by ``policy.lora_loader`` (classmethods only: no
    pipeline is built)."""
    import diffusers.loaders

    return getattr(diffusers.loaders, policy.lora_loader)


def peft_config(module: torch.nn.Module) -> Any:
    """The peft LoraConfig of the module's (single, "default") adapter."""
    return module.peft_config["default"]


def add_lora(
    module: torch.nn.Module, lora: LoraConfig, default_targets: Sequence[str] | None = None
) -> Any:
    """Inject a LoRA adapter (peft, gaussian init: lora_B = 0, so the adapted module starts equal
    to the base) into ``module``; returns its peft config. Targets: ``lora.target_modules``, or
    ``default_targets`` when those are given and ``lora.target_modules`` is left at its default
    (the SD UNet's names mean "the family's default"). A target list that matches no module is a
    ValueError naming names that would match."""
    from peft import LoraConfig as PeftLoraConfig

    targets = list(lora.target_modules)
    if default_targets is not None and targets == LoraConfig().target_modules:
        targets = list(default_targets)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    try:
        module.add_adapter(config)
    except ValueError as e:
        examples = list(default_targets or LoraConfig().target_modules)[:4]
        raise ValueError(
            f"lora.target_modules={targets} matched no {type(module).__name__} module ({e}); use "
            f"names such as {', '.join(examples)}"
        ) from e
    return config


def trainables_to_fp32(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Trainable parameters in fp32 whatever the weight dtype: fp16 Adam updates underflow."""
    for p in parameters:
        p.data = p.data.float()


@contextlib.contextmanager
def lora_merged(module: torch.nn.Module) -> Iterator[None]:
    """LoRA folded into the base weights (W <- W + s B A) inside the block; afterwards the exact
    base weights are copied back (peft's unmerge subtracts, which is not bit-exact). Nothing is
    merged while the adapters are disabled (``reference()``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or any(layer.disable_adapters for layer in layers):
        yield
        return
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)


def save_lora(
    policy: Any, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the policy's adapter as ``directory/pytorch_lora_weights.safetensors`` through its
    loader mixin's ``save_lora_weights``, with the peft config as metadata (without it diffusers
    reloads with peft's default lora_alpha = 8). Returns the file. ``state_dict``: the adapted
    module's LoRA weights to write instead of its own (a sharded module's, gathered whole)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    module, prefix = lora_module(policy), policy.lora_component
    layers = get_peft_model_state_dict(module, state_dict=state_dict)
    if prefix == "unet":
        # UNet LoRAs in diffusers' own key names (as its SD / SDXL training scripts write them); the
        # transformer families keep peft's names, as diffusers' SD3 / FLUX scripts do (the converter
        # would rename lora_A to the legacy lora.down there).
        layers = convert_state_dict_to_diffusers(layers)
    lora_loader(policy).save_lora_weights(
        save_directory=str(directory),
        **{
            f"{prefix}_lora_layers": layers,
            f"{prefix}_lora_adapter_metadata": peft_config(module).to_dict(),
        },
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return Path(directory) / LORA_WEIGHT_NAME
