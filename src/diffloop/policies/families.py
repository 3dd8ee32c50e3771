"""Model families and the one ``load_policy``: the family is read from the model, never configured.

``model_index.json``'s ``_class_name`` (the pipeline diffusers would load) names the family (a
class no family answers to is an error naming the supported ones, never a guess); each family is a
row of ``FAMILIES``: the pipeline class-name prefix it answers to, the loader that builds its
policy, and its diffusers layout, a table of :class:`~diffloop.policies.loading.Component` (folder,
class, optional or not, a ``model.*`` field that may replace it), from which the one loader
(``loading.load_components``) loads every family, :func:`how_to_provide` writes every "what
model.pretrained must be" and :func:`check_local_model` checks a local directory before anything
loads (``check-config``). :func:`locate` finds a model's files and reads its model_index.json once
for all of it. Loaders and component classes are imported only when used, so reading this table
costs nothing.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffloop.config import ConfigError, LoraConfig, ModelConfig
from diffloop.policies.loading import (
    Component,
    ModelFiles,
    ModelLoadError,
    listed,
    locate_model,
    looks_local,
    read_model_index,
    resolve_pretrained,
)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_prefix: str
    """``_class_name`` prefix of the family's diffusers pipelines."""
    loader: str
    """``module:function`` with signature (model, lora, *, files=None, **policy kwargs) ->
    policy."""
    marker_folder: str | None = None
    """A component folder that identifies the family in a directory without model_index.json."""
    label: str = ""
    """What a model of the family is, in messages ("an SDXL pipeline")."""
    pipeline_class: str = ""
    """The diffusers pipeline whose ``save_pretrained`` writes the family's layout (and the full
    export)."""
    components: tuple[Component, ...] = ()
    """The family's components, in the pipeline's order: what the loader reads and a local
    directory must hold."""
    optional_note: str = ""
    """The optional folders and what their absence means (for messages)."""
    repo: str = "<repo>"
    """A hub repository of the family, for the ``hf download`` example."""
    repo_note: str = ""
    """What to know about ``repo`` (a gated repository), or ""."""
    transformer_class: str | None = None
    """``transformer/config.json``'s ``_class_name``: tells the family without model_index.json."""
    flow_matching: bool = False
    """A flow-matching model (its policy is a ``FlowMatchPolicy``), not a DDIM one."""

    def folders(self) -> list[str]:
        """The required component folder names."""
        return [c.name for c in self.components if not c.optional]


def _c(name: str, cls: str, note: str = "", **kwargs: Any) -> Component:
    return Component(name, cls, note, **kwargs)


_UNET, _VAE = "diffusers.UNet2DConditionModel", "diffusers.AutoencoderKL"
_CLIP, _CLIP_PROJ = "transformers.CLIPTextModel", "transformers.CLIPTextModelWithProjection"
_T5, _TOK = "transformers.T5EncoderModel", "transformers.AutoTokenizer"
_DDIM, _FLOW = "diffusers.DDIMScheduler", "diffusers.FlowMatchEulerDiscreteScheduler"
_FLUX2, _FLUX2_VAE = "diffusers.Flux2Transformer2DModel", "diffusers.AutoencoderKLFlux2"
_REFINER = "an SDXL refiner has no text_encoder/: it is img2img; use a base model"

