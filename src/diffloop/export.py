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
    <run name>_comfyui.safetensors    SD3 / FLUX: the diffusers file's keys
                                      (``transformer.<module>.lora_A`` / ``.lora_B``) plus one
                                      ``transformer.<module>.alpha`` each, for ComfyUI, whose loader
                                      maps these names onto its own (fused) weights and applies
                                      alpha / rank, but scale 1 where alpha is absent
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

The kohya keys are the ones diffusers' advanced training scripts write
(``convert_state_dict_to_kohya(convert_all_state_dict_to_peft(sd))``), except for alpha: diffusers
writes alpha = rank (scale 1), which would load a LoRA trained with alpha != rank at the wrong
strength; here every ``.alpha`` is the adapter's lora_alpha.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffloop.config import Config, HubConfig
from diffloop.errors import DiffloopError
from diffloop.run_dir import read_metrics

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CARD_NAME = "README.md"
IMAGE_NAME = "before_after.png"
# The card is only card data (YAML) + our text: diffusers' training template adds "TODO" sections.
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ model_description }}\n"


class ExportError(DiffloopError, TypeError):
    """A policy does not say how its LoRA is saved (diffloop's own bug, or a new policy's)."""


class HubUploadError(DiffloopError, RuntimeError):
    """The upload to the hub failed; the run directory is complete and the message says how to retry."""


def export_dir(config: Config) -> Path:
    """output_dir/lora (LoRA) or output_dir/model (full fine-tuning)."""
    return Path(config.output_dir) / ("lora" if config.lora.enabled else "model")


# ----------------------------------------------------------------------------------- LoRA files


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
            f"{type(policy).__name__} cannot export a LoRA: it needs the class attributes lora_loader "
            f"(a loader mixin of diffusers.loaders, got {name!r}) and lora_component (its adapted "
            f"module's attribute, got {component!r})"
        )


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


