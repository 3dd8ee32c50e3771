"""resume=true continues the run itself: its own config, only allowed changes, an append-only
record; Ctrl-C ends `diffloop train` with one line and the command that resumes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from diffloop.checkpoint import latest_checkpoint
from diffloop.cli import main
from diffloop.config import Config, ConfigError, load_config, save_config
from diffloop.resume import check_resume
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import comparable, run, tiny_overrides

RECORD = ("config.yaml", "run_info.json", "sessions.jsonl", "metrics.jsonl")


def snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in RECORD if (out / name).exists()}


def sessions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------- check_resume (no model)


def saved_run(tmp_path: Path, **changes) -> Config:
    config = load_config(
        None, [f"output_dir={tmp_path}", *[f"{k}={v}" for k, v in changes.items()]]
    )
    save_config(config, tmp_path / "config.yaml")
    return config


def resumed(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [f"output_dir={tmp_path}", "resume=true", *overrides])


def test_check_resume_allows_only_repeated_values_and_the_listed_changes(tmp_path):
    saved_run(tmp_path, num_epochs=5)
    assert check_resume(resumed(tmp_path, "num_epochs=5")) == {}
    assert check_resume(resumed(tmp_path, "num_epochs=8", "logging.tensorboard=false")) == {
        "logging.tensorboard": False,
        "num_epochs": 8,
    }
    with pytest.raises(
        ConfigError,
        match=r"train.algorithm='ppo' differs from the run's train.algorithm='loop'"
        r".*resume_allow=\[sample.samples_per_prompt,train.algorithm\]",
    ):
        check_resume(
            resumed(tmp_path, "num_epochs=5", "train.algorithm=ppo", "sample.samples_per_prompt=2")
        )
    with pytest.raises(ConfigError, match="num_epochs=3 is below the run's num_epochs=5"):
        check_resume(resumed(tmp_path, "num_epochs=3"))
    # resume_allow: one key, or a whole section
    assert check_resume(
        resumed(
            tmp_path,
            "num_epochs=5",
            "train.learning_rate=1e-5",
            "resume_allow=[train.learning_rate]",
        )
    ) == {"train.learning_rate": 1e-5}
    assert check_resume(
        resumed(tmp_path, "num_epochs=5", "train.learning_rate=1e-5", "resume_allow=[train]")
    )
    with pytest.raises(ConfigError, match="resume_allow names 'train.learning_rat'"):
        check_resume(resumed(tmp_path, "num_epochs=5", "resume_allow=[train.learning_rat]"))


def test_a_changed_value_refused_at_the_command_line_leaves_the_record_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    saved_run(out, num_epochs=2)
    (out / "run_info.json").write_text("{}")
    before = snapshot(out)
    # No model loads: the packaged default config is not what is compared, the run's own is.
    assert main(["train", f"output_dir={out}", "resume=true", "sample.samples_per_prompt=4"]) == 2
    err = capsys.readouterr().err
    assert "sample.samples_per_prompt=4 differs from the run's sample.samples_per_prompt=8" in err
    assert snapshot(out) == before


def test_resume_without_the_yaml_continues_with_the_runs_own_config(tiny_sd, tmp_path):
    assert main(["train", *tiny_overrides(tiny_sd, tmp_path / "full", num_epochs=3)]) == 0
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_sd, out, num_epochs=1)]) == 0
    config_yaml, run_info = (out / "config.yaml").read_bytes(), (out / "run_info.json").read_bytes()
    # No CONFIG, no model/reward/prompt overrides: all of it comes from the run directory.
    assert main(["train", f"output_dir={out}", "resume=true", "num_epochs=2"]) == 0
    assert latest_checkpoint(out).name == "epoch_000002"
    assert (out / "config.yaml").read_bytes() == config_yaml and (
        out / "run_info.json"
    ).read_bytes() == run_info
    assert [s["config_changes"] for s in sessions(out)] == [{}, {"num_epochs": 2}]
    # The raised num_epochs is part of the run now: a plain resume keeps it and adds nothing.
    assert main(["train", f"output_dir={out}", "resume=true"]) == 0
    assert latest_checkpoint(out).name == "epoch_000002"
    assert main(["train", f"output_dir={out}", "resume=true", "num_epochs=3"]) == 0
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(full)
    assert [s["start_epoch"] for s in sessions(out)] == [0, 1, 2, 2]


def test_resume_allow_changes_the_run_and_later_resumes_keep_the_change(tiny_sd, tmp_path):
    out = tmp_path / "run"
    run(tiny_sd, out, num_epochs=1)
    args = tiny_overrides(tiny_sd, out, num_epochs=2)
    assert (
        main(
            [
                "train",
                *args,
                "resume=true",
                "train.learning_rate=0.001",
                "resume_allow=[train.learning_rate]",
            ]
        )
        == 0
    )
    assert read_metrics(out / "metrics.jsonl")[-1]["lr"] == pytest.approx(1e-3)
    assert sessions(out)[-1]["config_changes"] == {"num_epochs": 2, "train.learning_rate": 0.001}
    # Repeating the first session's value now differs from the run (whose rate is 1e-3).
    assert main(["train", *args, "resume=true", "num_epochs=3"]) == 2
    assert main(["train", f"output_dir={out}", "resume=true", "num_epochs=3"]) == 0
    assert read_metrics(out / "metrics.jsonl")[-1]["lr"] == pytest.approx(1e-3)


def test_library_resume_with_another_algorithm_is_refused(tiny_sd, tmp_path):
    from diffloop.trainer import Trainer

    out = tmp_path / "run"
    run(tiny_sd, out, num_epochs=1)
    config = load_config(
        None,
        tiny_overrides(
            tiny_sd, out, num_epochs=1, resume=True, **{"train.algorithm": "reinforce_loo"}
        ),
    )
    with pytest.raises(ConfigError, match="train.algorithm='reinforce_loo' differs"):
        Trainer(config)


# ----------------------------------------------------------------------------- Ctrl-C

INTERRUPT = {"at_epoch": 1}


def interrupt_at_epoch(
    images: torch.Tensor, prompts: list[str], metadata: list[dict]
) -> torch.Tensor:
    """Brightness, but Ctrl-C (KeyboardInterrupt) while scoring epoch INTERRUPT["at_epoch"]."""
    if metadata and metadata[0].get("epoch") == INTERRUPT["at_epoch"]:
        raise KeyboardInterrupt
    return images.mean(dim=(1, 2, 3))


def test_ctrl_c_prints_one_line_with_what_was_kept_and_the_resume_command(
    tiny_sd, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    args = tiny_overrides(
        tiny_sd, out, num_epochs=2, **{"reward.name": "test_resume:interrupt_at_epoch"}
    )
    assert main(["train", *args]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    command = f"diffloop train output_dir={out} resume=true"
    assert line == (
        "diffloop: interrupted; kept checkpoint "
        f"{out / 'checkpoints' / 'epoch_000001'} (1 epochs done); "
        f"resume with: {command}"
    )
    monkeypatch.setitem(INTERRUPT, "at_epoch", None)
    assert main(shlex.split(command)[1:]) == 0  # the printed command, as is
    assert latest_checkpoint(out).name == "epoch_000002"


def test_ctrl_c_line_comes_from_the_main_rank_only(monkeypatch):
    """Ctrl-C reaches every process of a launch; only rank 0 prints the resume line."""
    from types import SimpleNamespace

    from diffloop.cli import is_main_process

    monkeypatch.setenv("RANK", "1")
    assert not is_main_process(None)  # interrupted before the trainer existed: the launcher's rank
    monkeypatch.setenv("RANK", "0")
    assert is_main_process(None)
    monkeypatch.delenv("RANK")
    assert is_main_process(None)  # a plain single-process run
    assert not is_main_process(SimpleNamespace(dist=SimpleNamespace(is_main=False)))
    assert is_main_process(SimpleNamespace(dist=SimpleNamespace(is_main=True)))


def test_a_resume_on_another_process_count_says_how_the_steps_per_epoch_change():
    from diffloop.resume import process_count_change

    # 4 prompts x 4 samples = 16; train.batch_size 2: 8 minibatches on 1 process, 4 on each of 2.
    settings = ["sample.prompts_per_epoch=4", "sample.samples_per_prompt=4", "train.batch_size=2"]
    config = load_config(None, settings)
    message = process_count_change(config, saved=2, now=1)
    assert "written by 2 process(es) and this run has 1" in message
    assert "from 4 to 8" in message and "train.gradient_accumulation_steps=2" in message
    assert "scaled by 1/2" in process_count_change(config, saved=1, now=2)  # 1 * 1 / 2
    assert process_count_change(config, saved=2, now=2) is None
    assert process_count_change(config, saved=None, now=1) is None  # older checkpoints
    one_update = load_config(None, [*settings, "train.algorithm=reinforce_loo"])
    assert process_count_change(one_update, saved=2, now=1) is None  # one step per batch


def test_a_checkpoint_records_its_process_count(tiny_sd, tmp_path):
    import json

    run(tiny_sd, tmp_path / "run", num_epochs=1)
    (state,) = (tmp_path / "run" / "checkpoints").glob("epoch_*/state.json")
    assert json.loads(state.read_text())["processes"] == 1