# Longest prefix first: StableDiffusionXL* and StableDiffusion3* before StableDiffusion*,
# Flux2Klein* before Flux2* before Flux*.
FAMILIES: tuple[Family, ...] = (
    Family(
        "sdxl", "StableDiffusionXL", "diffloop.policies.sdxl:load_sdxl_policy", "text_encoder_2",
        label="an SDXL pipeline", pipeline_class="StableDiffusionXLPipeline",
        components=(_c("unet", _UNET), _c("text_encoder", _CLIP, "CLIP-L", missing_note=_REFINER),
                    _c("text_encoder_2", _CLIP_PROJ, "OpenCLIP bigG"), _c("tokenizer", _TOK),
                    _c("tokenizer_2", _TOK), _c("scheduler", _DDIM),
                    _c("vae", _VAE, override="sdxl.vae")),
        repo="stabilityai/stable-diffusion-xl-base-1.0",
    ),
    Family(
        "sd3", "StableDiffusion3", "diffloop.policies.sd3:load_sd3_policy",
        label="an SD3 / SD3.5 pipeline", pipeline_class="StableDiffusion3Pipeline",
        components=(_c("transformer", "diffusers.SD3Transformer2DModel"),
                    _c("text_encoder", _CLIP_PROJ, "CLIP-L"),
                    _c("text_encoder_2", _CLIP_PROJ, "CLIP-G"),
                    _c("text_encoder_3", _T5, "T5", optional="T5"), _c("tokenizer", _TOK),
                    _c("tokenizer_2", _TOK), _c("tokenizer_3", _TOK, optional="T5"),
                    _c("scheduler", _FLOW), _c("vae", _VAE)),
        optional_note="optionally text_encoder_3/ + tokenizer_3/ (T5; both as [null, null] in "
        "model_index.json runs without it)",
        repo="stabilityai/stable-diffusion-3.5-medium", transformer_class="SD3Transformer2DModel",
        flow_matching=True,
    ),
    Family(
        "flux2_klein", "Flux2Klein", "diffloop.policies.flux2:load_flux2_klein_policy",
        label="a FLUX.2-klein pipeline", pipeline_class="Flux2KleinPipeline",
        components=(_c("transformer", _FLUX2),
                    _c("text_encoder", "transformers.Qwen3ForCausalLM", "Qwen3"),
                    _c("tokenizer", _TOK, "Qwen"), _c("scheduler", _FLOW),
                    _c("vae", _FLUX2_VAE)),
        repo="black-forest-labs/FLUX.2-klein-4B", flow_matching=True,
    ),
    Family(
        "flux2", "Flux2", "diffloop.policies.flux2:load_flux2_policy",
        label="a FLUX.2-dev pipeline", pipeline_class="Flux2Pipeline",
        components=(_c("transformer", _FLUX2),
                    _c("text_encoder", "transformers.Mistral3ForConditionalGeneration",
                       "Mistral-Small-3.1"),
                    _c("tokenizer", "transformers.AutoProcessor", "Pixtral processor"),
                    _c("scheduler", _FLOW), _c("vae", _FLUX2_VAE)),
        repo="black-forest-labs/FLUX.2-dev", repo_note="a gated repository: accept its license "
        "on the Hub first", transformer_class="Flux2Transformer2DModel", flow_matching=True,
    ),
    Family(
        "flux", "Flux", "diffloop.policies.flux:load_flux_policy",
        label="a FLUX.1 pipeline", pipeline_class="FluxPipeline",
        components=(_c("transformer", "diffusers.FluxTransformer2DModel"),
                    _c("text_encoder", _CLIP, "CLIP-L"), _c("text_encoder_2", _T5, "T5-XXL"),
                    _c("tokenizer", _TOK, "CLIP"), _c("tokenizer_2", _TOK, "T5"),
                    _c("scheduler", _FLOW), _c("vae", _VAE)),
        repo="black-forest-labs/FLUX.1-dev", repo_note="a gated repository: accept its license "
        "on the Hub first", transformer_class="FluxTransformer2DModel", flow_matching=True,
    ),
    Family(
        "qwen_image", "QwenImagePipeline", "diffloop.policies.qwen_image:load_qwen_image_policy",
        label="a Qwen-Image pipeline", pipeline_class="QwenImagePipeline",
        components=(_c("transformer", "diffusers.QwenImageTransformer2DModel"),
                    _c("text_encoder", "transformers.Qwen2_5_VLForConditionalGeneration",
                       "Qwen2.5-VL-7B"),
                    _c("tokenizer", _TOK), _c("scheduler", _FLOW),
                    _c("vae", "diffusers.AutoencoderKLQwenImage")),
        repo="Qwen/Qwen-Image", transformer_class="QwenImageTransformer2DModel",
        flow_matching=True,
    ),
    Family(
        "zimage", "ZImagePipeline", "diffloop.policies.zimage:load_zimage_policy",
        label="a Z-Image pipeline", pipeline_class="ZImagePipeline",
        components=(_c("transformer", "diffusers.ZImageTransformer2DModel"),
                    _c("text_encoder", "transformers.Qwen3Model", "Qwen3-4B"),
                    _c("tokenizer", _TOK, "Qwen, with its chat template"), _c("scheduler", _FLOW),
                    _c("vae", _VAE)),
        repo="Tongyi-MAI/Z-Image", transformer_class="ZImageTransformer2DModel",
        flow_matching=True,
    ),
    Family(
        "sd", "StableDiffusion", "diffloop.policies.diffusers_policy:load_ddim_policy",
        label="a Stable Diffusion 1.x / 2.x pipeline", pipeline_class="StableDiffusionPipeline",
        components=(_c("unet", _UNET), _c("text_encoder", _CLIP), _c("tokenizer", _TOK),
                    _c("scheduler", _DDIM), _c("vae", _VAE, optional="VAE")),
        optional_note="vae/ for latent models (none: pixel space, as diffloop's shapes model)",
    ),
)  # fmt: skip
# Families whose policy implements model.text_encoder_device=cpu/offload: all (the base moves
# the text encoders, ``DenoiserPolicy.text_encoders_on_device``).
OFFLOAD_FAMILIES = tuple(f.name for f in FAMILIES)
DEFAULT_FAMILY = "sd"  # diffloop's shapes model and SD-layout directories without an index


