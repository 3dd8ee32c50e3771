"""Every LoRA copy diffloop exports loads in the tool it is for, at the trained strength.

Per family (SD 1.x tiny UNet, SDXL tiny UNet, SD3, FLUX, Qwen-Image, Z-Image, FLUX.2 dev and
Klein tiny transformers, built in memory with the family's LoRA targets and random lora_B),
``export_run`` writes the diffusers file and the family's copy; then:

- every key of the copy names a module of the base model under the rule of the loader it is for
  (kohya sd-scripts' module names, ComfyUI's key maps: ``diffloop.testing.lora_loaders``), and
  nothing is left unloaded;
- the copy, read back by diffusers' converters of that format where they exist (kohya SD / SDXL in
  SGM names, FLUX with alpha keys) or applied with ComfyUI's formula (SD 1.x, SDXL, SD3, FLUX),
  reproduces the trained model's output; for Qwen-Image, Z-Image and FLUX.2 every module ComfyUI
  patches gets peft's delta exactly (the next point), each patch the width of its module;
- (alpha / rank) up @ down of every module equals peft's delta (``get_delta_weight``) exactly, with
  alpha != rank and alpha == rank;
- the model card names the modules the adapter trained and the file each tool loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file

from diffloop.config import load_config
from diffloop.export import LORA_WEIGHT_NAME, export_run
from diffloop.policies.flow import FlowMatchPolicy
from diffloop.policies.flux2 import Flux2KleinPolicy, Flux2Policy
from diffloop.policies.qwen_image import QwenImagePolicy
from diffloop.policies.zimage import ZImagePolicy
from diffloop.testing.lora_loaders import (
    comfy_flux2_layout,
    comfy_flux_layout,
    comfy_load_lora,
    comfy_lora_diff,
    comfy_same_name_layout,
    comfy_sd3_layout,
    comfy_transformer_key_map,
    comfy_unet_key_map,
    comfy_unet_layout,
    comfy_zimage_layout,
    sd_scripts_lora_names,
    sd_scripts_sdxl_layout,
)

RANK = 2
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # lora.target_modules' default
FLOW_TARGETS = FlowMatchPolicy.DEFAULT_LORA_TARGETS  # what the SD3 / FLUX policies adapt
TARGETS = {"sd": UNET_TARGETS, "sdxl": UNET_TARGETS, "sd3": FLOW_TARGETS, "flux": FLOW_TARGETS,
           "qwen_image": QwenImagePolicy.DEFAULT_LORA_TARGETS,
           "zimage": ZImagePolicy.DEFAULT_LORA_TARGETS,
           "flux2": Flux2Policy.DEFAULT_LORA_TARGETS,
           "flux2_klein": Flux2KleinPolicy.DEFAULT_LORA_TARGETS}  # fmt: skip
COPY = {family: "run.safetensors" if family in ("sd", "sdxl") else "run_comfyui.safetensors"
        for family in TARGETS}  # fmt: skip
FAMILIES = list(COPY)
# the families whose tiny denoiser the tests run forward (the others are checked module by module)
FORWARD_FAMILIES = ["sd", "sdxl", "sd3", "flux"]


class Policy:
    """The two attributes export reads, the adapted module, and its trainable parameters."""

    def __init__(self, family: str, module: torch.nn.Module) -> None:
        self.lora_component = "unet" if family in ("sd", "sdxl") else "transformer"
        self.lora_loader = {
            "sd": "StableDiffusionLoraLoaderMixin", "sdxl": "StableDiffusionXLLoraLoaderMixin",
            "sd3": "SD3LoraLoaderMixin", "flux": "FluxLoraLoaderMixin",
            "qwen_image": "QwenImageLoraLoaderMixin", "zimage": "ZImageLoraLoaderMixin",
            "flux2": "Flux2LoraLoaderMixin", "flux2_klein": "Flux2LoraLoaderMixin",
        }[family]  # fmt: skip
        setattr(self, self.lora_component, module)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        module = getattr(self, self.lora_component)
        return [p for p in module.parameters() if p.requires_grad]


def base_model(family: str) -> torch.nn.Module:
    """The family's tiny random-weight denoiser (SD3 with 2 blocks and FLUX with 2 + 2, so that
    non-final and single-stream blocks are covered; Qwen-Image, Z-Image and FLUX.2 as their tiny
    pipelines')."""
    torch.manual_seed(0)
    if family == "sd":
        from diffloop.testing.tiny import make_tiny_unet

        return make_tiny_unet()
    if family == "sdxl":
        from diffusers import UNet2DConditionModel

        from diffloop.testing.tiny_sdxl import SDXL_CONFIGS

        return UNet2DConditionModel(**SDXL_CONFIGS["tiny"]["unet"])
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        from diffloop.testing.tiny_flow import SD3_CONFIGS

        return SD3Transformer2DModel(**{**SD3_CONFIGS["tiny"]["transformer"], "num_layers": 2})
    if family == "qwen_image":
        from diffusers import QwenImageTransformer2DModel

        from diffloop.testing.tiny_qwen_image import QWEN_IMAGE_CONFIGS

        return QwenImageTransformer2DModel(**QWEN_IMAGE_CONFIGS["tiny"]["transformer"])
    if family == "zimage":
        from diffusers import ZImageTransformer2DModel

        from diffloop.testing.tiny_zimage import ZIMAGE_CONFIGS

        return ZImageTransformer2DModel(**ZIMAGE_CONFIGS["tiny"]["transformer"])
    if family in ("flux2", "flux2_klein"):
        from diffusers import Flux2Transformer2DModel

        from diffloop.testing.tiny_flux2 import FLUX2_CONFIGS

        size = "tiny_klein" if family == "flux2_klein" else "tiny"
        return Flux2Transformer2DModel(**FLUX2_CONFIGS[size]["transformer"])
    from diffusers import FluxTransformer2DModel

    from diffloop.testing.tiny_flux import FLUX_CONFIGS

    config = {**FLUX_CONFIGS["tiny"]["transformer"], "num_layers": 2, "num_single_layers": 2}
    return FluxTransformer2DModel(**config, guidance_embeds=True)


