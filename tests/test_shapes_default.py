"""The embedded default (`diffloop train` with no config) on the shipped shapes model, shortened."""

from __future__ import annotations

import pytest

from diffloop.checkpoint import latest_checkpoint
from diffloop.cli import main
from diffloop.config import load_config
from diffloop.run_dir import TIME_KEYS, read_metrics
from diffloop.testing.runs import REQUIRED_METRICS, killed_at_epoch
from diffloop.trainer import Trainer

SHORT = [
    "sample.num_steps=3",
    "sample.prompts_per_epoch=1",  # x K = 8 samples
    "sample.batch_size=8",
    "train.batch_size=4",
    "eval.num_prompts=2",
    "eval.samples_per_prompt=2",
    "logging.progress_bars=false",
]


def test_default_command_runs_loop_k8_on_shapes_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "num_epochs=2", f"output_dir={out}", *SHORT]) == 0
    config = load_config(out / "config.yaml")
    assert (config.train.algorithm, config.sample.samples_per_prompt, config.model.pretrained) == (
        "loop",
        8,
        "shapes",
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [-1, 0, 1]
    assert "eval_reward_mean" in rows[0] and "eval_reward_mean" in rows[-1]
    assert REQUIRED_METRICS <= set(rows[1])
    for name in ("base.png", "epoch_0002.png", "before_after.png"):
        assert (out / "eval" / name).is_file(), name
    assert latest_checkpoint(out).name == "epoch_000002"
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    printed = capsys.readouterr().out
    summary = [
        line
        for line in printed.splitlines()
        if line.startswith("binding reward on held-out prompts: base")
    ]
    assert len(summary) == 1 and "-> trained" in summary[0]
    assert "samples per epoch:             8" in printed


@pytest.mark.parametrize("train_batch", [1, 8])
def test_shapes_ratio_is_one_on_policy(tmp_path, train_batch):
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "num_epochs=1",
        "eval.prompts=null",
        *SHORT,
        f"train.batch_size={train_batch}",
        f"train.gradient_accumulation_steps={8 // train_batch}",
    ]
    rows = Trainer(load_config(None, overrides)).train()
    assert rows[0]["optimizer_steps"] == 1
    assert rows[0]["onpolicy_logprob_err"] < 1e-5


def test_shapes_kill_and_resume_equals_uninterrupted(tmp_path):
    def overrides(out):
        return [f"output_dir={out}", "num_epochs=3", "eval.prompts=null", *SHORT]

    full = Trainer(load_config(None, overrides(tmp_path / "full"))).train()
    with killed_at_epoch(2):
        Trainer(load_config(None, overrides(tmp_path / "killed"))).train()
    Trainer(load_config(None, [*overrides(tmp_path / "killed"), "resume=true"])).train()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]
    assert strip(read_metrics(tmp_path / "killed" / "metrics.jsonl")) == strip(full)