class UnknownFamilyError(ModelLoadError):
    """model_index.json names a pipeline class that no family of diffloop answers to."""


def family(name: str) -> Family:
    """The row of ``FAMILIES`` named ``name``."""
    return next(f for f in FAMILIES if f.name == name)


def how_to_provide(family_name: str, pretrained: str) -> str:
    """What ``model.pretrained`` must be for the family: its diffusers layout (only its own
    component folders), how to write or download one, or a cached hub id. The loaders' messages
    about a missing or unreadable model end with it."""
    f = family(family_name)
    required = [
        f"{c.name}/" + f" ({c.note})" * bool(c.note) for c in f.components if not c.optional
    ]
    folders = ", ".join(
        ["model_index.json", *required] + [f"and {f.optional_note}"] * bool(f.optional_note)
    )
    note = f" ({f.repo_note})" if f.repo_note else ""
    return (
        f"model.pretrained='{pretrained}' must be {f.label} in diffusers layout ({folders}), e.g. "
        f"written by `{f.pipeline_class}.save_pretrained(DIR)` or `hf download {f.repo} "
        f"--local-dir DIR`{note}, or a hub id already in the Hugging Face cache (HF_HUB_OFFLINE=1 "
        "forbids downloads)."
    )


def model_index(pretrained: str, revision: str | None = None) -> dict[str, Any] | None:
    """model_index.json of a local directory or hub id; None for a local path without one (the
    family's loader then names what is missing). A hub id is read from the cache, else from the
    hub once it answered (``loading.locate_model``: an unreachable hub is a one-line error)."""
    return read_model_index(locate_model(pretrained, revision), pretrained, revision)


def detect_family(pretrained: str, revision: str | None = None) -> str:
    """The family name of ``pretrained``: the row whose pipeline prefix its ``_class_name`` starts
    with (UnknownFamilyError, naming the supported ones, if none does); a local directory without
    model_index.json is told by its transformer's class or a marker folder (else the default);
    a missing local path is the default family, whose loader reports it."""
    path = locate_model(pretrained, revision)
    return family_of(ModelFiles(pretrained, path, read_model_index(path, pretrained, revision)))


def family_of(files: ModelFiles) -> str:
    """The family of the model whose files and model_index.json ``files`` holds
    (``detect_family``)."""
    if files.index is None:
        return _family_without_index(Path(files.path))
    class_name = str(files.index.get("_class_name", ""))
    for f in FAMILIES:
        if class_name.startswith(f.pipeline_prefix):
            return f.name
    supported = ", ".join(f"{f.pipeline_prefix}* ({f.label.split(' ', 1)[1]})" for f in FAMILIES)
    raise UnknownFamilyError(
        f"model.pretrained='{files.pretrained}': its model_index.json names the pipeline class "
        f"'{class_name or '(no _class_name)'}', which diffloop does not support; supported "
        f"pipelines: {supported}. Give a model of one of these families"
    )