def adapted(family: str, alpha: float) -> torch.nn.Module:
    """The base model with the family's LoRA (rank 2, ``alpha``), lora_B random (a fresh adapter
    is the base model)."""
    model = base_model(family)
    model.requires_grad_(False)
    model.add_adapter(PeftLoraConfig(r=RANK, lora_alpha=alpha, target_modules=TARGETS[family],
                                     init_lora_weights="gaussian"))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def export(family: str, alpha: float, root: Path) -> tuple[torch.nn.Module, Path]:
    """(the adapted model, its export directory) of ``export_run`` for a run named "run"."""
    model = adapted(family, alpha)
    config = load_config(None, [f"output_dir={root / 'run'}", f"lora.rank={RANK}",
                                f"lora.alpha={alpha}", "model.pretrained=org/base"])  # fmt: skip
    return model, export_run(Policy(family, model), config, family)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each family exported once with alpha 3 != rank 2 (scale 1.5)."""
    return {f: export(f, 3.0, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def inputs(family: str, model: torch.nn.Module) -> dict[str, Any]:
    """A batch of 2 for the denoiser's forward (random conditioning)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    c = model.config
    if family in ("sd", "sdxl"):
        kw = {"sample": r(2, c.in_channels, 16, 16), "timestep": torch.tensor([500, 20]),
              "encoder_hidden_states": r(2, 7, c.cross_attention_dim)}  # fmt: skip
        if family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": r(2, 32), "time_ids": r(2, 6)}
        return kw
    if family == "sd3":
        return {"hidden_states": r(2, c.in_channels, 16, 16),
                "timestep": torch.tensor([900.0, 150.0]),
                "encoder_hidden_states": r(2, 7, c.joint_attention_dim),
                "pooled_projections": r(2, c.pooled_projection_dim)}  # fmt: skip
    return {"hidden_states": r(2, 16, c.in_channels), "timestep": torch.tensor([0.5, 0.02]),
            "encoder_hidden_states": r(2, 7, c.joint_attention_dim),
            "pooled_projections": r(2, c.pooled_projection_dim),
            "guidance": torch.tensor([3.5, 3.5]),
            "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3)}  # fmt: skip


def output(family: str, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(family, model)).sample


def assert_trained_output(family: str, trained: torch.nn.Module, got: torch.nn.Module) -> None:
    """``got`` gives the trained model's output, which differs from the base model's."""
    expected = output(family, trained)
    trained.disable_adapters()
    base = output(family, trained)
    trained.enable_adapters()
    assert (expected - base).abs().max() > 1e-4, "the adapter does not change the model"
    torch.testing.assert_close(output(family, got), expected, rtol=1e-5, atol=1e-6)


def adapted_count(model: torch.nn.Module) -> int:
    """How many modules carry the adapter."""
    return len([n for n, m in model.named_modules() if hasattr(m, "lora_A")])


def comfy_key_map(family: str, model: torch.nn.Module) -> dict[str, Any]:
    """ComfyUI's LoRA key map for the family's base model (``diffloop.testing.lora_loaders``)."""
    c = model.config
    if family in ("sd", "sdxl"):
        return comfy_unet_key_map(model)  # the adapter wraps layers, the block structure is kept
    if family == "qwen_image":  # ComfyUI's Qwen-Image modules carry diffusers' names
        base = base_model(family)
        layers = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
        return comfy_transformer_key_map(comfy_same_name_layout(layers))
    if family == "zimage":
        blocks = [f"layers.{i}" for i in range(c.n_layers)] + [
            f"{refiner}.{i}" for refiner in ("noise_refiner", "context_refiner")
            for i in range(c.n_refiner_layers)
        ]  # fmt: skip
        return comfy_transformer_key_map(comfy_zimage_layout(blocks, c.dim))
    width = c.num_attention_heads * c.attention_head_dim
    if family == "sd3":
        return comfy_transformer_key_map(comfy_sd3_layout(c.num_layers, width))
    layout = comfy_flux2_layout if family in ("flux2", "flux2_klein") else comfy_flux_layout
    return comfy_transformer_key_map(layout(c.num_layers, c.num_single_layers, width))


def diffusers_paths(family: str, model: torch.nn.Module) -> dict[str, str]:
    """ComfyUI key -> the diffusers module it patches (inverting ComfyUI's layout)."""
    key_map = comfy_key_map(family, model)
    if family in ("sd", "sdxl"):
        to_diffusers = {sgm: d for d, sgm in comfy_unet_layout(model).items()}
        return {key: to_diffusers[sgm] for key, sgm in key_map.items()}
    return {key: key.removeprefix("transformer.") for key in key_map}


# ------------------------------------------------------------------------------ files


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_a_copy_for_other_tools(exported, family):
    _, directory = exported[family]
    assert {p.name for p in directory.iterdir()} == {LORA_WEIGHT_NAME, COPY[family], "README.md"}


# ------------------------------------------------------------------------------ key names


def test_sd_kohya_copy_names_sd_scripts_modules(exported):
    """SD 1.x / 2.x: sd-scripts trains on a UNet with diffusers' module names, so the copy's
    names are names its LoRANetwork gives (and ComfyUI maps them too)."""
    model, directory = exported["sd"]
    modules = {k.split(".")[0] for k in load_file(str(directory / COPY["sd"]))}
    assert len(modules) == adapted_count(model)
    assert modules <= sd_scripts_lora_names(base_model("sd"))
    assert modules <= set(comfy_key_map("sd", model))


def test_sdxl_kohya_copy_names_sgm_modules(exported):
    """SDXL: sd-scripts' SDXL UNet is named as SDXL's original checkpoint (input_blocks ...), and
    its --network_weights / merge scripts load keys by those names: the copy names modules
    sd-scripts creates, in ComfyUI's SGM names, and no diffusers-style name is left."""
    model, directory = exported["sdxl"]
    modules = {k.split(".")[0] for k in load_file(str(directory / COPY["sdxl"]))}
    layout = comfy_unet_layout(base_model("sdxl"))
    assert len(modules) == adapted_count(model)
    assert modules <= sd_scripts_lora_names(base_model("sdxl"), layout)
    assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in modules)
    assert modules <= set(comfy_key_map("sdxl", model))


