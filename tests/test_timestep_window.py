"""train.timestep_window: training draws its steps only from the window, the arithmetic follows it,
and a window past the steps a model stores is refused before any sampling."""

from __future__ import annotations

import pytest
import torch

from diffloop import loops
from diffloop.config import ConfigError, load_config, num_trained_timesteps, trained_step_range
from diffloop.testing.runs import tiny_overrides
from diffloop.trainer import Trainer


def test_full_window_is_ddpos_rule():
    # Every step as the window draws exactly what DDPO's randperm(T)[:S] draws: old runs unchanged.
    a = loops.choose_timesteps(6, range(10), 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    b = torch.stack([torch.randperm(10, generator=g) for _ in range(6)])[:, :5]
    assert torch.equal(a, b)


@pytest.mark.parametrize("window,trained", [(range(5), 5), (range(2, 6), 3), (range(9, 10), 1)])
def test_steps_come_from_the_window_without_repeats(window, trained):
    steps = loops.choose_timesteps(64, window, trained, torch.Generator().manual_seed(0))
    assert steps.shape == (64, trained)
    assert steps.min() >= window.start and steps.max() < window.stop
    assert all(len(set(row.tolist())) == trained for row in steps)  # a subset, no step twice
    if trained == len(window):
        assert all(sorted(row.tolist()) == list(window) for row in steps)


def test_more_steps_than_the_window_is_an_error():
    with pytest.raises(ValueError, match="3-step window"):
        loops.choose_timesteps(2, range(3), 4, torch.Generator())


def test_fraction_applies_to_the_window():
    assert num_trained_timesteps(len(trained_step_range([0, 5], 10)), 1.0) == 5
    assert num_trained_timesteps(len(trained_step_range([0, 5], 10)), 0.5) == 2
    assert num_trained_timesteps(len(trained_step_range(None, 10)), 0.5) == 5


def test_trainer_trains_only_window_steps(tiny_sd, tmp_path, monkeypatch):
    seen: list[int] = []
    real = loops.step_loss

    def recording(policy, batch, adv, step, *args, **kwargs):
        seen.extend(step.tolist())
        return real(policy, batch, adv, step, *args, **kwargs)

    monkeypatch.setattr(loops, "step_loss", recording)
    config = load_config(None, tiny_overrides(
        tiny_sd, tmp_path / "run", num_epochs=2,
        **{"train.timestep_window": "[1,3]", "train.timestep_fraction": 1.0},
    ))  # fmt: skip
    rows = Trainer(config).train()
    assert set(seen) == {1, 2}  # steps 0 and 3 of the 4 never trained
    assert rows[-1]["onpolicy_logprob_err"] == 0.0


def test_window_past_a_flow_models_stored_steps_is_refused(tiny_sd3, tmp_path):
    # A flow-matching model stores num_steps - 1 steps (its last is an ODE step); validate only
    # knows num_steps, so the trainer checks against the loaded policy, before sampling.
    config = load_config(None, tiny_overrides(
        tiny_sd3, tmp_path / "run", num_epochs=1,
        **{"sample.num_steps": 3, "train.timestep_window": "[0,3]"},
    ))  # fmt: skip
    with pytest.raises(ConfigError, match="stores 2 steps"):
        Trainer(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_near_clean_step_dominates_the_score_weights():
    # docs/method.md's table (scripts/step_weights.py): at 10 steps, eta 1, the shapes model's
    # schedule puts step 8 at >10x the median weight, and the default window [0, 5) excludes it.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "step_weights.py"
    spec = importlib.util.spec_from_file_location("step_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    w = module.step_weights({"beta_schedule": "linear"}, 10)
    assert int(w.argmax()) == 8 and float(w[8]) == pytest.approx(23.29, abs=0.01)
    assert float(w[8]) > 10 * float(w.median()) and int(w[:5].argmax()) == 0
