"""The memory plan (diffloop.memory) against measured tensors of tiny models on CPU: parameter,
gradient and optimizer-state bytes exactly, activations within ACTIVATION_TOLERANCE; the
--gpu-memory verdict, its knobs, and the CLI's output and one-line errors."""

from __future__ import annotations

import pytest
import torch

from diffloop import loops, memory
from diffloop.cli import main
from diffloop.config import load_config, packaged_config
from diffloop.testing.runs import tiny_overrides


def _tensors_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _trainer(model_dir, out, **extra):
    from diffloop.trainer import Trainer

    return Trainer(load_config(None, tiny_overrides(model_dir, out, **extra)))


def _measure(trainer) -> dict[str, int]:
    """Bytes of the real tensors: frozen components, trainables, gradients, optimizer states
    after one epoch (one optimizer step at least), and one training step's saved tensors."""
    policy = trainer.policy
    cfg = trainer.config
    prompts = ["a cat"] * cfg.train.batch_size
    traj, _, _ = trainer.sample_and_score(prompts, list(range(len(prompts))), [{}] * len(prompts))
    trainer.run_epoch(0)  # samples, scores, backward and optimizer step(s)
    params = trainer.params
    sum(p.float().square().sum() for p in params).backward()  # real gradients to measure
    state = trainer.optimization.optimizer.state
    out = {
        "trainables": _tensors_bytes(params),
        "gradients": _tensors_bytes(p.grad for p in params),
        "optimizer states": sum(
            _tensors_bytes(v for v in s.values() if isinstance(v, torch.Tensor))
            for s in state.values()
        ),
    }
    trainable = {id(p) for p in params}
    for name in (policy.lora_component, *policy.text_encoder_names, "vae"):
        module = getattr(policy, name, None)
        if module is None:
            continue
        frozen = [p for p in module.parameters() if id(p) not in trainable]
        out[name] = _tensors_bytes([*frozen, *module.buffers()])
    saved = memory.SavedBytes(memory.parameter_storages(policy.denoiser))
    batch = traj.index(list(range(cfg.train.batch_size)))
    steps = torch.zeros(len(batch), dtype=torch.long)
    adv = torch.ones(len(batch))
    with saved.hooks():
        value, _ = loops.step_loss(
            policy, batch, adv, steps, trainer.sampler, trainer.loss_settings, on_policy=False
        )
    value.backward()
    out["activations"] = saved.total
    return out


def _planned(trainer) -> dict[str, int]:
    plan = memory.memory_plan(trainer.config)
    terms = {t.name: t.bytes for t in plan.terms}
    d = trainer.policy.lora_component
    out = {k: terms[k] for k in ("trainables", "gradients", "optimizer states", "activations")}
    out[d] = terms[f"frozen {d}"]
    for name in trainer.policy.text_encoder_names:
        if getattr(trainer.policy, name, None) is not None:
            out[name] = terms[f"text encoder {name}"]
    out["vae"] = terms["frozen vae"]
    return out


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd3"])
def test_plan_matches_measured_tensors(fixture, request, tmp_path):
    """Weights, trainables, gradients and optimizer states: exact; activations within the
    stated tolerance (a real training step's saved tensors vs the meta forward's)."""
    trainer = _trainer(request.getfixturevalue(fixture), tmp_path / "run")
    try:
        measured, planned = _measure(trainer), _planned(trainer)
    finally:
        trainer.close()
    acts_m, acts_p = measured.pop("activations"), planned.pop("activations")
    assert planned == measured
    assert abs(acts_p - acts_m) <= memory.ACTIVATION_TOLERANCE * acts_m, (acts_p, acts_m)


def test_gradient_checkpointing_and_cfg_scale_activations(tiny_sd, tmp_path):
    config = load_config(None, tiny_overrides(tiny_sd, tmp_path))
    plan = memory.memory_plan(config)
    acts = {t.name: t.bytes for t in plan.terms}["activations"]
    no_cfg = load_config(None, tiny_overrides(tiny_sd, tmp_path, **{"sample.guidance_scale": 1.0}))
    assert {t.name: t.bytes for t in memory.memory_plan(no_cfg).terms}["activations"] * 2 == acts


def test_known_model_needs_no_hub():
    """FLUX.1-dev's plan from its known config: 11.9e9 transformer parameters in bf16."""
    config = load_config(packaged_config("flux_pickscore.yaml"))
    plan = memory.memory_plan(config)
    terms = {t.name: t.bytes for t in plan.terms}
    assert 11.8e9 * 2 < terms["frozen transformer"] < 12.0e9 * 2
    assert 4.6e9 * 2 < terms["text encoder text_encoder_2"] < 4.8e9 * 2  # T5-XXL, 24 layers
    assert not plan.unknown


def test_unknown_model_is_one_line():
    config = load_config(None, ["model.pretrained=nobody/nothing"])
    lines = memory.memory_plan(config).lines()
    assert any("unknown" in line and "nobody/nothing" in line for line in lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("80G", 80 * 10**9), ("1.5gb", 1.5e9)],
)
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["24", "lots", "24XB", "0GB", ""])
def test_bad_size_is_refused(text):
    if text == "24":
        assert memory.parse_size(text) == 24
        return
    with pytest.raises(memory.MemorySizeError, match="--gpu-memory"):
        memory.parse_size(text)


def test_verdict_and_knobs():
    """FLUX.1-dev full fine-tuning does not fit 80 GB on one process; LoRA and FSDP are offered
    with the bytes each saves."""
    config = load_config(packaged_config("flux_pickscore.yaml"), ["lora.enabled=false"])
    lines = memory.verdict_lines(config, memory.parse_size("80GB"))
    text = "\n".join(lines)
    assert "fits 80.00 GB (74.51 GiB): NO" in text
    assert "lora.enabled=true: saves" in text
    assert "fsdp.enabled=true with 8 processes: saves" in text


def test_check_config_prints_plan_and_verdict(capsys):
    assert main(["check-config", "flux_pickscore.yaml", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per process (arithmetic, not measured" in out
    assert "fits 80.00 GB (74.51 GiB): yes" in out


def test_check_config_bad_size_is_one_line(capsys):
    assert main(["check-config", "shapes.yaml", "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-memory='lots' is not a memory size" in err


def _documented_plans() -> dict[str, tuple[list[str], str]]:
    """docs/recipes.md: {command after `diffloop `: the plan block printed below it}."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    out = {}
    for part in text.split("from `diffloop ")[1:]:
        command, rest = part.split("`:", 1)
        out[command] = rest.split("```")[1].strip()
    return out


@pytest.mark.parametrize("command", sorted(_documented_plans()))
def test_recipes_page_shows_what_check_config_prints(command, capsys):
    """Each plan in docs/recipes.md is the current code's output for the command beside it."""
    assert main(command.split()) == 0
    out = capsys.readouterr().out
    lines = out[out.index("memory plan per process") :].splitlines()
    plan = [line.removeprefix("# ") for line in lines if line.startswith(("memory", "#   "))]
    assert "\n".join(plan) == _documented_plans()[command]


@pytest.mark.parametrize("enabled", [True, False])
def test_train_header_prints_the_plans_peak_unless_turned_off(enabled, tiny_sd, tmp_path, capsys):
    trainer = _trainer(tiny_sd, tmp_path / "run", num_epochs=1, **{"logging.memory_plan": enabled})
    trainer.train()
    out = capsys.readouterr().out
    header = out[: out.index("epoch 1/1")]
    expected = memory.memory_summary(trainer.config)[0]
    assert ("memory plan per process (arithmetic, not measured): peak" in header) is enabled
    assert (expected in header) is enabled
