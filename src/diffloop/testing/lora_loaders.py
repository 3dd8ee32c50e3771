"""How other tools name and apply a LoRA's keys, restated for tests: ComfyUI's key maps and LoRA
formula, kohya sd-scripts' module names.

Sources (rules restated in diffloop's own code, not copied):

- ComfyUI (github.com/Comfy-Org/ComfyUI, GPL-3.0):
  comfy/lora.py @ 17358c8f73b581a0d22facc3c385822f09b8bfb1: ``model_lora_keys_unet`` (a key is
  "lora_unet_" + the model's own weight name with "_", or "lora_unet_" + its diffusers name with
  "_" (``unet_to_diffusers``); SD3 and FLUX also "transformer." + the diffusers name of
  ``mmdit_to_diffusers`` / ``flux_to_diffusers``) and ``load_lora`` (``<key>.alpha``; keys it
  does not use are logged as "lora key not loaded");
  comfy/lora.py @ ec93dcacb96b922f7cb1417b3ba22bccb082df32: the Qwen-Image branch ("transformer."
  + the model's own names, which are diffusers'), Z-Image (``Lumina2``: "transformer." + the
  diffusers name of ``z_image_to_diffusers``) and FLUX.2 (``Flux2`` is a ``Flux``: the FLUX
  branch, ``flux_to_diffusers`` with FLUX.2's ``ff.linear_in`` / ``attn.to_qkv_mlp_proj`` /
  ``attn.to_out`` rows);
  comfy/utils.py @ 09708eae709a992a5684bed3595ce4d07e705b4e: ``unet_to_diffusers``,
  ``mmdit_to_diffusers``, ``flux_to_diffusers``, ``z_image_to_diffusers`` (the module layouts,
  with (dim, start, size) offsets into fused qkv / linear1 weights);
  comfy/weight_adapter/lora.py @ 6fd406fb14ca663225b88c6f75d7a7f2b997e5a0: ``LoRAAdapter.load``
  (up / down spellings) and ``calculate_weight``: W += strength (alpha / rank) up @ down, with
  alpha / rank = 1 when alpha is absent.
  Changes: only ".weight" entries of LoRA-able layers; the layouts are read from a diffusers
  model's config (ComfyUI reads its own detected unet_config); the MMDiT block width is an argument
  (ComfyUI takes 64 x depth, which holds for SD3 / SD3.5 checkpoints but not for a tiny test model).
- kohya sd-scripts (github.com/kohya-ss/sd-scripts, Apache-2.0) @
  48d368fa557731ad0488c07304dfeba8c07910eb: networks/lora.py ``LoRANetwork.create_modules`` (a
  module's name is "lora_unet_" + its path with "_", for the Linear / Conv2d children of
  ``Transformer2DModel`` modules); library/original_unet.py (SD 1.x / 2.x: diffusers' module
  paths); library/sdxl_model_util.py ``make_unet_conversion_map`` (SDXL: SGM prefix <-> diffusers
  prefix pairs of library/sdxl_original_unet.py, SDXL base's 3-level layout). Changes: only the
  layer prefixes (no norms, no per-parameter suffixes).
"""

from __future__ import annotations

from typing import Any

import torch

# ------------------------------------------------------------------------------ ComfyUI: UNet

