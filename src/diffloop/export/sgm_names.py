"""SDXL's UNet module names: diffusers' ``UNet2DConditionModel`` paths -> the original (SGM / LDM)
UNet's, which SDXL's original checkpoints, kohya sd-scripts' SDXL UNet and ComfyUI use. The kohya
copy of an SDXL LoRA (``diffloop.export.lora_files``) names its modules with ``sgm_module_name``."""

from __future__ import annotations

from typing import Any

from diffloop.export.errors import ExportError

# diffusers ResnetBlock2D -> SGM ResBlock layer names (in_layers = [norm, SiLU, conv], ...).
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the blocks.
_SGM_BASIC = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_module_name(module: str, unet_config: Any) -> str:
    """A diffusers ``UNet2DConditionModel`` module path -> its path in the original (SGM / LDM)
    UNet, the names of SDXL's original checkpoints, kohya sd-scripts' SDXL UNet and ComfyUI.

    With n = layers_per_block resnets per down level L (n + 1 per up level):

        down_blocks.L.{resnets,attentions}.j.X  -> input_blocks.{1 + L (n+1) + j}.{0,1}.X
        down_blocks.L.downsamplers.0.conv       -> input_blocks.{(L+1)(n+1)}.0.op
        mid_block.resnets.{0,1} / attentions.0  -> middle_block.{0,2} / middle_block.1
        up_blocks.L.{resnets,attentions}.j.X    -> output_blocks.{L (n+1) + j}.{0,1}.X
        up_blocks.L.upsamplers.0.conv           -> output_blocks.{L (n+1) + n}.{2, or 1 without
                                                   attention}.conv

    and a resnet's conv1 / conv2 / time_emb_proj / conv_shortcut are in_layers.2 / out_layers.3 /
    emb_layers.1 / skip_connection. ``unet_config`` is the UNet's config (layers_per_block,
    down_block_types, up_block_types). Raises ExportError for a module outside this layout."""
    if module in _SGM_BASIC:
        return _SGM_BASIC[module]
    per_level = unet_config["layers_per_block"]
    levels = len(unet_config["down_block_types"])
    down_n = list(per_level) if isinstance(per_level, (list, tuple)) else [per_level] * levels
    up_n = list(reversed(down_n))
    parts = module.split(".")
    try:
        if parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                return _sgm_join("middle_block", 2 * j, _sgm_resnet(rest))
            if kind == "attentions":
                return _sgm_join("middle_block", 1, rest)
        elif parts[0] in ("down_blocks", "up_blocks"):
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                first = 1 + sum(n + 1 for n in down_n[:level])
                if kind == "downsamplers" and rest == ["conv"]:
                    return f"input_blocks.{first + down_n[level]}.0.op"
                if kind in ("resnets", "attentions"):
                    inner = 0 if kind == "resnets" else 1
                    rest = _sgm_resnet(rest) if kind == "resnets" else rest
                    return _sgm_join("input_blocks", f"{first + j}.{inner}", rest)
            else:
                first = sum(n + 1 for n in up_n[:level])
                if kind == "upsamplers" and rest == ["conv"]:
                    has_attention = "CrossAttn" in unet_config["up_block_types"][level]
                    return f"output_blocks.{first + up_n[level]}.{2 if has_attention else 1}.conv"
                if kind in ("resnets", "attentions"):
                    inner = 0 if kind == "resnets" else 1
                    rest = _sgm_resnet(rest) if kind == "resnets" else rest
                    return _sgm_join("output_blocks", f"{first + j}.{inner}", rest)
    except (IndexError, ValueError, KeyError):
        pass
    raise ExportError(
        f"the UNet module {module!r} has no name in the SDXL (SGM) layout, so the kohya copy "
        "cannot name it; adapt UNet attention, feed-forward, resnet or sampler layers "
        "(lora.target_modules)"
    )


def _sgm_resnet(rest: list[str]) -> list[str]:
    return [_SGM_RESNET[rest[0]], *rest[1:]]


def _sgm_join(block: str, index: int | str, rest: list[str]) -> str:
    return ".".join([block, str(index), *rest])
