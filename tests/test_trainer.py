"""End-to-end trainer tests on tiny random SD pipelines loaded from disk (the real loading path).

What every policy must satisfy (frozen weights, export, ratio 1, resume) is checked per policy in
test_policy_conformance.py; this file tests the trainer's own behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from diffloop.checkpoint import latest_checkpoint, list_complete_checkpoints
from diffloop.cli import main
from diffloop.config import load_config
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import (
    REQUIRED_METRICS,
    STATEFUL_PPO,
    Killed,
    comparable,
    killed_at_epoch,
    run,
    tiny_overrides,
)
from diffloop.trainer import Trainer


def test_run_directory_holds_everything(tiny_sd, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_sd, out)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert REQUIRED_METRICS <= set(rows[0])
    assert rows[1]["prompts_seen"] == 4 and rows[1]["reward_queries"] == 8
    assert load_config(out / "config.yaml").model.pretrained == str(tiny_sd)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(out).name == "epoch_000002"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "run_info.json").read_text())["seed"] == 0


@pytest.mark.parametrize("train_batch", [1, 2, 4])
def test_ratio_is_one_on_policy_at_any_minibatch_size(tiny_sd, tmp_path, train_batch):
    rows = run(
        tiny_sd,
        tmp_path / "run",
        num_epochs=1,
        **{"train.batch_size": train_batch, "train.gradient_accumulation_steps": 4 // train_batch},
    )
    # One optimizer step per epoch: every recomputed log-prob is on-policy.
    assert rows[0]["optimizer_steps"] == 1
    assert rows[0]["onpolicy_logprob_err"] < 1e-5


def test_kill_and_resume_equals_uninterrupted(tiny_sd, tmp_path):
    extra = {"num_epochs": 4, **STATEFUL_PPO}
    full = run(tiny_sd, tmp_path / "full", **extra)

    out = tmp_path / "killed"
    with killed_at_epoch(2):  # dies mid-epoch 2, after epochs 0-1 were logged and checkpointed
        run(tiny_sd, out, **extra)
    run(tiny_sd, out, resume=True, **extra)
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(full)


def test_crash_while_checkpointing_resumes_from_previous(tiny_sd, tmp_path, monkeypatch):
    import diffloop.checkpoint as ckpt

    extra = {"num_epochs": 3}
    full = run(tiny_sd, tmp_path / "full", **extra)
    out = tmp_path / "killed"
    original = ckpt.write_main

    def write_half_then_die(tmp, **kwargs):
        if kwargs["state"].epochs_completed == 2:
            (tmp / "trainable.safetensors").write_bytes(b"half")
            raise Killed
        return original(tmp, **kwargs)

    monkeypatch.setattr(ckpt, "write_main", write_half_then_die)
    with pytest.raises(Killed):
        run(tiny_sd, out, **extra)
    # Epoch 1 (index) was logged but its checkpoint never completed; resume must redo it.
    assert [p.name for p in list_complete_checkpoints(out)] == ["epoch_000001"]
    monkeypatch.setattr(ckpt, "write_main", original)
    run(tiny_sd, out, resume=True, **extra)
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(full)


def test_nan_rewards_are_excluded_and_counted(tiny_sd, tmp_path):
    rows = run(
        tiny_sd,
        tmp_path / "run",
        num_epochs=1,
        **{
            "reward.name": "reward_fns:nan_on_odd",
            "sample.samples_per_prompt": 4,
            "sample.batch_size": 8,
            "train.batch_size": 4,
        },
    )
    assert rows[0]["reward_invalid"] == 4
    assert rows[0]["reward_mean"] == rows[0]["reward_mean"]  # not NaN: invalid ones left out


def test_failing_reward_keeps_last_checkpoint(tiny_sd, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", *tiny_overrides(tiny_sd, out, **{"reward.name": "reward_fns:fails_at_epoch_1"})]
    )
    assert code == 2
    assert "reward server unreachable" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "epoch_000001"


def test_asynchronous_rewards_give_the_same_run(tiny_sd, tmp_path):
    extra = {"sample.batch_size": 2}
    sync = run(tiny_sd, tmp_path / "sync", **extra)
    overlapped = run(tiny_sd, tmp_path / "async", **extra, **{"reward.asynchronous": True})
    assert comparable(overlapped) == comparable(sync)


def test_composite_reward_components_are_logged(tiny_sd, tmp_path):
    from diffloop.config import load_config

    overrides = tiny_overrides(tiny_sd, tmp_path / "run", num_epochs=1)
    overrides = [o for o in overrides if not o.startswith("reward.name")]
    overrides.append(
        "reward=[{name: 'reward_fns:brightness', weight: 2.0}, "
        "{name: jpeg_compressibility, weight: 0.5}]"
    )
    rows = Trainer(load_config(None, overrides)).train()
    r = rows[0]
    bright_key, jpeg_key = "reward_reward_fns:brightness_mean", "reward_jpeg_compressibility_mean"
    assert {bright_key, jpeg_key} <= set(r)
    assert r["reward_mean"] == pytest.approx(2.0 * r[bright_key] + 0.5 * r[jpeg_key], rel=1e-5)


def test_kl_to_base_is_zero_at_start_and_penalty_pulls_back(tiny_sd, tmp_path):
    # A fresh adapter (lora_B = 0) adds exactly zero: the policy IS the base model until its first
    # update. With one optimizer step per epoch (accumulation over both minibatches), every KL of
    # epoch 0 is computed before that step: exactly 0; epoch 1's, after it: positive.
    extra = {
        "train.log_kl_to_base": True,
        "train.learning_rate": 0.05,
        "train.gradient_accumulation_steps": 2,
    }
    rows = run(tiny_sd, tmp_path / "a", num_epochs=2, **extra)
    assert rows[0]["optimizer_steps"] == 1
    assert rows[0]["kl_to_base"] == 0.0 and rows[1]["kl_to_base"] > 0
    # Two updates per epoch: the penalty acts from epoch 0's second minibatch on.
    extra["train.gradient_accumulation_steps"] = 1
    free = run(tiny_sd, tmp_path / "b", num_epochs=2, **extra)
    penalised = run(tiny_sd, tmp_path / "c", num_epochs=2, **extra, **{"train.kl_coef": 1e6})
    assert penalised[1]["kl_to_base"] < free[1]["kl_to_base"]


def test_existing_run_is_not_clobbered(tiny_sd, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_sd, out, num_epochs=1)
    assert main(["train", *tiny_overrides(tiny_sd, out, num_epochs=1)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "epoch_000001"
    run(tiny_sd, out, num_epochs=1, overwrite=True)
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0]


def test_lora_dropout_is_refused_for_ratio_algorithms(tiny_sd, tmp_path):
    from diffloop.config import ConfigError

    with pytest.raises(ConfigError, match=r"^lora\.dropout=0\.1: 'loop' reuses samples") as e:
        load_config(None, tiny_overrides(tiny_sd, tmp_path / "a", **{"lora.dropout": 0.1}))
    assert len(str(e.value).splitlines()) == 1
    # One update per batch (no ratio): dropout is allowed.
    load_config(
        None,
        tiny_overrides(
            tiny_sd, tmp_path / "b", **{"lora.dropout": 0.1, "train.algorithm": "reinforce"}
        ),
    )


def test_evaluation_samples_in_eval_mode(tiny_sd, tmp_path):
    """With LoRA dropout active in train mode, two evaluations still see the same network."""
    from diffloop.loops import make_generators

    extra = {
        "lora.dropout": 0.5,
        "train.algorithm": "reinforce",
        "eval.prompts": "shapes/val_pair",
        "eval.num_prompts": 2,
        "eval.samples_per_prompt": 1,
    }
    trainer = Trainer(load_config(None, tiny_overrides(tiny_sd, tmp_path / "run", **extra)))
    with (
        torch.no_grad()
    ):  # lora_B starts at 0, which would hide dropout: give the adapter an update
        for name, p in trainer.policy.named_trainable_parameters().items():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    first, second = trainer.evaluate("a"), trainer.evaluate("b")
    assert first["eval_reward_mean"] == second["eval_reward_mean"]
    # The control: sampled in train mode, dropout makes the same noise give different images.
    trainer.policy.train(True)
    kw = {"num_steps": 2, "eta": 1.0, "guidance_scale": 3.0, "negative_prompt": ""}
    a = trainer.policy.sample(["a cat"], make_generators(torch.device("cpu"), [0]), **kw).images
    b = trainer.policy.sample(["a cat"], make_generators(torch.device("cpu"), [0]), **kw).images
    assert not torch.equal(a, b)


def test_eval_reward_scores_evaluation_only(tiny_sd, tmp_path):
    # eval.reward: training still uses reward.name (brightness, spread over samples); every held-out
    # evaluation, and the model card, uses the evaluation's own reward.
    rows = run(tiny_sd, tmp_path / "run", **{
        "eval.prompts": "shapes/val_pair", "eval.num_prompts": 2, "eval.samples_per_prompt": 1,
        "eval.every_n_epochs": 1, "eval.reward": "reward_fns:constant_half",
    })  # fmt: skip
    evals = [r["eval_reward_mean"] for r in rows if "eval_reward_mean" in r]
    assert len(evals) >= 2 and all(v == 0.5 for v in evals)  # base and after training
    assert all(r["reward_mean"] != 0.5 for r in rows if "reward_mean" in r)


def test_eval_reward_kwargs_need_eval_reward(tiny_sd, tmp_path):
    from diffloop.config import ConfigError

    with pytest.raises(ConfigError, match="eval.reward_kwargs"):
        load_config(
            None, tiny_overrides(tiny_sd, tmp_path / "r", **{"eval.reward_kwargs": "{a: 1}"})
        )
