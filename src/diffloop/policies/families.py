"""Model families and the one ``load_policy``: the family is read from the model, never configured.

``model_index.json``'s ``_class_name`` (the pipeline diffusers would load) names the family; each
family is a row of ``FAMILIES``: the pipeline class-name prefix it answers to and the loader that
builds its policy. Loaders are imported only when used, so reading this table costs nothing.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffloop.config import LoraConfig, ModelConfig
from diffloop.policies.diffusers_policy import ModelLoadError, resolve_pretrained


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_prefix: str
    """``_class_name`` prefix of the family's diffusers pipelines."""
    loader: str
    """``module:function`` with signature (model, lora, **policy kwargs) -> policy."""
    marker_folder: str | None = None
    """A component folder that identifies the family in a directory without model_index.json."""


# Longest prefix first: StableDiffusionXL* and StableDiffusion3* before StableDiffusion*.
FAMILIES: tuple[Family, ...] = (
    Family(
        "sdxl", "StableDiffusionXL", "diffloop.policies.sdxl:load_sdxl_policy", "text_encoder_2"
    ),
    Family("sd3", "StableDiffusion3", "diffloop.policies.sd3:load_sd3_policy"),
    Family("flux", "Flux", "diffloop.policies.flux:load_flux_policy"),
    Family("sd", "StableDiffusion", "diffloop.policies.diffusers_policy:load_ddim_policy"),
)
DEFAULT_FAMILY = "sd"  # diffloop's shapes model and SD-layout directories without an index


def looks_local(path: str) -> bool:
    """A path rather than a hub id."""
    return Path(path).is_absolute() or path.startswith(".") or Path(path).exists()


def model_index(pretrained: str, revision: str | None = None) -> dict[str, Any] | None:
    """model_index.json of a local directory or hub id; None for a local path without one (the
    family's loader then names what is missing)."""
    path = resolve_pretrained(pretrained)
    if looks_local(path):
        index = Path(path) / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else None
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
    with; a local directory without model_index.json is told by a marker folder (else the default);
    a missing local path is the default family, whose loader reports it."""
    index = model_index(pretrained, revision)
    if index is None:
        local = Path(resolve_pretrained(pretrained))
        for family in FAMILIES:
            if family.marker_folder and (local / family.marker_folder).is_dir():
                return family.name
        return DEFAULT_FAMILY
    class_name = str(index.get("_class_name", ""))
    for family in FAMILIES:
        if class_name.startswith(family.pipeline_prefix):
            return family.name
    return DEFAULT_FAMILY


def load_policy(model: ModelConfig, lora: LoraConfig, **kwargs: Any):
    """The policy for ``model.pretrained``, built by its family's loader (``kwargs``: device,
    weight_dtype, logprob_reduction, gradient_checkpointing, performance, sample)."""
    name = detect_family(model.pretrained, model.revision)
    family = next(f for f in FAMILIES if f.name == name)
    module, function = family.loader.split(":")
    return getattr(importlib.import_module(module), function)(model, lora, **kwargs)