def test_sdxl_module_names_are_sd_scripts_names_on_sdxl_base():
    """On SDXL base 1.0's UNet (built on the meta device: shapes only), every attention layer the
    default targets adapt gets the name sd-scripts' SDXL network gives it (its conversion map):
    560 modules, 1680 keys with down / up / alpha."""
    from diffusers import UNet2DConditionModel

    from diffloop.export import sgm_module_name
    from diffloop.testing.tiny_sdxl import SDXL_CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_CONFIGS["base"]["unet"])
    paths = [n for n, m in unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
             or n.endswith("to_out.0")]  # fmt: skip
    expected = sd_scripts_sdxl_layout(paths)
    assert len(paths) == 560 and set(expected) == set(paths)
    for path in paths:
        assert sgm_module_name(path, unet.config) == expected[path], path


def test_every_sdxl_layer_gets_the_sgm_name_comfyui_gives_it():
    """Every Linear / Conv2d of the SDXL UNet, whatever lora.target_modules adapts, has an SGM
    name, the one ComfyUI's layout gives it (so no target leaves the kohya copy without a name)."""
    from diffloop.export import sgm_module_name

    unet = base_model("sdxl")
    layout = comfy_unet_layout(unet)
    layers = [
        n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    assert set(layers) == set(layout)
    for path in layers:
        assert sgm_module_name(path, unet.config) == layout[path], path


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("sd", "sdxl")])
def test_comfyui_copy_maps_every_key_with_its_alpha(exported, family):
    """The transformer families: every key of the copy is in ComfyUI's key map for the model
    ("transformer." + the diffusers module), none is left unloaded, each carries alpha, and the
    slice it patches of the (fused) original weight has the module's width."""
    model, directory = exported[family]
    lora = load_file(str(directory / COPY[family]))
    patches, unloaded = comfy_load_lora(lora, comfy_key_map(family, model))
    assert not unloaded
    assert len(patches) == adapted_count(model)
    for key, ((_, offset), up, down, alpha) in patches.items():
        assert alpha == 3.0 and down.shape[0] == RANK
        layer = model.get_submodule(key.removeprefix("transformer.")).base_layer
        assert offset is None or offset[2] == layer.out_features, key


