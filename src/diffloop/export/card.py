"""The model card of an export (README.md): base model, algorithm, reward, what the LoRA trained,
held-out scores before / after, how to load each file, the command that made it, tags."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffloop.config import Config
from diffloop.export.lora_files import (
    LORA_WEIGHT_NAME,
    SHARE_FORMATS,
    Adapter,
    adapter_from_file,
    share_file_name,
)
from diffloop.run_dir import read_metrics
from diffloop.summary import LAYOUT_NAME, FigureLayout

CARD_NAME = "README.md"
IMAGE_NAME = "before_after.png"
# The card is only card data (YAML) + our text: diffusers' training template adds "TODO" sections.
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ model_description }}\n"


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
    figure: FigureLayout | None = None,
) -> str:
    """The model card's markdown body (pure: everything it states is an argument).
    ``kohya_name``: the family's copy for other tools (``SHARE_FORMATS``), None without one;
    ``adapter``: what the LoRA trained (else the LoRA line gives the config's rank and alpha);
    ``figure``: what the embedded image shows (eval/before_after.json), None: not known."""
    lines = _summary_lines(config, family, adapter) + ["", "## Held-out reward", ""]
    lines += _held_out_lines(config, held_out)
    if has_image:
        lines += ["", *_figure_lines(config, figure)]
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
        (f"- algorithm: `train.algorithm={t.algorithm}`, "
         f"{config.sample.samples_per_prompt} samples per "
        f"prompt, {_count(config.num_epochs, 'epoch')} of "
         f"{config.sample.prompts_per_epoch} prompts"),
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
    if config.model.quantization.backend != "none":
        from diffloop.policies.quantization import describe

        lines.append(
            f"- trained on a quantized base ({describe(config.model.quantization)}); the LoRA "
            "is written for the full-precision base, where its output differs from the trained "
            "model's by the quantization error (docs/quantization.md)"
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
        (f"| trained ({_count(held_out.after_epoch, 'epoch')}) | {held_out.after:.4f} "
         f"({delta:+.4f}) |"),
        "",
        (f"`{_evaluation_reward(config)}` on {e.num_prompts} held-out prompts of `{e.prompts}` x "
        f"{e.samples_per_prompt} images, the same fixed noise before and after "
        f"(eval.seed={e.seed})."),
    ]  # fmt: skip


def _figure_lines(config: Config, figure: FigureLayout | None) -> list[str]:
    """The embedded before/after image and what it shows, as its layout file says (a side-by-side
    figure of chosen rows, or an older run's two whole grids stacked); no layout: no claim."""
    if figure is None:
        return [f"![held-out prompts before and after training]({IMAGE_NAME})", "",
                "Held-out prompts before and after training, same noise."]  # fmt: skip
    reward = f"`{_evaluation_reward(config)}`"
    if figure.arrangement == "stacked":
        return [f"![before (top) and after (bottom) training]({IMAGE_NAME})", "",
                ("Every held-out image before training (top: the base model) and "
                 f"{figure.after_heading} "
                 "(bottom), same prompts and noise.")]  # fmt: skip
    return [f"![before (left) and after (right) training]({IMAGE_NAME})", "",
            ("Held-out prompts before training (left: the base model) and "
             f"{figure.after_heading} (right), "
             f"same noise; under each image its {reward} score. {figure.rows_sentence()} "
             f"{' '.join(figure.means_sentences())}").rstrip()]  # fmt: skip


def _usage_lines(config: Config, where: str | None = None) -> list[str]:
    """Python that loads the export: a pipeline + LoRA, a full pipeline, or (the shapes model:
    pixel space, no pipeline class) its UNet. ``where``: the export's directory (default: the hub
    repository when uploaded, else a placeholder the card's reader replaces)."""
    base, lora = config.model.pretrained, config.lora.enabled
    if where is None:
        pushed = config.hub.push and config.hub.model_id
        where = config.hub.model_id if pushed else "path/to/this/directory"
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
    revision = f', revision="{config.model.revision}"' if config.model.revision else ""
    if not lora:
        return [
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{where}")',
        ]
    return [
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base}"{revision})',
        f'pipe.load_lora_weights("{where}", weight_name="{LORA_WEIGHT_NAME}")',
    ]


def export_summary_lines(config: Config, family: str, directory: Path) -> list[str]:
    """What the end of a run prints about its export ``directory``: where it is, which file loads
    in diffusers and which in ComfyUI / AUTOMATIC1111 / kohya (the family's ``SHARE_FORMATS``
    copy), and the model card's Python (``_usage_lines``) as one line to paste, for this
    directory."""
    what = "LoRA" if config.lora.enabled else "model"
    lines = [f"{what} written to {directory}/ (model card: {directory / CARD_NAME})"]
    if config.lora.enabled:
        lines += [
            f"  {directory / LORA_WEIGHT_NAME}",
            "      loads in diffusers (the Python line below)",
        ]
        copy, fmt = share_file_name(config, family), SHARE_FORMATS.get(family)
        if copy is not None and fmt is not None and (directory / copy).is_file():
            lines += [f"  {directory / copy}", f"      loads in {fmt.tools.replace('`', '')}"]
    python = "; ".join(line for line in _usage_lines(config, directory.as_posix()) if line)
    lines += ["  in Python:", f"    {python}"]
    if config.model.pretrained == "shapes":
        lines.append(
            "  (the shapes model has no diffusers pipeline class: this loads its UNet, and only "
            "diffusers and diffloop load the base model)"
        )
    lines.append(f'  images: diffloop sample {config.output_dir} --prompt "..."')
    return lines


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
    figure = FigureLayout.load(out / "eval" / LAYOUT_NAME) if image.is_file() else None
    text = card_text(
        config, family, held_out, run_command(out), kohya_name, image.is_file(), adapter, figure
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
