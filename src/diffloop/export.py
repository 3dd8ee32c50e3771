"""A run's shareable result: the LoRA (or full model), its model card, a kohya copy, a hub upload.

``output_dir/lora/`` (``output_dir/model/`` for full fine-tuning) after a run holds

    pytorch_lora_weights.safetensors  diffusers' LoRA format, written by the policy's diffusers
                                      loader mixin (``save_lora_weights``) with the peft config
                                      (lora_alpha) as metadata: ``pipe.load_lora_weights(dir)``
    <run name>.safetensors            the same weights in kohya / WebUI keys (``lora_unet_*``,
                                      ``.lora_down`` / ``.lora_up``) with ``.alpha`` = the run's
                                      lora.alpha, for ComfyUI / AUTOMATIC1111 (UNet families only)
    README.md                         model card: base model, algorithm, reward, held-out scores
                                      before / after, the command that made it, tags
    before_after.png                  eval/before_after.png, shown by the card

A policy says what it exports with two attributes: ``lora_loader``, the name of its diffusers
loader mixin class in ``diffusers.loaders`` (e.g. ``StableDiffusionXLLoraLoaderMixin``), and
``lora_component``, the attribute holding the adapted module, which is also the mixin's prefix
("unet" or "transformer"). Nothing here imports a pipeline class.

The kohya conversion is the one diffusers' advanced training scripts use
(``convert_state_dict_to_kohya(convert_all_state_dict_to_peft(sd))``), except for alpha: diffusers
writes alpha = rank (scale 1), which would load a LoRA trained with alpha != rank at the wrong
strength; here every ``.alpha`` is the adapter's lora_alpha, so the WebUI scale alpha / rank is the
trained one.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
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


def kohya_state_dict(
    diffusers_state: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """diffusers LoRA keys (``unet.<module>.lora_A.weight``) -> kohya keys
    (``lora_unet_<module with _>.lora_down.weight``, ``lora_up``), with one scalar float32
    ``<module>.alpha`` = ``alpha`` per adapted module (scale alpha / rank, as trained)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(diffusers_state))
    alpha_t = torch.tensor(float(alpha), dtype=torch.float32)
    return {
        k: alpha_t.clone() if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()
    }


def write_kohya_copy(lora_file: Path, target: Path, *, rank: int, alpha: float) -> Path:
    """The kohya / WebUI copy of ``lora_file`` at ``target`` (kohya's ss_network_* metadata too)."""
    from safetensors.torch import load_file, save_file

    state = kohya_state_dict(load_file(str(lora_file)), alpha)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    save_file(state, str(target), metadata=metadata)
    return target


def kohya_file_name(config: Config) -> str:
    """``<run name>.safetensors`` (the name WebUIs show), never the diffusers file's name."""
    name = Path(config.output_dir).resolve().name or "diffloop_lora"
    return (
        f"{name}_kohya.safetensors"
        if f"{name}.safetensors" == LORA_WEIGHT_NAME
        else f"{name}.safetensors"
    )


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
) -> str:
    """The model card's markdown body (pure: everything it states is an argument)."""
    lines = _summary_lines(config, family) + ["", "## Held-out reward", ""]
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
    if kohya_name is not None:
        lines += [
            "",
            (
                f"ComfyUI / AUTOMATIC1111: `{kohya_name}` (kohya keys, alpha {config.lora.alpha:g}) "
                "goes in `models/loras`; strength 1 is the trained strength."
            ),
        ]
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


def _summary_lines(config: Config, family: str) -> list[str]:
    """Title and what was trained: base model, algorithm, reward, prompts, LoRA, EMA."""
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
    if lora.enabled:
        lines.append(
            f"- LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.alpha / lora.rank:g}), "
            f"on {', '.join(lora.target_modules)}"
        )
    if t.ema_decay is not None:
        lines.append(f"- weights: the EMA of the trained weights (decay {t.ema_decay:g})")
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
    huggingface_hub's ModelCard and diffusers' ``populate_model_card`` (library + tags).

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
    text = card_text(config, family, held_out, run_command(out), kohya_name, image.is_file())
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

    Call with the weights to export in place (the trainer applies the EMA around it)."""
    target = export_dir(config)
    target.mkdir(parents=True, exist_ok=True)
    kohya_name = None
    if config.lora.enabled:
        lora_file = save_lora(policy, target)
        if policy.lora_component == "unet":
            kohya_name = kohya_file_name(config)
            cfg = peft_config(lora_module(policy))
            write_kohya_copy(lora_file, target / kohya_name, rank=cfg.r, alpha=cfg.lora_alpha)
        else:  # kohya's transformer keys follow the original checkpoints, not diffusers' modules
            logger.info(
                "no kohya copy for a %s LoRA: ComfyUI reads the diffusers file",
                policy.lora_component,
            )
    else:
        policy.export(target)
    write_model_card(target, config, family, kohya_name)
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