def save_lora(policy: Any, directory: str | Path) -> Path:
    """Write the policy's adapter as ``directory/pytorch_lora_weights.safetensors`` through its
    loader mixin's ``save_lora_weights``, with the peft config as metadata (without it diffusers
    reloads with peft's default lora_alpha = 8). Returns the file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    module, prefix = lora_module(policy), policy.lora_component
    layers = get_peft_model_state_dict(module)
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


# ----------------------------------------------------------------------------------- copies for other tools

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


# One row per family of diffloop.policies.families. SD 1.x / 2.x (and the shapes model: family "sd") in
# diffusers' module names: sd-scripts trains SD 1.x on library/original_unet.py, whose modules
# carry diffusers' names, and ComfyUI maps both. SDXL in SGM names: sd-scripts trains SDXL on
# library/sdxl_original_unet.py (input_blocks / middle_block / output_blocks), and its
# --network_weights and merge scripts match keys to those modules by name. SD3 / FLUX: kohya's
# transformer keys are the original checkpoints' fused modules, not diffusers', but ComfyUI maps
# diffusers' module names (comfy/lora.py model_lora_keys_unet, "transformer." + the diffusers
# name of comfy/utils.py mmdit_to_diffusers / flux_to_diffusers) and reads ``<key>.alpha``.
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


# ----------------------------------------------------------------------------------- model card


@dataclass(frozen=True)
class HeldOut:
    """Held-out reward before training (metrics.jsonl's epoch -1 row) and at its last evaluation."""

    before: float
    after: float
    after_epoch: int  # epochs completed at the last evaluation


def held_out_scores(metrics_path: Path) -> HeldOut | None:
    """The base and last ``eval_reward_mean`` of a run's metrics.jsonl; None without both."""
    if not metrics_path.is_file():
        return None
    evals = [r for r in read_metrics(metrics_path) if "eval_reward_mean" in r]
    if len(evals) < 2 or evals[0]["epoch"] != -1:
        return None
    return HeldOut(
        evals[0]["eval_reward_mean"], evals[-1]["eval_reward_mean"], evals[-1]["epoch"] + 1
    )


def run_command(output_dir: Path) -> str | None:
    """The command line that started the run (run_info.json's argv), shell-quoted."""
    info = output_dir / "run_info.json"
    if not info.is_file():
        return None
    argv = json.loads(info.read_text()).get("argv")
    return shlex.join(str(a) for a in argv) if argv else None


def is_hub_id(name: str) -> bool:
    """``namespace/name`` that is not a local path (the card's base_model must be a hub id)."""
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def card_text(
    config: Config,
    family: str,
    held_out: HeldOut | None,
    command: str | None,
    kohya_name: str | None,
    has_image: bool,
    adapter: Adapter | None = None,
) -> str:
    """The model card's markdown body (pure: everything it states is an argument).
    ``kohya_name``: the family's copy for other tools (``SHARE_FORMATS``), None without one;
    ``adapter``: what the LoRA trained (else the LoRA line gives the config's rank and alpha)."""
    lines = _summary_lines(config, family, adapter) + ["", "## Held-out reward", ""]
    lines += _held_out_lines(config, held_out)
    if has_image:
        lines += [
            "",
            f"![before (top) and after (bottom) training]({IMAGE_NAME})",
            "",
            "Held-out prompts before (top) and after (bottom) training, same noise.",
        ]
    lines += [
        "",
        "## Use it",
        "",
        "```python",
        *_usage_lines(config),
        "```",
        "",
        "or `diffloop sample RUN_DIR --prompt ...` from the run directory.",
    ]
    if config.lora.enabled:
        lines += _file_lines(config, family, kohya_name, adapter)
    if command is not None:
        lines += [
            "",
            "## How it was made",
            "",
            "```bash",
            command,
            "```",
            "",
            "The run's full configuration is `config.yaml` in its run directory.",
        ]
    return "\n".join(lines)


def _base_name(base: str) -> str:
    return (
        "diffloop's shapes-world model (shipped in the diffloop package)"
        if base == "shapes"
        else f"`{base}`"
    )


def _file_lines(
    config: Config, family: str, copy_name: str | None, adapter: Adapter | None
) -> list[str]:
    """The "Files" section: which file each tool loads."""
    alpha = adapter.alpha if adapter is not None else config.lora.alpha
    rank = adapter.rank if adapter is not None else config.lora.rank
    lines = [
        "",
        "## Files",
        "",
        "| file | loads in |",
        "|---|---|",
        f"| `{LORA_WEIGHT_NAME}` | diffusers (the code above; lora_alpha is in its metadata) |",
    ]
    fmt = SHARE_FORMATS.get(family)
    if copy_name is not None and fmt is not None:
        lines.append(f"| `{copy_name}` | {fmt.tools}: {fmt.naming}, alpha {alpha:g} |")
    return lines + [
        "",
        f"At strength 1 every file applies the trained scale alpha / rank = {alpha / rank:g}.",
    ]


def _summary_lines(config: Config, family: str, adapter: Adapter | None = None) -> list[str]:
    """Title and what was trained: base model, algorithm, reward, prompts, LoRA (``adapter``: its
    trained modules), EMA."""
    t, lora, base_name = config.train, config.lora, _base_name(config.model.pretrained)
    kwargs = f" with kwargs `{json.dumps(config.reward.kwargs)}`" if config.reward.kwargs else ""
    lines = [
        (f"# {'LoRA' if lora.enabled else 'Full fine-tune'} of {base_name}, trained with "
        f"{t.algorithm.upper()} by diffloop"),
        "",
        f"- base model: {base_name} ({family} family)",
        (f"- algorithm: `train.algorithm={t.algorithm}`, {config.sample.samples_per_prompt} samples per "
        f"prompt, {_count(config.num_epochs, 'epoch')} of {config.sample.prompts_per_epoch} prompts"),
        f"- reward: `{config.reward.name}`{kwargs}",
        f"- training prompts: `{config.prompts.source}`",
    ]  # fmt: skip
    if lora.enabled and adapter is not None:
        lines.append(
            f"- LoRA: rank {adapter.rank}, alpha {adapter.alpha:g} (scale "
            f"{adapter.alpha / adapter.rank:g}), on {', '.join(adapter.target_modules)}"
        )
    elif lora.enabled:
        lines.append(
            f"- LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.alpha / lora.rank:g})"
        )
    if t.ema_decay is not None:
        schedule = (", warm-up" if t.ema_warmup else "") + (
            f", every {t.ema_update_interval} optimizer steps" if t.ema_update_interval > 1 else ""
        )
        lines.append(f"- weights: the EMA of the trained weights (decay {t.ema_decay:g}{schedule})")
    return lines


def _evaluation_reward(config: Config) -> str:
    from diffloop.rewards.registry import evaluation_reward_name

    return evaluation_reward_name(config.reward.name, config.eval.reward)


def _held_out_lines(config: Config, held_out: HeldOut | None) -> list[str]:
    if held_out is None:
        return ["Not measured (the run had no eval.prompts)."]
    e, delta = config.eval, held_out.after - held_out.before
    return [
        "| model | held-out reward |",
        "|---|---|",
        f"| base | {held_out.before:.4f} |",
        f"| trained ({_count(held_out.after_epoch, 'epoch')}) | {held_out.after:.4f} ({delta:+.4f}) |",
        "",
        (f"`{_evaluation_reward(config)}` on {e.num_prompts} held-out prompts of `{e.prompts}` x "
        f"{e.samples_per_prompt} images, the same fixed noise before and after (eval.seed={e.seed})."),
    ]  # fmt: skip


def _usage_lines(config: Config) -> list[str]:
    """Python that loads the export: a pipeline + LoRA, a full pipeline, or (the shapes model:
    pixel space, no pipeline class) its UNet."""
    base, lora = config.model.pretrained, config.lora.enabled
    where = (
        config.hub.model_id if config.hub.push and config.hub.model_id else "path/to/this/directory"
    )
    if base == "shapes":
        load = (
            f'unet.load_lora_adapter("{where}", prefix="unet", weight_name="{LORA_WEIGHT_NAME}")'
            if lora
            else f'unet = UNet2DConditionModel.from_pretrained("{where}", subfolder="unet")'
        )
        return [
            "from diffusers import UNet2DConditionModel",
            "from diffloop.shapes.model import SHIPPED_WEIGHTS_DIR",
            "",
            'unet = UNet2DConditionModel.from_pretrained(SHIPPED_WEIGHTS_DIR, subfolder="unet")',
            load,
        ]
    if not lora:
        return [
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{where}")',
        ]
    return [
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base}")',
        f'pipe.load_lora_weights("{where}", weight_name="{LORA_WEIGHT_NAME}")',
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def card_tags(config: Config, family: str) -> list[str]:
    tags = ["diffloop", "reinforcement-learning", config.train.algorithm, "text-to-image", family]
    return (["lora"] if config.lora.enabled else []) + tags


def write_model_card(directory: Path, config: Config, family: str, kohya_name: str | None) -> Path:
    """README.md in ``directory`` (and eval/before_after.png copied next to it), built with
    huggingface_hub's ModelCard and diffusers' ``populate_model_card`` (library + tags). What the
    LoRA trained is read from the diffusers file in ``directory`` (its peft config).

    diffusers' ``load_or_create_model_card`` first looks its argument up as a hub repo (a local
    directory is not one: it raises, or goes online), so the card is created from card data
    directly, with the same fields it would set."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    out = Path(config.output_dir)
    image = out / "eval" / IMAGE_NAME
    if image.is_file():
        shutil.copyfile(image, directory / IMAGE_NAME)
    held_out = held_out_scores(out / "metrics.jsonl")
    adapter = adapter_from_file(directory / LORA_WEIGHT_NAME) if config.lora.enabled else None
    text = card_text(
        config, family, held_out, run_command(out), kohya_name, image.is_file(), adapter
    )
    base = config.model.pretrained
    data = ModelCardData(
        library_name="diffusers",
        base_model=base if is_hub_id(base) else None,
        pipeline_tag="text-to-image",
        inference=True,
    )
    card = ModelCard.from_template(
        card_data=data, template_str=CARD_TEMPLATE, model_description=text
    )
    card = populate_model_card(card, tags=card_tags(config, family))
    card.save(str(directory / CARD_NAME))
    return directory / CARD_NAME


# ----------------------------------------------------------------------------------- the run


def export_run(policy: Any, config: Config, family: str) -> Path:
    """Everything of the module docstring into ``export_dir(config)``; returns that directory.

    Written into a temporary sibling (``.tmp-lora``) and renamed into place when complete
    (``diffloop.disk``): a failed or interrupted export leaves no truncated file as the export
    (an earlier export stays as it was), and a full disk is one DiskFullError line naming the
    directory and the space needed. Call with the weights to export in place (the trainer applies
    the EMA around it)."""
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
            lora_file = save_lora(policy, aside)
            kohya_name = write_share_copy(policy, config, family, lora_file, aside)
        else:
            policy.export(aside)
        write_model_card(aside, config, family, kohya_name)
        disk.replace_dir(aside, target)
    return target


# ----------------------------------------------------------------------------------- the hub


def retry_command(directory: Path, hub: HubConfig) -> str:
    """The ``hf upload`` command that uploads ``directory`` as ``push_to_hub`` would."""
    private = " --private" if hub.private else ""
    return f"hf upload {hub.model_id} {shlex.quote(str(directory))} . --repo-type model{private}"


def push_to_hub(directory: Path, hub: HubConfig) -> str:
    """create_repo (private by default; exist_ok) + upload_folder of ``directory``; returns the repo
    url. Any failure is one HubUploadError line naming hub.model_id and the retry command; nothing
    on disk is touched."""
    from huggingface_hub import create_repo, upload_folder

    token = os.environ.get(hub.token_env) if hub.token_env else None
    try:
        repo = create_repo(
            hub.model_id, private=hub.private, exist_ok=True, token=token, repo_type="model"
        )
        upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(directory),
            token=token,
            commit_message="diffloop: upload LoRA and model card",
        )
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode: all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise HubUploadError(
            f"hub.push: uploading {directory} to hub.model_id={hub.model_id} failed "
            f"({type(e).__name__}: {first}); the run is complete on disk. Retry with: "
            f"{retry_command(directory, hub)}"
        ) from None
    return str(repo)
