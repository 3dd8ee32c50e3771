"""Model families and the one ``load_policy``: the family is read from the model, never configured.

``model_index.json``'s ``_class_name`` (the pipeline diffusers would load) names the family (a
class no family answers to is an error naming the supported ones, never a guess); each family is a
row of ``FAMILIES``: the pipeline class-name prefix it answers to, the loader that builds its
policy, and its diffusers layout (component folders, pipeline class, a hub repository), from which
:func:`how_to_provide` writes every loader's "what model.pretrained must be" and
:func:`check_local_model` checks a local directory before anything loads (``check-config``).
Loaders are imported only when used, so reading this table costs nothing.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffloop.config import ConfigError, LoraConfig, ModelConfig
from diffloop.policies.loading import (
    ModelLoadError,
    locate_model,
    looks_local,
    resolve_pretrained,
)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_prefix: str
    """``_class_name`` prefix of the family's diffusers pipelines."""
    loader: str
    """``module:function`` with signature (model, lora, **policy kwargs) -> policy."""
    marker_folder: str | None = None
    """A component folder that identifies the family in a directory without model_index.json."""
    label: str = ""
    """What a model of the family is, in messages ("an SDXL pipeline")."""
    pipeline_class: str = ""
    """The diffusers pipeline whose ``save_pretrained`` writes the family's layout."""
    components: tuple[str, ...] = ()
    """The component folders a local directory of the family must hold, as "folder/ (what)"."""
    optional: str = ""
    """The folders it may hold, and what their absence means (for messages)."""
    repo: str = "<repo>"
    """A hub repository of the family, for the ``hf download`` example."""
    repo_note: str = ""
    """What to know about ``repo`` (a gated repository), or ""."""
    transformer_class: str | None = None
    """``transformer/config.json``'s ``_class_name``: tells the family without model_index.json."""
    listed_optional: tuple[str, ...] = ()
    """Optional folders that are required when model_index.json lists them (not [null, null])."""
    flow_matching: bool = False
    """A flow-matching model (its policy is a ``FlowMatchPolicy``), not a DDIM one."""

    def folders(self) -> list[str]:
        """The required component folder names (``components`` without "/" and notes)."""
        return [c.split("/")[0] for c in self.components]