_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1":
          "time_embed.0", "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1":
          "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def comfy_unet_layout(unet: torch.nn.Module) -> dict[str, str]:
    """ComfyUI's ``unet_to_diffusers`` for a diffusers UNet: diffusers layer path -> SGM layer path
    (Linear / Conv2d layers only), walking the model's own blocks as ComfyUI walks num_res_blocks,
    transformer_depth and channel_mult."""
    out: dict[str, str] = dict(_BASIC)
    n = 1
    for x, block in enumerate(unet.down_blocks):
        for i, resnet in enumerate(block.resnets):
            _resnet(out, f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", resnet)
            if getattr(block, "attentions", None):
                _attention(out, f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1",
                           block.attentions[i])  # fmt: skip
            n += 1
        if block.downsamplers:
            out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    mid = unet.mid_block
    _attention(out, "mid_block.attentions.0", "middle_block.1", mid.attentions[0])
    for i, sgm in enumerate((0, 2)):
        _resnet(out, f"mid_block.resnets.{i}", f"middle_block.{sgm}", mid.resnets[i])
    n = 0
    for x, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            c = 1
            _resnet(out, f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", resnet)
            if getattr(block, "attentions", None):
                c = 2
                _attention(out, f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1",
                           block.attentions[i])  # fmt: skip
            if i == len(block.resnets) - 1 and block.upsamplers:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    return out


def _resnet(out: dict[str, str], diffusers: str, sgm: str, resnet: torch.nn.Module) -> None:
    for name, sgm_name in _RESNET.items():
        if getattr(resnet, name, None) is not None:
            out[f"{diffusers}.{name}"] = f"{sgm}.{sgm_name}"


_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"}


def _attention(out: dict[str, str], diffusers: str, sgm: str, attention: torch.nn.Module) -> None:
    for name, module in attention.named_modules():
        if not name or _PEFT_PARTS & set(name.split(".")):
            continue  # a peft-wrapped layer counts once, under its own name
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or hasattr(module, "base_layer"):
            out[f"{diffusers}.{name}"] = f"{sgm}.{name}"


def comfy_unet_key_map(unet: torch.nn.Module) -> dict[str, str]:
    """ComfyUI's LoRA key -> the SGM layer it patches (``model_lora_keys_unet``): "lora_unet_" +
    the SGM name with "_", and "lora_unet_" + the diffusers name with "_"."""
    layout = comfy_unet_layout(unet)
    keys = {"lora_unet_" + sgm.replace(".", "_"): sgm for sgm in layout.values()}
    keys |= {"lora_unet_" + d.replace(".", "_"): sgm for d, sgm in layout.items()}
    return keys


# ---------------------------------------------------------------------------- ComfyUI: transformers

Target = tuple[str, tuple[int, int, int] | None]  # (original layer, (dim, start, size) or None)


def comfy_sd3_layout(num_layers: int, width: int) -> dict[str, Target]:
    """``mmdit_to_diffusers`` (LoRA-able layers): diffusers layer -> (MMDiT layer, offset)."""
    out: dict[str, Target] = {}
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{d}.attn.to_{p}"] = (f"{o}.x_block.attn.qkv", (0, j * width, width))
            out[f"{d}.attn.add_{p}_proj"] = (f"{o}.context_block.attn.qkv", (0, j * width, width))
            out[f"{d}.attn2.to_{p}"] = (f"{o}.x_block.attn2.qkv", (0, j * width, width))
        for diffusers, original in (
            ("attn.to_out.0", "x_block.attn.proj"), ("attn2.to_out.0", "x_block.attn2.proj"),
            ("attn.to_add_out", "context_block.attn.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"),
            ("ff.net.2", "x_block.mlp.fc2"), ("ff_context.net.0.proj", "context_block.mlp.fc1"),
            ("ff_context.net.2", "context_block.mlp.fc2"), ("norm1.linear",
                                                            "x_block.adaLN_modulation.1"),
            ("norm1_context.linear", "context_block.adaLN_modulation.1"),
        ):  # fmt: skip
            out[f"{d}.{diffusers}"] = (f"{o}.{original}", None)
    return out


def _double_blocks(
    num_layers: int, width: int, whole: tuple[tuple[str, str], ...]
) -> dict[str, Target]:
    """``flux_to_diffusers``' double blocks: the image and text q, k, v as slices of the block's
    fused ``img_attn.qkv`` / ``txt_attn.qkv``, and the (diffusers, FLUX) layer pairs ``whole``
    mapped whole."""
    out: dict[str, Target] = {}
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{d}.attn.to_{p}"] = (f"{o}.img_attn.qkv", (0, j * width, width))
            out[f"{d}.attn.add_{p}_proj"] = (f"{o}.txt_attn.qkv", (0, j * width, width))
        for diffusers, original in whole:
            out[f"{d}.{diffusers}"] = (f"{o}.{original}", None)
    return out


def comfy_flux_layout(num_layers: int, num_single_layers: int, width: int) -> dict[str, Target]:
    """``flux_to_diffusers`` (LoRA-able layers): diffusers layer -> (FLUX layer, offset)."""
    out = _double_blocks(num_layers, width, (
        ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
        ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
        ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
        ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
    ))  # fmt: skip
    for i in range(num_single_layers):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{d}.attn.to_{p}"] = (f"{o}.linear1", (0, j * width, width))
        out[f"{d}.proj_mlp"] = (f"{o}.linear1", (0, 3 * width, 4 * width))
        out[f"{d}.proj_out"] = (f"{o}.linear2", None)
        out[f"{d}.norm.linear"] = (f"{o}.modulation.lin", None)
    return out


def comfy_flux2_layout(num_layers: int, num_single_layers: int, width: int) -> dict[str, Target]:
    """``flux_to_diffusers`` for FLUX.2 (its Flux2 model takes the Flux branch; LoRA-able layers of
    diffloop's FLUX.2 targets): diffusers layer -> (FLUX.2 layer, offset). The single blocks'
    fused projections map whole."""
    out = _double_blocks(num_layers, width, (
        ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
        ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
        ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2"),
    ))  # fmt: skip
    for i in range(num_single_layers):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{d}.attn.to_qkv_mlp_proj"] = (f"{o}.linear1", None)
        out[f"{d}.attn.to_out"] = (f"{o}.linear2", None)
    return out


def comfy_zimage_layout(blocks: list[str], width: int) -> dict[str, Target]:
    """``z_image_to_diffusers`` (LoRA-able layers of diffloop's Z-Image targets) for the blocks
    ``blocks`` (``layers.i``, ``noise_refiner.i``, ``context_refiner.i``, each kept by name): q, k
    and v are slices of the fused ``attention.qkv``, ``attention.to_out.0`` is ``attention.out``,
    the feed-forward layers keep their names."""
    out: dict[str, Target] = {}
    for b in blocks:
        for j, p in enumerate("qkv"):
            out[f"{b}.attention.to_{p}"] = (f"{b}.attention.qkv", (0, j * width, width))
        out[f"{b}.attention.to_out.0"] = (f"{b}.attention.out", None)
        for w in ("w1", "w2", "w3"):
            out[f"{b}.feed_forward.{w}"] = (f"{b}.feed_forward.{w}", None)
    return out


def comfy_same_name_layout(layers: list[str]) -> dict[str, Target]:
    """Qwen-Image: ComfyUI's model carries diffusers' module names, so every layer is its own
    target (the QwenImage branch of ``model_lora_keys_unet``)."""
    return {layer: (layer, None) for layer in layers}


def comfy_transformer_key_map(layout: dict[str, Target]) -> dict[str, Target]:
    """ComfyUI's LoRA keys for a transformer family in diffusers' names: "transformer." + the
    diffusers layer (the "regular diffusers lora format" of ``model_lora_keys_unet``; every
    transformer branch of it maps this prefix)."""
    return {f"transformer.{d}": target for d, target in layout.items()}


# ------------------------------------------------------------------------------ ComfyUI: loading


def comfy_load_lora(
    lora: dict[str, torch.Tensor], key_map: dict[str, Any]
) -> tuple[dict[str, tuple[Any, torch.Tensor, torch.Tensor, float | None]], set[str]]:
    """``load_lora`` for plain LoRA: {key: (target, up, down, alpha or None)} and the file's keys
    it did not load (ComfyUI logs each as "lora key not loaded")."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        for up, down in (
            (".lora_up.weight", ".lora_down.weight"),
            (".lora_B.weight", ".lora_A.weight"),
        ):
            if x + up in lora:
                alpha = lora[x + ".alpha"].item() if x + ".alpha" in lora else None
                patches[x] = (target, lora[x + up], lora[x + down], alpha)
                loaded |= {x + up, x + down} | ({x + ".alpha"} if alpha is not None else set())
                break
    return patches, set(lora) - loaded


def comfy_lora_diff(
    up: torch.Tensor, down: torch.Tensor, alpha: float | None, strength: float = 1.0
) -> torch.Tensor:
    """``calculate_weight``'s LoRA delta: strength (alpha / rank) up @ down (alpha / rank = 1 when
    the file has no alpha), before the reshape to the weight's shape."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return (strength * scale) * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))


# ------------------------------------------------------------------------------ kohya sd-scripts


def sd_scripts_lora_names(unet: torch.nn.Module, layout: dict[str, str] | None = None) -> set[str]:
    """The LoRA module names sd-scripts' ``LoRANetwork`` gives a UNet: "lora_unet_" + the path of
    each Linear / Conv2d inside a ``Transformer2DModel``, with "_". ``layout`` (diffusers path ->
    the path in sd-scripts' own UNet) renames; None keeps diffusers' paths (SD 1.x / 2.x)."""
    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child, layer in module.named_modules():
            if child and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                path = f"{name}.{child}"
                names.add("lora_unet_" + (layout[path] if layout else path).replace(".", "_"))
    return names


def sd_scripts_sdxl_layout(module_paths: list[str]) -> dict[str, str]:
    """diffusers path -> sd-scripts' SDXL UNet path, by ``make_unet_conversion_map``'s prefix pairs
    (SDXL base: 3 levels, 2 resnets per down level, attention in levels 1 and 2)."""
    pairs = []
    for i in range(3):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    out = {}
    for path in module_paths:
        for sgm, hf in pairs:
            if path.startswith(hf):
                out[path] = sgm + path[len(hf) :]
                break
    return out
