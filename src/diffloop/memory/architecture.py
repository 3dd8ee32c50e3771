"""A model's weight-bearing components built on ``meta`` from their configs (a local directory, a
cached hub snapshot, or the known hub ids' configs as ``diffloop bench`` builds them), with the
long-text tokenizer's cap: what the memory plan counts."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Architecture:
    """A model's weight-bearing components on ``meta`` and where their configs came from."""

    family: str
    source: str
    components: dict[str, torch.nn.Module]
    denoiser_name: str
    text_encoder_names: tuple[str, ...]
    extra_layers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """{component: [(ModuleList path, real length)]}: a component built shallower than the real
    one (the bench's text encoders); its bytes add the missing layers at the first layer's."""
    text_cap: int | None = None
    """The long-text tokenizer's model_max_length (the text is at most this long), when read."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    @property
    def vae(self) -> torch.nn.Module | None:
        return self.components.get("vae")


class UnknownArchitecture(Exception):
    """No config of the model is reachable; the message says why (one line)."""


def _t5_xxl() -> dict[str, Any]:
    """google/t5-v1_1-xxl's encoder (FLUX.1's text_encoder_2, SD3's text_encoder_3)."""
    from diffloop.testing.tiny_flux import FLUX_CONFIGS

    return dict(FLUX_CONFIGS["dev"]["text_encoder_2"], num_layers=24)


def _known_sd3() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from transformers import T5EncoderModel

    from diffloop.testing.tiny_flow import build_sd3_components, make_t5_tokenizer, t5_config

    parts = build_sd3_components("sd35_medium", device="meta", with_t5=False)
    with torch.device("meta"):
        parts["text_encoder_3"] = T5EncoderModel(t5_config(_t5_xxl(), make_t5_tokenizer()))
    return parts, {}


def _known_flux(guidance: bool) -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_flux import build_flux_components

    parts = build_flux_components("dev", guidance_embeds=guidance, device="meta")
    return parts, {"text_encoder_2": [("encoder.block", 24)]}


def _known_flux2(size: str) -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_flux2 import build_flux2_components

    parts = build_flux2_components(size, device="meta")
    # Mistral-Small-3.1-24B: 40 language layers, 24 Pixtral vision layers (bench builds 3 and 1)
    extra = {
        "text_encoder": [("language_model.layers", 40), ("vision_tower.transformer.layers", 24)]
    }
    return parts, extra if size == "dev" else {}


def _known_qwen_image() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_qwen_image import build_qwen_image_components

    parts = build_qwen_image_components("qwen_image", device="meta")
    # Qwen2.5-VL-7B: 28 language layers, 32 vision blocks (bench builds 2 and 1)
    return parts, {"text_encoder": [("language_model.layers", 28), ("visual.blocks", 32)]}


def _known_zimage() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_zimage import build_zimage_components

    return build_zimage_components("z_image", device="meta"), {}


def _known_sdxl() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_sdxl import build_sdxl_components

    return build_sdxl_components("base", device="meta"), {}


KNOWN_MODELS: dict[str, tuple[str, Callable[[], tuple[dict[str, Any], dict]]]] = {
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", _known_sd3),
    "black-forest-labs/FLUX.1-dev": ("flux", lambda: _known_flux(True)),
    "black-forest-labs/FLUX.1-schnell": ("flux", lambda: _known_flux(False)),
    "black-forest-labs/FLUX.2-dev": ("flux2", lambda: _known_flux2("dev")),
    "black-forest-labs/FLUX.2-klein-4B": ("flux2_klein", lambda: _known_flux2("klein_4b")),
    "black-forest-labs/FLUX.2-klein-base-4B": ("flux2_klein", lambda: _known_flux2("klein_4b")),
    "Qwen/Qwen-Image": ("qwen_image", _known_qwen_image),
    "Tongyi-MAI/Z-Image": ("zimage", _known_zimage),
    "Tongyi-MAI/Z-Image-Turbo": ("zimage", _known_zimage),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", _known_sdxl),
}
"""Hub ids whose architecture is known without the hub: the configs ``diffloop bench`` builds
(``diffloop.testing.tiny_*``: the models' config.json values), text encoders at full depth."""


def policy_class(family_name: str) -> type:
    """The family's policy class (``DenoiserPolicy`` subclass whose family_name it is)."""
    from diffloop.policies.families import family

    module = importlib.import_module(family(family_name).loader.split(":")[0])
    for value in vars(module).values():
        if isinstance(value, type) and getattr(value, "family_name", None) == family_name:
            return value
    raise UnknownArchitecture(f"no policy class of family {family_name}")


def _build_from_directory(family_name: str, root: Path) -> dict[str, torch.nn.Module]:
    """Every weight-bearing component of the family found in ``root``, built on meta from its
    config.json."""
    from diffloop.policies.families import family

    built: dict[str, torch.nn.Module] = {}
    for c in family(family_name).components:
        folder = root / c.name
        if not c.has_weights or not (folder / "config.json").is_file():
            continue
        cls = c.load_class()
        with torch.device("meta"):
            if hasattr(cls, "config_class") and cls.config_class is not None:  # transformers
                config = cls.config_class.from_pretrained(str(folder))
                built[c.name] = cls(config)
            else:  # diffusers ModelMixin
                built[c.name] = cls.from_config(cls.load_config(str(folder)))
    return built


def architecture(pretrained: str, revision: str | None = None) -> Architecture:
    """The model's components on meta: a local directory (or ``shapes``), a hub id whose snapshot
    is in the cache, or a ``KNOWN_MODELS`` id; else :class:`UnknownArchitecture`."""
    from diffloop.policies.families import family_of
    from diffloop.policies.loading import (
        ModelFiles,
        cached_snapshot,
        looks_local,
        read_model_index,
        resolve_pretrained,
    )

    path = resolve_pretrained(pretrained)
    root: Path | None = Path(path) if looks_local(path) else None
    source = f"config.json files in {path}"
    if root is None:
        snapshot = cached_snapshot(pretrained, "model_index.json", revision)
        if snapshot is not None:
            root, source = snapshot, "config.json files in the hub cache"
    if root is not None:
        if not root.is_dir():
            raise UnknownArchitecture(f"{path} is not a directory")
        files = ModelFiles(pretrained, str(root), read_model_index(str(root), pretrained))
        name = family_of(files)
        parts = _build_from_directory(name, root)
        extra: dict[str, list[tuple[str, int]]] = {}
    elif pretrained in KNOWN_MODELS:
        name, build = KNOWN_MODELS[pretrained]
        parts, extra = build()
        source = f"{pretrained}'s config.json values (as `diffloop bench` builds them)"
    else:
        raise UnknownArchitecture(
            f"{pretrained} is neither a local directory nor in the hub cache, and its config is "
            "not among the known models"
        )
    cls = policy_class(name)
    denoiser = cls.lora_component
    modules = {k: v for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    if denoiser not in modules:
        raise UnknownArchitecture(f"no {denoiser}/config.json in {source}")
    names = tuple(n for n in cls.text_encoder_names if n in modules)
    cap = _tokenizer_cap(root, LONG_TOKENIZER.get(name, "tokenizer")) if root else None
    return Architecture(name, source, modules, denoiser, names, extra, cap)


LONG_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
"""The tokenizer of the family's long text (the others': ``tokenizer``)."""


def _tokenizer_cap(root: Path, folder: str) -> int | None:
    """``model_max_length`` of ``root/folder/tokenizer_config.json`` (None if absent or huge:
    transformers writes 1e30 for "no limit")."""
    import json

    path = root / folder / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and value < 10**6 else None
