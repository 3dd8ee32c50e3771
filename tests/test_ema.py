"""The EMA of the trainable weights (diffloop.ema, train.ema_decay).

Hand-computed updates; the trainer's EMA equals the recursion over the weights after each optimizer
step; a killed and resumed run with EMA on equals an uninterrupted one (metrics, EMA, export);
evaluation and export use the EMA weights and leave the live weights as they were.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffloop.checkpoint import EMA_WEIGHTS, latest_checkpoint
from diffloop.config import ConfigError, load_config
from diffloop.ema import EMA, ema_decay_at, ema_updates_at, maybe_applied
from diffloop.export import LORA_WEIGHT_NAME
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import comparable, killed_at_epoch, tiny_overrides
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


def test_warmup_decay_by_hand():
    """d_n = min((1 + n) / (10 + n), d): 2/11 after step 1, 3/12 after step 2, then d."""
    assert ema_decay_at(1, 0.9, warmup=True) == 2 / 11
    assert ema_decay_at(7, 0.9, warmup=True) == 8 / 17
    assert ema_decay_at(80, 0.9, warmup=True) == 0.9 and ema_decay_at(79, 0.9, True) == 80 / 89
    assert ema_decay_at(1, 0.9, warmup=False) == 0.9
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA({"w": p}, decay=0.3, warmup=True)
    values = [1.0, 2.0, 4.0]  # theta after steps 1, 2, 3; d_1 = 2/11, d_2 = 3/12, d_3 = 0.3 < 4/13
    for n, theta in enumerate(values, start=1):
        with torch.no_grad():
            p.fill_(theta)
        assert ema.update(n)
    s1 = 2 / 11 * 0.0 + 9 / 11 * 1.0
    s2 = 0.25 * s1 + 0.75 * 2.0
    s3 = 0.3 * s2 + 0.7 * 4.0
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([s3]), rtol=1e-7, atol=0)


def test_update_interval_by_hand():
    """Interval 3: only steps n with (n + 1) % 3 == 0 (2, 5, 8, ...) blend, as Flow-GRPO's wrapper;
    with the warm-up, d_2 = 3/12 and d_5 = 6/15."""
    assert [n for n in range(1, 17) if ema_updates_at(n, 8)] == [7, 15]
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA({"w": p}, decay=0.9, warmup=True, update_interval=3)
    updated = []
    for n in range(1, 7):  # theta_n = n after step n
        with torch.no_grad():
            p.fill_(float(n))
        updated.append(ema.update(n))
    assert updated == [False, True, False, False, True, False]
    s2 = 0.25 * 0.0 + 0.75 * 2.0  # d_2 = 3/12
    s5 = 0.4 * s2 + 0.6 * 5.0  # d_5 = 6/15
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([s5]), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="needs the step number"):
        ema.update()


def test_matches_flow_grpo_wrapper_transcribed():
    """flow_grpo/ema.py EMAModuleWrapper(decay=0.9, update_step_interval=8).step(params, n), called
    once after each optimizer step n (one micro-batch per step): the same shadow."""
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    ema = EMA({"w": p}, decay=0.9, warmup=True, update_interval=8)
    theirs = p.detach().clone()
    g = torch.Generator().manual_seed(0)
    for n in range(1, 120):
        with torch.no_grad():
            p.add_(torch.randn(2, generator=g))
        ema.update(n)
        one_minus_decay = 1 - min((1 + n) / (10 + n), 0.9)  # get_current_decay
        if (n + 1) % 8 == 0:
            theirs.add_(one_minus_decay * (p.detach() - theirs))
    torch.testing.assert_close(ema.shadow["w"], theirs, rtol=1e-6, atol=1e-6)


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


def test_kill_and_resume_equals_uninterrupted_with_ema(tiny_sd, tmp_path):
    extra = {"num_epochs": 3}
    full_trainer = trainer(tiny_sd, tmp_path / "full", **extra)
    full = full_trainer.train()
    with killed_at_epoch(2):
        trainer(tiny_sd, tmp_path / "killed", **extra).train()
    resumed = trainer(tiny_sd, tmp_path / "killed", resume=True, **extra)
    resumed.train()
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert comparable(rows) == comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert [r["epoch"] for r in rows if "eval_reward_mean" in r] == [-1, 0, 1, 2]
    a, b = full_trainer.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(full) == 3


# updates after optimizer steps 2, 5, 8, ...
WARM = {"train.ema_warmup": True, "train.ema_update_interval": 3}


def test_trainer_ema_with_warmup_and_interval_is_the_hand_recursion(tiny_sd, tmp_path, monkeypatch):
    """The trainer passes its optimizer_steps: n-th step blends with d_n only when (n + 1) % 3 ==
    0."""
    t = trainer(tiny_sd, tmp_path / "run", num_epochs=3, **{"eval.prompts": None, **WARM})
    expected = t.policy.trainable_state_dict()
    original = Trainer._optimizer_step

    def step_and_record(self):
        out = original(self)
        nonlocal expected
        n = self.optimizer_steps
        if (n + 1) % 3 == 0:
            d = min((1 + n) / (10 + n), DECAY)
            now = self.policy.trainable_state_dict()
            expected = {k: d * expected[k] + (1 - d) * now[k] for k in now}
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step_and_record)
    t.train()
    assert t.optimizer_steps == 6  # 2 per epoch: updates after steps 2 and 5
    got = t.ema.state_dict()
    for k in expected:  # fp32 lerp vs d a + (1 - d) b: one rounding apart
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


def test_kill_and_resume_equals_uninterrupted_with_warmup_and_interval(tiny_sd, tmp_path):
    """Killed after step 4 (epoch 2 not run): the next update, after step 5, needs the restored step
    counter (both for (n + 1) % 3 and for d_5 = 6/15)."""
    extra = {"num_epochs": 3, "eval.prompts": None, **WARM}
    full_trainer = trainer(tiny_sd, tmp_path / "full", **extra)
    full_trainer.train()
    with killed_at_epoch(2):
        trainer(tiny_sd, tmp_path / "killed", **extra).train()
    resumed = trainer(tiny_sd, tmp_path / "killed", resume=True, **extra)
    assert resumed.optimizer_steps == 4
    resumed.train()
    assert resumed.optimizer_steps == full_trainer.optimizer_steps == 6
    a, b = full_trainer.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert comparable(rows) == comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))


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
