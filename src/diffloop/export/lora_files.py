"""The LoRA files of an export: the diffusers file, written through the policy's diffusers loader
mixin (``diffloop.policies.lora.save_lora``), and the family's copy for other tools (kohya keys, or
ComfyUI's), with the adapter they hold.

A policy names its loader mixin class of ``diffusers.loaders`` (``lora_loader``) and the attribute
of its adapted module (``lora_component``, also the mixin's key prefix); nothing here imports a
pipeline class. Which copy a family gets is a row of ``SHARE_FORMATS``.

The kohya keys are the ones diffusers' advanced training scripts write
(``convert_state_dict_to_kohya(convert_all_state_dict_to_peft(sd))``), except for alpha: diffusers
writes alpha = rank (scale 1), which would load a LoRA trained with alpha != rank at the wrong
strength; here every ``.alpha`` is the adapter's lora_alpha.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffloop.config import Config
from diffloop.export.errors import ExportError
from diffloop.export.sgm_names import sgm_module_name
from diffloop.policies.lora import (  # the diffusers file is the policy's own
    LORA_WEIGHT_NAME,
    lora_loader,  # noqa: F401 (re-exported)
    lora_module,
    peft_config,
    save_lora,  # noqa: F401 (re-exported)
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- copies for other tools

KOHYA, KOHYA_SGM, COMFYUI = "kohya", "kohya_sgm", "comfyui"


@dataclass(frozen=True)
class ShareFormat:
    """The copy of a family's LoRA for tools other than diffusers (next to the diffusers file)."""

    keys: str
    """KOHYA: ``lora_unet_<diffusers module, _>``; KOHYA_SGM: ``lora_unet_<SGM module, _>``;
    COMFYUI: the diffusers file's ``transformer.<module>`` keys plus ``.alpha``."""
    suffix: str
    """The copy is ``<run name><suffix>.safetensors``."""
    tools: str
    """Which tools load the copy, and from where (the model card says it)."""

    @property
    def naming(self) -> str:
        """The copy's key names in words (the model card says it)."""
        return {
            KOHYA: "kohya keys, diffusers' module names",
            KOHYA_SGM: "kohya keys, SDXL's original (SGM) module names",
            COMFYUI: "diffusers' module names with `.alpha`",
        }[self.keys]


# One row per family of diffloop.policies.families. SD 1.x / 2.x (and the shapes model: family "sd")
# in diffusers' module names: sd-scripts trains SD 1.x on library/original_unet.py, whose modules
# carry diffusers' names, and ComfyUI maps both. SDXL in SGM names: sd-scripts trains SDXL on
# library/sdxl_original_unet.py (input_blocks / middle_block / output_blocks), and its
# --network_weights and merge scripts match keys to those modules by name. SD3 / FLUX: kohya's
# transformer keys are the original checkpoints' fused modules, not diffusers', but ComfyUI maps
# diffusers' module names (comfy/lora.py model_lora_keys_unet, "transformer." + the diffusers
# name of comfy/utils.py mmdit_to_diffusers / flux_to_diffusers) and reads ``<key>.alpha``.
# Qwen-Image, Z-Image and FLUX.2 the same way: ComfyUI's Qwen-Image modules carry diffusers' names,
# Z-Image maps them through z_image_to_diffusers (q, k, v as slices of its fused qkv) and FLUX.2
# through flux_to_diffusers' FLUX.2 rows (its Flux2 model, Klein's too, is a Flux).
_WEBUIS = "ComfyUI (`models/loras`), AUTOMATIC1111 / Forge (`models/Lora`)"
SHARE_FORMATS: dict[str, ShareFormat] = {
    "sd": ShareFormat(
        KOHYA, "", f"{_WEBUIS}, kohya sd-scripts (`--network_weights`, `networks/merge_lora.py`)"
    ),
    "sdxl": ShareFormat(
        KOHYA_SGM,
        "",
        f"{_WEBUIS}, kohya sd-scripts (`--network_weights`, `networks/sdxl_merge_lora.py`)",
    ),
    "sd3": ShareFormat(COMFYUI, "_comfyui", "ComfyUI (`models/loras`)"),
    "flux": ShareFormat(COMFYUI, "_comfyui", "ComfyUI (`models/loras`), Forge (`models/Lora`)"),
    "qwen_image": ShareFormat(COMFYUI, "_comfyui", "ComfyUI (`models/loras`)"),
    "zimage": ShareFormat(COMFYUI, "_comfyui", "ComfyUI (`models/loras`)"),
    "flux2": ShareFormat(COMFYUI, "_comfyui", "ComfyUI (`models/loras`)"),
    "flux2_klein": ShareFormat(COMFYUI, "_comfyui", "ComfyUI (`models/loras`)"),
}

_LORA_KEY = re.compile(r"^(unet|transformer)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")


