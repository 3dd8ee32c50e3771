"""The EMA of the trainable weights (diffloop.ema, train.ema_decay).

Hand-computed updates; the trainer's EMA equals the recursion over the weights after each optimizer
step; a killed and resumed run with EMA on equals an uninterrupted one (metrics, EMA, export);
evaluation and export use the EMA weights and leave the live weights as they were.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import Killed, comparable, tiny_overrides

from diffloop.checkpoint import EMA_WEIGHTS, latest_checkpoint
from diffloop.config import ConfigError, load_config
from diffloop.ema import EMA, maybe_applied
from diffloop.export import LORA_WEIGHT_NAME
from diffloop.run_dir import read_metrics
from diffloop.trainer import Trainer

DECAY = 0.5  # far from 1, so a few steps move the EMA visibly


def overrides(model, out, **extra) -> list[str]:
    return tiny_overrides(model, out, **{
        "sample.num_steps": 3, "train.ema_decay": DECAY, "train.learning_rate": 0.05,
        "eval.prompts": "shapes/val_pair", "eval.num_prompts": 2, "eval.samples_per_prompt": 1,
        "eval.every_n_epochs": 1, **extra,
    })  # fmt: skip


def trainer(model, out, **extra) -> Trainer:
    return Trainer(load_config(None, overrides(model, out, **extra)))


# ----------------------------------------------------------------------------------- the module


def test_update_is_the_hand_computed_average():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA({"w": p}, decay=0.5)
    assert torch.equal(ema.shadow["w"], torch.tensor([1.0, 2.0]))  # shadow_0 = theta_0
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 4.0]))
    ema.update()  # 0.5 * [1, 2] + 0.5 * [3, 4]
    assert torch.equal(ema.shadow["w"], torch.tensor([2.0, 3.0]))
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 0.0]))
    ema.update()  # 0.5 * [2, 3] + 0.5 * [5, 0]
    assert torch.equal(ema.shadow["w"], torch.tensor([3.5, 1.5]))
    assert torch.equal(p, torch.tensor([5.0, 0.0]))  # the live weights are never touched


def test_decay_point_nine_as_flow_grpo():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA({"w": p}, decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(3):
        ema.update()
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1 - 0.9**3]))  # 0.271


def test_applied_swaps_in_the_average_and_restores_exactly():
    p = torch.nn.Parameter(torch.tensor([0.1, 0.7]))
    ema = EMA({"w": p}, decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0 / 3, 2.0 / 7]))
    live = p.detach().clone()
    ema.update()
    with ema.applied():
        assert torch.equal(p, ema.shadow["w"])
    assert torch.equal(p, live)  # bit-exact, not p - (shadow - live)
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("restored on errors too")
    assert torch.equal(p, live)
    with maybe_applied(None):
        assert torch.equal(p, live)


def test_state_dict_round_trip_and_mismatch():
    p = torch.nn.Parameter(torch.ones(2))
    ema = EMA({"w": p}, decay=0.9)
    other = EMA({"w": torch.nn.Parameter(torch.zeros(2))}, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], torch.ones(2))
    with pytest.raises(ValueError, match="1 missing, 1 unexpected"):
        other.load_state_dict({"v": torch.ones(2)})


@pytest.mark.parametrize("decay", ["0.0", "1.0", "1.5", "-0.1"])
def test_decay_out_of_range_is_refused(decay, tmp_path):
    with pytest.raises(ConfigError, match=f"train.ema_decay={decay} must be in \\(0, 1\\)"):
        load_config(None, [f"output_dir={tmp_path}", f"train.ema_decay={decay}"])


# ----------------------------------------------------------------------------------- the trainer


def test_trainer_ema_is_the_recursion_over_each_steps_weights(tiny_sd, tmp_path, monkeypatch):
    t = trainer(tiny_sd, tmp_path / "run", **{"eval.prompts": None})
    expected = t.policy.trainable_state_dict()
    original = Trainer._optimizer_step

    def step_and_record(self):
        out = original(self)
        nonlocal expected
        now = self.policy.trainable_state_dict()
        expected = {k: DECAY * expected[k] + (1 - DECAY) * now[k] for k in now}
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step_and_record)
    t.train()
    assert t.optimizer_steps >= 2
    got = t.ema.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-7)
    live = t.policy.trainable_state_dict()
    assert any((live[k] - got[k]).abs().max() > 1e-4 for k in live), "EMA equals the live weights"
    saved = load_file(str(latest_checkpoint(tmp_path / "run") / EMA_WEIGHTS))
    assert all(torch.equal(saved[k], got[k]) for k in got)


def test_evaluation_uses_the_ema_weights_and_keeps_the_live_ones(tiny_sd, tmp_path):
    t = trainer(tiny_sd, tmp_path / "run")
    with torch.no_grad():  # an EMA far from the live weights
        for s in t.ema.shadow.values():
            s.add_(torch.randn(s.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    live = t.policy.trainable_state_dict()
    with_ema = t.evaluate("a")["eval_reward_mean"]
    assert all(torch.equal(v, live[k]) for k, v in t.policy.trainable_state_dict().items())
    shadow, t.ema = t.ema, None
    without = t.evaluate("b")["eval_reward_mean"]
    t.policy.load_trainable_state_dict(shadow.state_dict())
    live_set_to_ema = t.evaluate("c")["eval_reward_mean"]
    assert with_ema == live_set_to_ema and with_ema != without


def test_export_is_the_ema(tiny_sd, tmp_path):
    t = trainer(tiny_sd, tmp_path / "run", num_epochs=1, **{"eval.prompts": None})
    t.train()
    exported = load_file(str(tmp_path / "run" / "lora" / LORA_WEIGHT_NAME))
    shadow, live = t.ema.state_dict(), t.policy.trainable_state_dict()

    def matches(values):  # every exported tensor is one of these, by value
        return all(
            any(v.shape == w.shape and torch.equal(v, w) for w in values) for v in exported.values()
        )

    assert matches(list(shadow.values())) and not matches(list(live.values()))


def test_kill_and_resume_equals_uninterrupted_with_ema(tiny_sd, tmp_path, monkeypatch):
    extra = {"num_epochs": 3}
    full_trainer = trainer(tiny_sd, tmp_path / "full", **extra)
    full = full_trainer.train()
    original = Trainer.run_epoch

    def die_at_epoch_2(self, epoch):
        if epoch == 2:
            raise Killed
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", die_at_epoch_2)
    with pytest.raises(Killed):
        trainer(tiny_sd, tmp_path / "killed", **extra).train()
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = trainer(tiny_sd, tmp_path / "killed", resume=True, **extra)
    resumed.train()
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert comparable(rows) == comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert [r["epoch"] for r in rows if "eval_reward_mean" in r] == [-1, 0, 1, 2]
    a, b = full_trainer.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(full) == 3


def test_resume_from_a_checkpoint_without_ema_warns_and_starts_from_the_loaded_weights(
    tiny_sd, tmp_path, caplog
):
    out = tmp_path / "run"
    Trainer(
        load_config(None, overrides(tiny_sd, out, num_epochs=1, **{"train.ema_decay": None}))
    ).train()
    (latest_checkpoint(out) / EMA_WEIGHTS).unlink(missing_ok=True)
    args = overrides(tiny_sd, out, num_epochs=2, resume=True, resume_allow="[train.ema_decay]")
    t = Trainer(load_config(None, args))
    assert "holds no EMA: it restarts from the loaded weights" in caplog.text
    live = t.policy.trainable_state_dict()
    assert all(torch.equal(v, live[k]) for k, v in t.ema.state_dict().items())
