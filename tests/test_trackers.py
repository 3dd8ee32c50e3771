"""logging.report_to through accelerate's trackers: metrics.jsonl first, failures counted, the run's
own W&B id, the older tensorboard/wandb booleans, and accelerate's mixed-precision setting."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest

from diffloop.cli import main
from diffloop.config import TRACKERS, ConfigError, load_config
from diffloop.distributed import mixed_precision_conflict, warn_on_mixed_precision_conflict
from diffloop.run_dir import RunDirectory, read_metrics, remove_run
from diffloop.tracking import Trackers, check_trackers, init_arguments, resolve_report_to

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def config_for(out, *overrides):
    return load_config(None, [f"output_dir={out}", *overrides])


def test_tracker_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ["tensorboard"]),
        (["logging.report_to=none"], []),
        (["logging.report_to=[wandb,tensorboard]"], ["wandb", "tensorboard"]),
        (["logging.report_to=wandb,mlflow"], ["wandb", "mlflow"]),  # comma-separated on the CLI
        (["logging.report_to=all"], ["tensorboard"]),  # what is installed (here: tensorboard)
        # the older booleans: true adds, false removes, null leaves report_to alone
        (["logging.tensorboard=false"], []),
        (["logging.wandb=true"], ["tensorboard", "wandb"]),
        (["logging.tensorboard=false", "logging.wandb=false"], []),
        (["logging.report_to=none", "logging.tensorboard=true"], ["tensorboard"]),
    ],
)
def test_report_to_and_its_aliases(tmp_path, overrides, expected):
    assert (
        resolve_report_to(config_for(tmp_path, *overrides).logging, available=["tensorboard"])
        == expected
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "logging.report_to=tensorbord",
            "unknown tracker 'tensorbord'. Did you mean 'tensorboard'",
        ),
        ("logging.report_to=[none,wandb]", "lists 'none' with trackers"),
        ("logging.tracker_kwargs.wandbb.mode=offline", "logging.tracker_kwargs.wandbb must be"),
    ],
)
def test_bad_report_to_is_one_line_naming_the_field(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config_for(tmp_path, override)


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed")
def test_wandb_without_wandb_is_one_clear_error_at_check_config(tmp_path, capsys):
    with pytest.raises(
        ConfigError,
        match=r"asks for wandb but the wandb package is not installed: pip install "
        r"'diffloop\[wandb\]'",
    ):
        check_trackers(config_for(tmp_path, "logging.report_to=wandb").logging)
    assert main(["check-config", f"output_dir={tmp_path / 'run'}", "logging.wandb=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logging.report_to asks for wandb" in err[0]
    check_trackers(
        config_for(tmp_path, "logging.report_to=all").logging
    )  # all: the installed ones, no error


def test_run_id_is_made_once_per_run_and_differs_between_runs(tmp_path):
    first = RunDirectory(
        config_for(tmp_path / "a" / "run", "logging.report_to=none"), is_main=True, start_epoch=0
    )
    resumed = RunDirectory(config_for(tmp_path / "a" / "run", "logging.report_to=none",
                                      "resume=true"),
                           is_main=True, start_epoch=1)  # fmt: skip
    same_name = RunDirectory(
        config_for(tmp_path / "b" / "run", "logging.report_to=none"), is_main=True, start_epoch=0
    )
    assert resumed.run_id == first.run_id  # a resume continues its own W&B run
    assert same_name.run_id != first.run_id  # a directory of the same name is another run
    assert (tmp_path / "a" / "run" / "run_id").read_text().strip() == first.run_id
    remove_run(tmp_path / "a" / "run")  # overwrite=true: a new run, a new id
    again = RunDirectory(
        config_for(tmp_path / "a" / "run", "logging.report_to=none"), is_main=True, start_epoch=0
    )
    assert again.run_id != first.run_id


def test_wandb_arguments_carry_the_run_id_entity_name_tags_and_tracker_kwargs(tmp_path):
    out = tmp_path / "runs" / "exp1"
    config = config_for(out, "logging.wandb_project=proj", "logging.wandb_entity=team",
                        "logging.wandb_tags=[a,b]",
                        "logging.tracker_kwargs.wandb.mode=offline")  # fmt: skip
    args, kwargs = init_arguments("wandb", config, out, "abc123", start_epoch=0)
    assert args == ("proj",)
    assert (kwargs["id"], kwargs["resume"], kwargs["entity"], kwargs["tags"]) == (
        "abc123",
        "allow",
        "team",
        ["a", "b"],
    )
    assert kwargs["name"] == "exp1" and kwargs["mode"] == "offline" and kwargs["dir"] == str(out)
    assert kwargs["config"]["logging"]["wandb_project"] == "proj"
    named = config_for(out, "logging.wandb_name=my-name")
    assert init_arguments("wandb", named, out, "abc123", 0)[1]["name"] == "my-name"
    assert init_arguments("tensorboard", config, out, "abc123", 3) == (
        ("tensorboard", str(out)),
        {"purge_step": 3},
    )


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_every_row_after_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    run = RunDirectory(config_for(out), is_main=True, start_epoch=0)
    assert run.trackers.names == ["tensorboard"]
    run.log({"epoch": 0, "reward_mean": 0.25, "reward_std": 0.5})
    run.log({"epoch": 1, "reward_mean": 0.75, "reward_std": 0.5})
    run.log_image("eval/images", np.zeros((8, 8, 3), dtype=np.uint8), step=1)
    run.close()
    assert [r["reward_mean"] for r in read_metrics(out / "metrics.jsonl")] == [0.25, 0.75]
    acc = _scalars(out / "tensorboard")
    tag = next(t for t in acc.Tags()["scalars"] if "reward" in t and "mean" in t)
    assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(0, 0.25), (1, 0.75)]
    assert acc.Tags()["images"] == ["eval/images"]


class Broken:
    name = "broken"

    def log(self, values, step):
        raise ConnectionError("tracker server down")

    def finish(self):
        pass


def test_a_failing_tracker_is_logged_and_counted_and_loses_no_row(tmp_path, caplog):
    out = tmp_path / "run"
    run = RunDirectory(config_for(out, "logging.report_to=none"), is_main=True, start_epoch=0)
    run.trackers = Trackers([Broken()])
    with caplog.at_level(logging.WARNING, logger="diffloop.tracking"):
        for epoch in range(3):
            run.log({"epoch": epoch, "reward_mean": float(epoch)})
        run.close()
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    assert run.trackers.failures == {"broken": 3}
    first = [r for r in caplog.records if "failed to log metrics" in r.message]
    assert len(first) == 1 and "tracker server down" in first[0].message
    assert any("broken 3 time(s)" in r.message for r in caplog.records)


def test_a_tracker_that_cannot_start_is_an_error_before_the_run_is_recorded(tmp_path):
    out = tmp_path / "run"
    config = config_for(out, "logging.tracker_kwargs.tensorboard.no_such_argument=1")
    with pytest.raises(ConfigError, match="the tensorboard tracker could not start"):
        RunDirectory(config, is_main=True, start_epoch=0)
    assert not (out / "sessions.jsonl").exists() and not (out / "config.yaml").exists()


def test_accelerate_mixed_precision_that_differs_is_warned(monkeypatch, caplog):
    assert mixed_precision_conflict("no", {}) is None
    assert mixed_precision_conflict("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}) is None
    message = mixed_precision_conflict("no", {"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert "train.mixed_precision=no" in message and "set train.mixed_precision=fp16" in message
    # what `accelerate launch --mixed_precision bf16` sets. (No Accelerator is built here: it would
    # keep bf16 in accelerate's process-wide state for every later test.)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="diffloop.distributed"):
        warn_on_mixed_precision_conflict("no")
        warn_on_mixed_precision_conflict("bf16")
    warnings = [r.message for r in caplog.records if "ACCELERATE_MIXED_PRECISION" in r.message]
    assert len(warnings) == 1 and "'bf16'" in warnings[0]


def test_trainer_logs_to_tensorboard_and_jsonl(tmp_path):
    """The default run (tensorboard) writes the same epochs to both, through the Trainer."""
    from diffloop.trainer import Trainer

    out = tmp_path / "run"
    overrides = ["num_epochs=1", "eval.prompts=null", "sample.num_steps=2",
                 "sample.prompts_per_epoch=2",
                 "sample.samples_per_prompt=2", "train.batch_size=4",
                 "logging.progress_bars=false"]  # fmt: skip
    Trainer(config_for(out, *overrides)).train()
    rows = read_metrics(out / "metrics.jsonl")
    acc = _scalars(out / "tensorboard")
    tag = next(t for t in acc.Tags()["scalars"] if "reward" in t and "mean" in t)
    assert [e.value for e in acc.Scalars(tag)] == pytest.approx([r["reward_mean"] for r in rows])
    assert json.loads((out / "sessions.jsonl").read_text().splitlines()[0])["session"] == 1


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_offline_run_uses_the_runs_own_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    run = RunDirectory(config_for(out, "logging.report_to=wandb",
                                  "logging.tracker_kwargs.wandb.mode=offline"),
                       is_main=True, start_epoch=0)  # fmt: skip
    run.log({"epoch": 0, "reward_mean": 0.5})
    run.close()
    assert run.trackers.failures == {}
    assert any(run.run_id in p.name for p in (out / "wandb").glob("offline-run-*"))
