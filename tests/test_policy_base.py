"""The one policy base: one resolution field, one read of model_index.json, imports that run one
way (export uses the policies), and the hooks a family overrides (the CFG combination, one call
per branch, the timestep and output sign of the flow sampler)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

from diffloop.config import ConfigError, LoraConfig, ModelConfig, SampleConfig, SDXLConfig
from diffloop.policies.families import load_policy

CPU = torch.device("cpu")
SRC = Path(__file__).resolve().parents[1] / "src" / "diffloop"
PROMPTS = ["a cat", "a red dog on a bench"]


def test_the_old_sdxl_resolution_moves_to_model_resolution_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        model = ModelConfig(sdxl=SDXLConfig(resolution=512))
    assert model.resolution == 512 and model.sdxl.resolution is None
    assert "model.sdxl.resolution is deprecated" in caplog.text
    assert ModelConfig(resolution=512, sdxl=SDXLConfig(resolution=512)).resolution == 512
    with pytest.raises(ConfigError, match=r"^model.sdxl.resolution=512 and model.resolution=256"):
        ModelConfig(resolution=256, sdxl=SDXLConfig(resolution=512))


def test_the_shipped_sdxl_configs_use_model_resolution():
    from diffloop.config import load_yaml, packaged_config

    for name in ("sdxl_compressibility.yaml", "sdxl_low_memory.yaml"):
        model = load_yaml(packaged_config(name).read_text())["model"]
        assert "resolution" in model and "resolution" not in model.get("sdxl", {}), name


def test_model_resolution_sets_an_sd_models_latent_size(tiny_sd):
    default = load_policy(ModelConfig(pretrained=str(tiny_sd)), LoraConfig(), device=CPU)
    side = default.image_size() // 2
    smaller = load_policy(
        ModelConfig(pretrained=str(tiny_sd), resolution=side), LoraConfig(), device=CPU
    )
    assert smaller.latent_shape()[1:] == tuple(s // 2 for s in default.latent_shape()[1:])


def test_model_index_is_read_once_per_load(tiny_sd3, monkeypatch):
    reads = []
    original = Path.read_text

    def counting(self, *args, **kwargs):
        if self.name == "model_index.json":
            reads.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    load_policy(ModelConfig(pretrained=str(tiny_sd3)), LoraConfig(), device=CPU)
    assert len(reads) == 1


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_the_policies_never_import_the_export_package():
    bad = [
        f"{p.name} imports {m}"
        for p in sorted((SRC / "policies").glob("*.py"))
        for m in _imports(p)
        if m == "diffloop.export" or m.startswith("diffloop.export.")
    ]
    assert not bad, bad


def _sd3(path, **sample):
    from diffloop.policies.sd3 import load_sd3_policy

    torch.manual_seed(0)
    model = ModelConfig(pretrained=str(path))
    sample = SampleConfig(**{"num_steps": 4, "eta": 0.7, "guidance_scale": 3.0, **sample})
    return load_sd3_policy(model, LoraConfig(), device=CPU, sample=sample)


def _velocity_inputs(policy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *policy.latent_shape(), generator=g)
    embeds, negative, extra = policy.conditioning(PROMPTS, "blurry")
    return x, torch.tensor([900.0, 300.0]), embeds, negative, extra


def test_flow_hooks_change_what_the_sampler_sees(tiny_sd3):
    policy = _sd3(tiny_sd3)
    x, t, embeds, negative, extra = _velocity_inputs(policy)
    with torch.no_grad():
        batched = policy.velocity(x, t, embeds, negative, extra, 3.0)
        cond = policy.velocity(x, t, embeds, negative, extra, 1.0)
        policy.batch_branches = False  # one call per branch: the same velocity
        separate = policy.velocity(x, t, embeds, negative, extra, 3.0)
        policy.combine_guidance = lambda c, u, g: c  # a family's own combination is used
        combined = policy.velocity(x, t, embeds, negative, extra, 3.0)
        policy.output_sign = -1.0  # a reversed-flow model: the velocity is the negated output
        negated = policy.velocity(x, t, embeds, negative, extra, 3.0)
        policy.model_timestep = lambda s: (1000 - s.float()) / 1000 * 1000  # another time input
        moved = policy.velocity(x, t, embeds, negative, extra, 3.0)
    torch.testing.assert_close(separate, batched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(combined, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(negated, -combined, rtol=0, atol=0)
    assert (moved - negated).abs().max() > 1e-4
