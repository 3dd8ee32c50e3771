"""The non-finite guard: a NaN/inf gradient is skipped and counted, never applied; N in a row
stop."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from diffloop import checkpoint
from diffloop.cli import main
from diffloop.guards import NonFiniteError, NonFiniteGuard, onpolicy_error_ok
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import comparable, run, tiny_overrides
from diffloop.trainer import Trainer

NAN = torch.tensor(float("nan"))


def test_finite_steps_pass_and_nonfinite_ones_are_skipped_and_counted(caplog):
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.should_step(torch.tensor(2.5))
    with caplog.at_level(logging.WARNING):
        assert not guard.should_step(NAN)
        assert not guard.should_step(torch.tensor(float("inf")))
    assert "optimizer step skipped" in caplog.text
    assert guard.should_step(torch.tensor(0.0))  # a finite step resets the run of skips
    assert guard.consecutive == 0
    assert guard.take_epoch_count() == 2 and guard.take_epoch_count() == 0


def test_max_consecutive_skips_raise_one_line_naming_the_field():
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.should_step(NAN)
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row") as info:
        guard.should_step(NAN)
    assert "train.max_consecutive_nonfinite" in str(info.value) and "\n" not in str(info.value)


def test_fp16_overflow_counts_towards_the_limit_only_once_the_scale_is_down_to_1():
    guard = NonFiniteGuard(max_consecutive=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert not guard.should_step(NAN, scaler)  # the scaler lowers its scale: no stop
    assert guard.consecutive == 0 and guard.take_epoch_count() == 1
    with pytest.raises(NonFiniteError):
        guard.should_step(NAN, torch.amp.GradScaler("cpu", init_scale=1.0))


def test_nan_onpolicy_error_is_a_failure():
    assert onpolicy_error_ok(1e-6, 1e-4)
    assert not onpolicy_error_ok(1e-3, 1e-4)
    assert not onpolicy_error_ok(
        math.nan, 1e-4
    )  # `nan > clip_range` is False: was never warned about


# ----------------------------------------------------------------------------- in the trainer


def inject_nan_gradients(
    monkeypatch, on_calls: set[int] | None = None, from_call: int | None = None
) -> list[dict]:
    """Make optimizer step number c (1-based) see a NaN gradient for c in ``on_calls`` or c >=
    ``from_call``.

    Returns a log of {"call", "injected", "unchanged"} per step (unchanged: params equal
    before/after).
    """
    original = Trainer._optimizer_step
    log: list[dict] = []

    def step(self):
        call = len(log) + 1
        inject = (on_calls is not None and call in on_calls) or (
            from_call is not None and call >= from_call
        )
        if inject:
            self.params[0].grad.fill_(float("nan"))
        before = [p.detach().clone() for p in self.params]
        out = original(self)
        log.append(
            {
                "call": call,
                "injected": inject,
                "unchanged": all(torch.equal(a, p) for a, p in zip(before, self.params)),
            }
        )
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    return log


def test_nan_gradient_step_is_skipped_counted_and_leaves_the_model_alone(
    tiny_sd, tmp_path, monkeypatch
):
    log = inject_nan_gradients(monkeypatch, on_calls={3})  # the first of epoch 1's two steps
    config_rows = run(tiny_sd, tmp_path / "run", num_epochs=2)
    assert [r["nonfinite_steps_skipped"] for r in config_rows] == [0, 1]
    assert [r["optimizer_steps"] for r in config_rows] == [2, 3]  # the skipped step is no update
    skipped = [e for e in log if e["injected"]]
    assert len(skipped) == 1 and skipped[0]["unchanged"], "a NaN gradient changed the parameters"
    assert all(not e["unchanged"] for e in log if not e["injected"])
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "run"), rank=0)
    assert state["lr_scheduler"]["last_epoch"] == 3  # the LR schedule follows applied updates
    assert all(bool(torch.isfinite(t).all()) for t in state["trainable"].values())


def test_consecutive_nonfinite_steps_stop_the_run_and_resume_continues(
    tiny_sd, tmp_path, monkeypatch, capsys
):
    assert main(["train", *tiny_overrides(tiny_sd, tmp_path / "full", num_epochs=2)]) == 0
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    out = tmp_path / "run"
    args = tiny_overrides(tiny_sd, out, num_epochs=2, **{"train.max_consecutive_nonfinite": 2})
    inject_nan_gradients(monkeypatch, from_call=3)  # every step from epoch 1 on
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("diffloop: error: 2 optimizer steps in a row had non-finite")
    )
    assert "Traceback" not in err
    # The checkpoint written before the failure survives, verified, and the run resumes from it.
    assert checkpoint.latest_checkpoint(out).name == "epoch_000001"
    checkpoint.load(checkpoint.latest_checkpoint(out), rank=0)
    monkeypatch.undo()
    assert main(["train", *args, "resume=true"]) == 0
    assert checkpoint.latest_checkpoint(out).name == "epoch_000002"
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(full)


def test_nan_onpolicy_error_is_warned_about(tiny_sd, tmp_path, monkeypatch, caplog):
    from diffloop.config import load_config

    trainer = Trainer(load_config(None, tiny_overrides(tiny_sd, tmp_path / "run", num_epochs=1)))
    monkeypatch.setattr(
        Trainer, "optimise", lambda self, traj, adv, epoch: {"onpolicy_logprob_err": math.nan}
    )
    with caplog.at_level(logging.WARNING, logger="diffloop.trainer"):
        trainer.run_epoch(0)
    assert "on-policy |log p_theta - log p_old| = nan exceeds train.clip_range" in caplog.text


def test_max_consecutive_nonfinite_is_validated(tmp_path: Path):
    from diffloop.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.max_consecutive_nonfinite=0 must be >= 1"):
        load_config(None, ["train.max_consecutive_nonfinite=0"])