def _family_without_index(local: Path) -> str:
    """A directory without model_index.json: the family whose transformer class its
    ``transformer/config.json`` names, else the one whose marker folder it has, else the default."""
    config = local / "transformer" / "config.json"
    if config.is_file():
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (ValueError, AttributeError, OSError):
            class_name = None
        for f in FAMILIES:
            if f.transformer_class is not None and f.transformer_class == class_name:
                return f.name
    for f in FAMILIES:
        if f.marker_folder and (local / f.marker_folder).is_dir():
            return f.name
    return DEFAULT_FAMILY


def check_local_model(model: ModelConfig) -> Family | None:
    """Before anything loads (``diffloop check-config`` and ``train``): a local ``model.pretrained``
    exists, is of a supported family and holds that family's component folders; returns that family
    (None for a hub id, which is not looked up: check-config works offline). Raises ConfigError
    naming the field and the fix."""
    path = resolve_pretrained(model.pretrained)
    local = Path(path)
    if not looks_local(path):
        return None
    if not local.is_dir():
        what = "is a file, not a model directory" if local.exists() else "does not exist"
        raise ConfigError(
            f"model.pretrained='{model.pretrained}': {local} {what}; give a model directory in "
            "diffusers layout (model_index.json and the family's component folders, "
            "e.g. written by "
            "`<Pipeline>.save_pretrained(DIR)` or `hf download <repo> --local-dir "
            "DIR`) or a hub id "
            "(org/name)"
        )
    try:
        files = ModelFiles(model.pretrained, path, read_model_index(path, model.pretrained))
        f = family(family_of(files))
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    missing = [c + "/" for c in required_folders(f, files, model) if not (local / c).is_dir()]
    if missing:
        raise ConfigError(
            f"'{local}' lacks the component folder(s) {', '.join(missing)}. "
            + how_to_provide(f.name, model.pretrained)
        )
    return f


def required_folders(f: Family, files: ModelFiles, model: ModelConfig) -> list[str]:
    """The component folders the family's loader reads for ``model``: every required one and each
    optional one model_index.json lists (``loading.present``), less those a ``model.*`` field
    replaces (SDXL's vae/ with model.sdxl.vae)."""
    return [
        c.name
        for c in f.components
        if (not c.optional or listed(files.index, c.name)) and not c.override_value(model)
    ]


def locate(model: ModelConfig) -> ModelFiles:
    """Where the loaders read ``model.pretrained`` (at model.revision), with its model_index.json,
    read once: a local directory as given; a hub id's cached snapshot when it holds every folder
    the loader reads (the hub is not asked), else the hub id once the hub answered; an offline or
    unreachable hub, or its refusal, is a one-line HubUnavailableError
    (``loading.locate_model``)."""
    read: dict[str, dict[str, Any] | None] = {}

    def lacks(snapshot: Path) -> list[str]:
        here = str(snapshot)
        files = ModelFiles(model.pretrained, here, read_model_index(here, model.pretrained))
        read[here] = files.index
        f = family(family_of(files))
        return [c + "/" for c in required_folders(f, files, model) if not (snapshot / c).is_dir()]

    path = locate_model(model.pretrained, model.revision, missing=lacks)
    index = read[path] if path in read else read_model_index(path, model.pretrained, model.revision)
    return ModelFiles(model.pretrained, path, index)


def load_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any):
    """The policy for ``model.pretrained``, built by its family's loader (``kwargs``: device,
    weight_dtype, logprob_reduction, gradient_checkpointing, performance, sample)."""
    files = locate(model)
    name = family_of(files)
    from diffloop.policies.quantization import check_family_components

    f = family(name)  # a hub id's family is known only now
    check_family_components(model.quantization, f.label, [c.name for c in f.components])
    module, function = family(name).loader.split(":")
    return getattr(importlib.import_module(module), function)(model, lora, files=files, **kwargs)
