"""A run's shareable result: the LoRA (or full model), its model card, a copy for other tools, a
hub upload.

``output_dir/lora/`` (``output_dir/model/`` for full fine-tuning) after a run holds

    pytorch_lora_weights.safetensors  diffusers' LoRA format, written by the policy's diffusers
                                      loader mixin (``save_lora_weights``) with the peft config
                                      (lora_alpha) as metadata: ``pipe.load_lora_weights(dir)``
    <run name>.safetensors            SD 1.x / 2.x, the shapes model, SDXL: the same weights in
                                      kohya keys (``lora_unet_<module>.lora_down`` / ``.lora_up``,
                                      ``.alpha`` = the run's lora.alpha) for ComfyUI,
                                      AUTOMATIC1111 / Forge and kohya sd-scripts. SD 1.x / 2.x name
                                      modules as diffusers does (``down_blocks_1_attentions_0_...``:
                                      sd-scripts trains SD 1.x on a UNet with diffusers' names);
                                      SDXL as its original (SGM) checkpoint does
                                      (``input_blocks_4_1_transformer_blocks_0_...``: sd-scripts'
                                      SDXL UNet, which its ``--network_weights`` and merge scripts
                                      match by name)
    <run name>_comfyui.safetensors    SD3, FLUX, Qwen-Image, Z-Image, FLUX.2: the diffusers
                                      file's keys (``transformer.<module>.lora_A`` / ``.lora_B``)
                                      plus one ``transformer.<module>.alpha`` each, for ComfyUI,
                                      whose loader maps these names onto its own (fused) weights
                                      and applies alpha / rank, but scale 1 where alpha is absent
    README.md                         model card: base model, algorithm, reward, the modules the
                                      adapter trained, held-out scores before / after, the command
                                      that made it, which file each tool loads, tags
    before_after.png                  eval/before_after.png, shown by the card

Every copy holds the adapter's own matrices and its lora_alpha, so every tool's scale alpha / rank
is the trained one: ``(alpha / rank) up @ down`` is peft's delta ``B A (alpha / r)``.

A policy says what it exports with two attributes: ``lora_loader``, the name of its diffusers
loader mixin class in ``diffusers.loaders`` (e.g. ``StableDiffusionXLLoraLoaderMixin``), and
``lora_component``, the attribute holding the adapted module, which is also the mixin's prefix
("unet" or "transformer"). Nothing here imports a pipeline class. Which copy a family gets is a row
of ``SHARE_FORMATS``.

Modules: :mod:`.lora_files` (the diffusers file, the copies for other tools, the adapter they
hold), :mod:`.sgm_names` (SDXL's original module names, for its kohya copy), :mod:`.card` (the
model card), :mod:`.hub` (the upload), :mod:`.errors` (``ExportError``); this one checks a policy
before training and writes the whole export.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from diffloop.config import Config
from diffloop.export.card import (
    CARD_NAME,
    CARD_TEMPLATE,
    IMAGE_NAME,
    HeldOut,
    card_tags,
    card_text,
    export_summary_lines,
    held_out_scores,
    is_hub_id,
    run_command,
    write_model_card,
)
from diffloop.export.errors import ExportError
from diffloop.export.hub import HubUploadError, push_to_hub, retry_command
from diffloop.export.lora_files import (
    COMFYUI,
    KOHYA,
    KOHYA_SGM,
    LORA_WEIGHT_NAME,
    SHARE_FORMATS,
    Adapter,
    ShareFormat,
    adapter_from_file,
    adapter_summary,
    comfyui_state_dict,
    kohya_state_dict,
    lora_loader,
    lora_matrices,
    lora_module,
    peft_config,
    save_lora,
    share_file_name,
    write_share_copy,
)
from diffloop.export.sgm_names import sgm_module_name

__all__ = [
    "CARD_NAME",
    "CARD_TEMPLATE",
    "COMFYUI",
    "IMAGE_NAME",
    "KOHYA",
    "KOHYA_SGM",
    "LORA_WEIGHT_NAME",
    "SHARE_FORMATS",
    "Adapter",
    "ExportError",
    "HeldOut",
    "HubUploadError",
    "ShareFormat",
    "adapter_from_file",
    "adapter_summary",
    "card_tags",
    "card_text",
    "check_exportable",
    "comfyui_state_dict",
    "export_dir",
    "export_run",
    "export_summary_lines",
    "held_out_scores",
    "is_hub_id",
    "kohya_state_dict",
    "lora_loader",
    "lora_matrices",
    "lora_module",
    "peft_config",
    "push_to_hub",
    "retry_command",
    "run_command",
    "save_lora",
    "sgm_module_name",
    "share_file_name",
    "write_model_card",
    "write_share_copy",
]


def export_dir(config: Config) -> Path:
    """output_dir/lora (LoRA) or output_dir/model (full fine-tuning)."""
    return Path(config.output_dir) / ("lora" if config.lora.enabled else "model")


def check_exportable(policy: Any, lora_enabled: bool) -> None:
    """Before training: a LoRA policy names a diffusers loader mixin and an adapted component
    (else the export at the end of the run would fail). Raises ExportError."""
    if not lora_enabled:
        return
    import diffusers.loaders

    name, component = getattr(policy, "lora_loader", None), getattr(policy, "lora_component", None)
    if not (isinstance(name, str) and hasattr(diffusers.loaders, name)) or not hasattr(
        policy, str(component)
    ):
        raise ExportError(
            f"{type(policy).__name__} cannot export a LoRA: it needs the class "
            "attributes lora_loader "
            f"(a loader mixin of diffusers.loaders, got {name!r}) and lora_component (its adapted "
            f"module's attribute, got {component!r})"
        )


def export_run(
    policy: Any, config: Config, family: str, weights: dict[str, Any] | None = None
) -> Path:
    """Everything of the module docstring into ``export_dir(config)``; returns that directory.

    Written into a temporary sibling (``.tmp-lora``) and renamed into place when complete
    (``diffloop.disk``): a failed or interrupted export leaves no truncated file as the export
    (an earlier export stays as it was), and a full disk is one DiskFullError line naming the
    directory and the space needed. Call with the weights to export in place (the trainer applies
    the EMA around it), or pass them: ``weights``, the adapted module's state dict gathered whole
    from a sharded run (``sharded_checkpoint.export_weights``: its LoRA weights, or every entry
    for full fine-tuning), written instead of the module's own shards."""
    from diffloop import disk
    from diffloop.checkpoint import latest_checkpoint, resume_command

    target = export_dir(config)
    aside = target.with_name(f".tmp-{target.name}")
    kohya = config.lora.enabled and family in SHARE_FORMATS  # a copy for other tools
    trained = disk.tensor_bytes(policy.trainable_parameters())
    needed = max((2 if kohya else 1) * trained, disk.tree_bytes(target))  # + the copy for tools
    latest = latest_checkpoint(config.output_dir)
    kept = f"the run's last checkpoint {latest} is kept" if latest else "nothing else is lost"
    kept += f", and the earlier export in {target}" if target.exists() else ""
    shutil.rmtree(aside, ignore_errors=True)  # left by an export that was killed
    with disk.written_aside(
        aside, target, needed, what=f"the {'LoRA' if config.lora.enabled else 'model'} export",
        kept=kept, then=f"export it again with: {resume_command(config.output_dir)}",
    ):  # fmt: skip
        aside.mkdir(parents=True)
        kohya_name = None
        if config.lora.enabled:
            lora_file = save_lora(policy, aside, weights)
            kohya_name = write_share_copy(policy, config, family, lora_file, aside)
        elif weights is not None:
            from diffloop.sharded_checkpoint import with_denoiser

            with with_denoiser(policy, weights):  # a plain copy in place of the sharded one
                policy.export(aside)
        else:
            policy.export(aside)
        write_model_card(aside, config, family, kohya_name)
        disk.replace_dir(aside, target)
    return target