# Longest prefix first: StableDiffusionXL* and StableDiffusion3* before StableDiffusion*.
FAMILIES: tuple[Family, ...] = (
    Family(
        "sdxl", "StableDiffusionXL", "diffloop.policies.sdxl:load_sdxl_policy", "text_encoder_2",
        label="an SDXL pipeline", pipeline_class="StableDiffusionXLPipeline",
        components=("unet/", "text_encoder/ (CLIP-L)", "text_encoder_2/ (OpenCLIP bigG)",
                    "tokenizer/", "tokenizer_2/", "scheduler/", "vae/"),
        repo="stabilityai/stable-diffusion-xl-base-1.0",
    ),
    Family(
        "sd3", "StableDiffusion3", "diffloop.policies.sd3:load_sd3_policy",
        label="an SD3 / SD3.5 pipeline", pipeline_class="StableDiffusion3Pipeline",
        components=("transformer/", "text_encoder/ (CLIP-L)", "text_encoder_2/ (CLIP-G)",
                    "tokenizer/", "tokenizer_2/", "scheduler/", "vae/"),
        optional="optionally text_encoder_3/ + tokenizer_3/ (T5; both as [null, null] in "
        "model_index.json runs without it)",
        repo="stabilityai/stable-diffusion-3.5-medium", transformer_class="SD3Transformer2DModel",
        listed_optional=("text_encoder_3", "tokenizer_3"), flow_matching=True,
    ),
    Family(
        "flux", "Flux", "diffloop.policies.flux:load_flux_policy",
        label="a FLUX.1 pipeline", pipeline_class="FluxPipeline",
        components=("transformer/", "text_encoder/ (CLIP-L)", "text_encoder_2/ (T5-XXL)",
                    "tokenizer/ (CLIP)", "tokenizer_2/ (T5)", "scheduler/", "vae/"),
        repo="black-forest-labs/FLUX.1-dev", repo_note="a gated repository: accept its license "
        "on the Hub first", transformer_class="FluxTransformer2DModel", flow_matching=True,
    ),
    Family(
        "sd", "StableDiffusion", "diffloop.policies.diffusers_policy:load_ddim_policy",
        label="a Stable Diffusion 1.x / 2.x pipeline", pipeline_class="StableDiffusionPipeline",
        components=("unet/", "text_encoder/", "tokenizer/", "scheduler/"),
        optional="vae/ for latent models (none: pixel space, as diffloop's shapes model)",
    ),
)  # fmt: skip
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
    folders = ", ".join(
        ["model_index.json", *f.components] + [f"and {f.optional}"] * bool(f.optional)
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
    path = locate_model(pretrained, revision)
    if looks_local(path):
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return None
        try:
            return dict(json.loads(index.read_text()))
        except (ValueError, TypeError, OSError) as e:
            raise ModelLoadError(
                f"model.pretrained='{pretrained}': {index} is not a readable JSON mapping "
                f"({type(e).__name__}: {e}); restore it from the model's source"
            ) from None
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except Exception as e:  # any failure: re-raised with the how-to, for every family
        raise ModelLoadError(
            f"could not read model_index.json of model.pretrained='{pretrained}': "
            f"{type(e).__name__}: {e}\nGive a local directory in diffusers layout or a hub id that "
            "is already in the Hugging Face cache (`hf download <repo>`; HF_HUB_OFFLINE=1 forbids "
            "downloads)."
        ) from e


def detect_family(pretrained: str, revision: str | None = None) -> str:
    """The family name of ``pretrained``: the row whose pipeline prefix its ``_class_name`` starts
    with (UnknownFamilyError, naming the supported ones, if none does); a local directory without
    model_index.json is told by its transformer's class or a marker folder (else the default);
    a missing local path is the default family, whose loader reports it."""
    index = model_index(pretrained, revision)
    if index is None:
        return _family_without_index(Path(resolve_pretrained(pretrained)))
    class_name = str(index.get("_class_name", ""))
    for f in FAMILIES:
        if class_name.startswith(f.pipeline_prefix):
            return f.name
    supported = ", ".join(f"{f.pipeline_prefix}* ({f.label.split(' ', 1)[1]})" for f in FAMILIES)
    raise UnknownFamilyError(
        f"model.pretrained='{pretrained}': its model_index.json names the pipeline class "
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
        f = family(detect_family(model.pretrained, model.revision))
        index = model_index(model.pretrained, model.revision) or {}
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    missing = [c + "/" for c in required_folders(f, index, model) if not (local / c).is_dir()]
    if missing:
        raise ConfigError(
            f"'{local}' lacks the component folder(s) {', '.join(missing)}. "
            + how_to_provide(f.name, model.pretrained)
        )
    return f


def required_folders(
    f: Family, index: dict[str, Any], model: ModelConfig, listed: tuple[str, ...] = ()
) -> list[str]:
    """The component folders the family's loader reads for ``model``: the family's own, the
    optional ones model_index.json lists (SD3's T5, and ``listed``), less SDXL's vae/ when
    model.sdxl.vae replaces it."""
    optional = [*f.listed_optional, *listed]
    required = [*f.folders(), *(c for c in optional if (index.get(c) or [None])[0] is not None)]
    return [
        c
        for c in dict.fromkeys(required)
        if not (f.name == "sdxl" and c == "vae" and model.sdxl.vae)
    ]


def _missing_in_cache(snapshot: Path, model: ModelConfig) -> list[str]:
    """The folders a cached snapshot of ``model.pretrained`` lacks among those its loader reads (a
    listed vae/ too: SD's loader reads a directory without one as pixel space)."""
    index = model_index(str(snapshot)) or {}
    f = family(detect_family(str(snapshot)))
    return [
        c + "/" for c in required_folders(f, index, model, ("vae",)) if not (snapshot / c).is_dir()
    ]


def model_path(model: ModelConfig) -> str:
    """Where the loaders read ``model.pretrained`` (at model.revision): a local directory as
    given, a hub id's cached snapshot when it holds every folder the loader reads (the hub is not
    asked), else the hub id once the hub answered; an offline or unreachable hub, or its refusal,
    is a one-line HubUnavailableError (``loading.locate_model``)."""
    return locate_model(
        model.pretrained,
        model.revision,
        missing=lambda snapshot: _missing_in_cache(snapshot, model),
    )


def load_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any):
    """The policy for ``model.pretrained``, built by its family's loader (``kwargs``: device,
    weight_dtype, logprob_reduction, gradient_checkpointing, performance, sample)."""
    name = detect_family(model.pretrained, model.revision)
    family = next(f for f in FAMILIES if f.name == name)
    module, function = family.loader.split(":")
    return getattr(importlib.import_module(module), function)(model, lora, **kwargs)
