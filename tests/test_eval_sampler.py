"""The evaluation sampler (``eval.num_steps`` / ``eval.eta``): a flow model is evaluated as
Flow-GRPO does (the ODE at 40 steps for SD3, 28 for FLUX, the training guidance), a DDIM model with
its training sampler as before; ``diffloop eval RUN`` reproduces the run's own evaluation
exactly."""

from __future__ import annotations

import json

import pytest
import torch

from diffloop import loops
from diffloop.config import (
    Config,
    ConfigError,
    LoraConfig,
    ModelConfig,
    SampleConfig,
    load_config,
)
from diffloop.policies.families import load_policy
from diffloop.testing.runs import tiny_overrides
from diffloop.trainer import Trainer

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a dog on a bench", "a red ball"]


def load(path, **sample) -> object:
    torch.manual_seed(0)
    return load_policy(
        ModelConfig(pretrained=str(path)), LoraConfig(), device=CPU, sample=SampleConfig(**sample)
    )


def config_with(*overrides: str) -> Config:
    return load_config(None, ["sample.num_steps=6", "sample.eta=0.7", "sample.guidance_scale=4.5",
                              *overrides])  # fmt: skip


def test_flow_families_default_to_flow_grpos_evaluation(tiny_sd3, tiny_flux):
    """null eval settings: SD3 40 steps, FLUX 28, noise level 0, the training guidance."""
    from diffloop.loops import evaluation_sampler

    config = config_with()
    sd3 = evaluation_sampler(config, load(tiny_sd3))
    assert sd3 == loops.SamplerSettings(40, 0.0, 4.5, "")
    flux = evaluation_sampler(config_with("sample.guidance_scale=3.5"), load(tiny_flux))
    assert flux == loops.SamplerSettings(28, 0.0, 3.5, "")
    explicit = config_with("eval.num_steps=12", "eval.eta=0.3")
    assert evaluation_sampler(explicit, load(tiny_sd3)) == loops.SamplerSettings(12, 0.3, 4.5, "")


def test_ddim_families_evaluate_with_the_training_sampler(tiny_sd):
    """The shapes default and SD: the training sampler exactly, as before (golden numbers hold)."""
    from diffloop.loops import check_evaluation_sampler, evaluation_sampler

    default = Config()
    shapes = load_policy(default.model, default.lora, device=CPU)
    assert evaluation_sampler(default, shapes) == loops.SamplerSettings.from_config(default.sample)
    config = config_with(f"model.pretrained={tiny_sd}")
    sd = load(tiny_sd)
    assert evaluation_sampler(config, sd) == loops.SamplerSettings.from_config(config.sample)
    deterministic = evaluation_sampler(config_with("eval.eta=0"), sd)
    assert deterministic == loops.SamplerSettings(6, 0.0, 4.5, "")
    check_evaluation_sampler(sd, deterministic)  # DDIM at eta 0: deterministic DDIM, allowed


def test_deterministic_flow_pass_needs_no_window_and_computes_no_density(tiny_sd3, monkeypatch):
    """Noise level 0 at fewer steps than the training window needs: every step an ODE step, no
    window stored (W = 0), no log-density computed, and the images of the window-free ODE."""
    from diffloop.policies import flow

    windowed = load(tiny_sd3, sde_window=[0, 2, 3])  # fits 6 steps, not 3
    plain = load(tiny_sd3)
    gens = lambda: loops.make_generators(CPU, [3, 4, 5])

    def no_density(*args, **kwargs):
        raise AssertionError("a log-density was computed in a deterministic pass")

    monkeypatch.setattr(flow, "flow_sde_step_with_logprob", no_density)
    for policy in (windowed, plain):
        policy.train(False)
    traj = windowed.sample(PROMPTS, gens(), num_steps=3, eta=0.0, guidance_scale=3.0)
    ref = plain.sample(PROMPTS, gens(), num_steps=3, eta=0.0, guidance_scale=3.0)
    assert traj.log_probs.shape == (3, 0) and traj.latents.shape[1] == 1
    torch.testing.assert_close(traj.images, ref.images, atol=0, rtol=0)
    assert torch.isnan(ref.log_probs).all() and ref.log_probs.shape == (3, 2)
    # the checks: eta 0 at any steps; eta > 0 needs the window inside the evaluation's steps
    windowed.check_evaluation_sampling(3, 0.0)
    windowed.check_evaluation_sampling(40, 0.7)
    with pytest.raises(ConfigError, match=r"eval.num_steps=4 with eval.eta=0.7: sample.sde_window"):
        windowed.check_evaluation_sampling(4, 0.7)
    with pytest.raises(ValueError, match="does not fit 3 steps"):
        windowed.sample(PROMPTS, gens(), num_steps=3, eta=0.7, guidance_scale=3.0)