def lora_matrices(diffusers_state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers LoRA keys -> ``{module: {"down": A (r, in, ...), "up": B (out, r, ...)}}``, the
    module path without its ``unet.`` / ``transformer.`` prefix. Both diffusers spellings are read
    (``lora_A`` / ``lora_B``, and the UNet files' ``lora.down`` / ``lora.up``); any other key raises
    ExportError (the copy would silently lose it)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in diffusers_state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ExportError(f"no copy of the LoRA key {key!r}: not a LoRA matrix of diffusers")
        part = "down" if match[3] in ("lora_A", "lora.down") else "up"
        modules.setdefault(match[2], {})[part] = value
    return modules


def kohya_state_dict(
    diffusers_state: dict[str, torch.Tensor],
    alpha: float,
    module_name: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys (``unet.<module>.lora_A.weight``) -> kohya keys
    (``lora_unet_<module with _>.lora_down.weight``, ``lora_up``), with one scalar float32
    ``<module>.alpha`` = ``alpha`` per adapted module (scale alpha / rank, as trained).

    ``module_name`` (diffusers module path -> the path kohya names; default: unchanged) renames
    modules first, e.g. ``sgm_module_name`` for SDXL."""
    rename = module_name or (lambda module: module)
    alpha_t = torch.tensor(float(alpha), dtype=torch.float32)
    kohya: dict[str, torch.Tensor] = {}
    for module, mats in lora_matrices(diffusers_state).items():
        name = "lora_unet_" + rename(module).replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = mats["down"].contiguous()
        kohya[f"{name}.lora_up.weight"] = mats["up"].contiguous()
        kohya[f"{name}.alpha"] = alpha_t.clone()
    return kohya


def comfyui_state_dict(
    diffusers_state: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """A transformer LoRA's diffusers keys (``transformer.<module>.lora_A.weight`` / ``lora_B``)
    kept, plus one scalar float32 ``transformer.<module>.alpha`` = ``alpha`` each: ComfyUI's
    ``load_lora`` reads ``<key>.alpha`` and scales by alpha / rank (1 where it is absent)."""
    alpha_t = torch.tensor(float(alpha), dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    for module, mats in lora_matrices(diffusers_state).items():
        out[f"transformer.{module}.lora_A.weight"] = mats["down"].contiguous()
        out[f"transformer.{module}.lora_B.weight"] = mats["up"].contiguous()
        out[f"transformer.{module}.alpha"] = alpha_t.clone()
    return out


def share_file_name(config: Config, family: str) -> str | None:
    """``<run name><suffix>.safetensors`` of the family's copy (the name ComfyUI and the WebUIs
    show), never the diffusers file's name; None for a family without a copy."""
    fmt = SHARE_FORMATS.get(family)
    if fmt is None:
        return None
    name = Path(config.output_dir).resolve().name or "diffloop_lora"
    file = f"{name}{fmt.suffix}.safetensors"
    return f"{name}{fmt.suffix}_kohya.safetensors" if file == LORA_WEIGHT_NAME else file


@dataclass(frozen=True)
class Adapter:
    """What a LoRA adapter trained, from its peft config (not from the run's config: the flow
    families replace lora.target_modules' SD default by their own targets)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def adapter_summary(module: torch.nn.Module) -> Adapter:
    """The module's adapter (rank, alpha, trained module names). Raises ExportError for settings
    the copies cannot express (rank / alpha patterns, rsLoRA, DoRA)."""
    cfg = peft_config(module)
    unsupported = [
        name
        for name, on in (
            ("rank_pattern", cfg.rank_pattern),
            ("alpha_pattern", cfg.alpha_pattern),
            ("use_rslora", cfg.use_rslora),
            ("use_dora", cfg.use_dora),
        )
        if on
    ]
    if unsupported:
        raise ExportError(
            f"the adapter sets peft's {', '.join(unsupported)}: the kohya / ComfyUI copies "
            "hold one alpha / rank scale per module and cannot express it"
        )
    return Adapter(cfg.r, cfg.lora_alpha, tuple(sorted(cfg.target_modules)))


def adapter_from_file(lora_file: Path) -> Adapter | None:
    """The adapter of a diffusers LoRA file, from the peft config its loader mixin saved as
    metadata (``lora_adapter_metadata``, keys ``<component>.<field>``); None without it."""
    from safetensors import safe_open

    if not lora_file.is_file():
        return None
    with safe_open(str(lora_file), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    fields = {k.split(".", 1)[-1]: v for k, v in json.loads(raw).items()}
    targets = fields.get("target_modules")
    if not isinstance(targets, list) or "r" not in fields or "lora_alpha" not in fields:
        return None
    return Adapter(int(fields["r"]), float(fields["lora_alpha"]), tuple(sorted(targets)))


def write_share_copy(
    policy: Any, config: Config, family: str, lora_file: Path, directory: Path
) -> str | None:
    """The family's copy of ``lora_file`` (``SHARE_FORMATS``) in ``directory``; returns its file
    name, or None (logged) for a family without one. kohya's ss_network_* metadata is written
    too (WebUIs show rank and alpha from it)."""
    from safetensors.torch import load_file, save_file

    fmt, name = SHARE_FORMATS.get(family), share_file_name(config, family)
    if fmt is None or name is None:
        logger.info("no copy for other tools of a %s LoRA: they read the diffusers file", family)
        return None
    module = lora_module(policy)
    adapter = adapter_summary(module)
    state = load_file(str(lora_file))
    if fmt.keys == COMFYUI:
        copy = comfyui_state_dict(state, adapter.alpha)
    else:
        unet_config = module.config

        def sgm(path: str) -> str:
            return sgm_module_name(path, unet_config)

        copy = kohya_state_dict(state, adapter.alpha, sgm if fmt.keys == KOHYA_SGM else None)
    metadata = {"ss_network_dim": str(adapter.rank), "ss_network_alpha": str(adapter.alpha)}
    if fmt.keys != COMFYUI:
        metadata["ss_network_module"] = "networks.lora"
    save_file(copy, str(directory / name), metadata=metadata)
    return name