# ------------------------------------------------------------------------------ loading back


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_copy_loaded_by_diffusers_reproduces_the_trained_unet(exported, family):
    """diffusers' kohya converter (SGM block renaming for SDXL) reads the copy: same outputs."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    model, directory = exported[family]
    mixin = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    fresh = base_model(family)
    state, alphas = mixin.lora_state_dict(str(directory / COPY[family]), unet_config=fresh.config)
    assert set(alphas.values()) == {3.0}
    mixin.load_lora_into_unet(state, alphas, unet=fresh)
    assert_trained_output(family, model, fresh.eval())


def test_flux_comfyui_copy_loaded_by_diffusers_reproduces_the_trained_transformer(exported):
    """diffusers' FLUX loader reads ``<module>.alpha`` keys as network alphas: same outputs."""
    from diffusers.loaders import FluxLoraLoaderMixin

    model, directory = exported["flux"]
    fresh = base_model("flux")
    state, alphas = FluxLoraLoaderMixin.lora_state_dict(
        str(directory / COPY["flux"]), return_alphas=True
    )
    FluxLoraLoaderMixin.load_lora_into_transformer(state, alphas, transformer=fresh)
    assert_trained_output("flux", model, fresh.eval())


@pytest.mark.parametrize("family", FORWARD_FAMILIES)
def test_comfyui_formula_on_the_copy_reproduces_the_trained_model(exported, family):
    """ComfyUI's patch W += (alpha / rank) up @ down, applied to the base model with every key of
    the family's copy, gives the trained model's output; the diffusers file read the same way
    (no alpha: scale 1) does not when alpha != rank."""
    model, directory = exported[family]
    key_map, paths = comfy_key_map(family, model), diffusers_paths(family, model)

    def patched(lora: dict[str, torch.Tensor]) -> torch.nn.Module:
        base, (patches, _) = copy.deepcopy(base_model(family)), comfy_load_lora(lora, key_map)
        with torch.no_grad():
            for key, (_, up, down, alpha) in patches.items():
                weight = base.get_submodule(paths[key]).weight
                weight += comfy_lora_diff(up, down, alpha).reshape(weight.shape)
        return base.eval()

    assert_trained_output(family, model, patched(load_file(str(directory / COPY[family]))))
    if family in ("sd3", "flux"):  # the diffusers file has ComfyUI's keys but no alpha
        diffusers_file = load_file(str(directory / LORA_WEIGHT_NAME))
        half = output(family, patched(diffusers_file))
        assert (half - output(family, model)).abs().max() > 1e-4


@pytest.mark.parametrize("alpha", [3.0, 2.0], ids=["alpha_ne_rank", "alpha_eq_rank"])
@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_over_rank_up_down_is_pefts_delta_exactly(family, alpha, tmp_path):
    model, directory = export(family, alpha, tmp_path)
    patches, unloaded = comfy_load_lora(
        load_file(str(directory / COPY[family])), comfy_key_map(family, model)
    )
    assert not unloaded and patches
    paths = diffusers_paths(family, model)
    for key, (_, up, down, file_alpha) in patches.items():
        assert file_alpha == alpha
        layer = model.get_submodule(paths[key])
        expected = layer.get_delta_weight("default")
        assert torch.equal(comfy_lora_diff(up, down, file_alpha).reshape(expected.shape), expected)


# ------------------------------------------------------------------------------ the card


@pytest.mark.parametrize("family", FAMILIES)
def test_the_card_names_the_trained_modules_and_the_file_each_tool_loads(exported, family):
    """The flow families adapt their own targets, whatever lora.target_modules says (its SD
    default here): the card names the adapter's modules, not the config's."""
    _, directory = exported[family]
    text = (directory / "README.md").read_text()
    targets = sorted(TARGETS[family])
    assert f"- LoRA: rank 2, alpha 3 (scale 1.5), on {', '.join(targets)}" in text
    assert f"| `{LORA_WEIGHT_NAME}` | diffusers" in text
    tools = "ComfyUI (`models/loras`)" + (", " if family in ("sd", "sdxl", "flux") else "")
    assert f"| `{COPY[family]}` | {tools}" in text
    if family in ("sd", "sdxl"):
        assert "kohya sd-scripts (`--network_weights`" in text
    assert "At strength 1 every file applies the trained scale alpha / rank = 1.5." in text