def test_eval_fields_are_validated():
    for override, message in [
        ("eval.eta=1.5", "eval.eta=1.5 must be in [0, 1]"),
        ("eval.eta=-0.1", "eval.eta=-0.1 must be in [0, 1]"),
        ("eval.num_steps=0", "eval.num_steps=0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, [override])
    window = ["sample.num_steps=6", "sample.sde_window=[0,2,3]", "sample.eta=0.7"]
    with pytest.raises(ConfigError, match=r"eval.num_steps=4 with eval.eta=0.7: sample.sde_window"):
        load_config(None, [*window, "eval.num_steps=4", "eval.eta=0.7"])
    ok = load_config(None, [*window, "eval.num_steps=4", "eval.eta=0", "model.pretrained=shapes"])
    assert (ok.eval.num_steps, ok.eval.eta) == (4, 0.0)
    assert (Config().eval.num_steps, Config().eval.eta) == (None, None)


@pytest.mark.parametrize("name", ["sd35_geneval_blip_vqa.yaml", "sd35_pickscore.yaml",
                                  "sd35_fast_cps.yaml", "flux_pickscore.yaml",
                                  "flux_compbench_color.yaml"])  # fmt: skip
def test_shipped_flow_configs_evaluate_as_flow_grpo(name):
    from diffloop.config import packaged_config

    config = load_config(packaged_config(name))
    steps = 28 if name.startswith("flux") else 40
    assert (config.eval.num_steps, config.eval.eta) == (steps, 0.0)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_flow_run_evaluation_and_diffloop_eval_agree_exactly(tiny_sd3, tmp_path, capsys, precision):
    """A tiny SD3 run evaluates with the ODE at 40 steps (header says so); ``diffloop eval RUN``
    with no sampler flags uses that sampler and reproduces the final evaluation's mean exactly,
    also for a bf16 run (its frozen weights reload in bf16, as it trained)."""
    from diffloop.cli import main as cli_main
    from diffloop.run_dir import read_metrics

    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_sd3, run, num_epochs=1, **{
        "sample.num_steps": 3, "sample.eta": 0.7, "eval.prompts": "ddpo/simple_animals",
        "eval.num_prompts": 2, "eval.samples_per_prompt": 2, "eval.seed": 7,
        "eval.batch_size": 3, "train.mixed_precision": precision,
    })  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    header = capsys.readouterr().out
    final = read_metrics(run / "metrics.jsonl")[-1]
    out = tmp_path / "eval"
    argv = ["eval", str(run), "--prompts", "ddpo/simple_animals", "--num-prompts", "2",
            "--images-per-prompt", "2", "--reward", "reward_fns:brightness", "--seed", "7",
            "--batch-size", "3", "--output", str(out), "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    rows = result["targets"][0]["per_prompt"]["reward_fns:brightness"]
    scores = torch.tensor([v for r in rows for v in r["scores"]], dtype=torch.float32)
    assert loops.eval_summary(scores)["eval_reward_mean"] == final["eval_reward_mean"]
    settings = result["settings"]
    assert (settings["num_steps"], settings["eta"], settings["guidance_scale"]) == (40, 0.0, 3.0)
    assert trainer.eval_sampler == loops.SamplerSettings(40, 0.0, 3.0, "")
    assert trainer.sampler == loops.SamplerSettings(3, 0.7, 3.0, "")  # training is unchanged
    assert (
        "held-out evaluation sampler:   40 steps (the model's convention), eta 0: deterministic "
        "(the model's convention), guidance 3 (sample.guidance_scale)" in header
    )
