"""User errors that are one line naming the field and the fix (exit status 2), never a traceback or
a silent guess; ``check-config`` refuses what ``train`` refuses, before any model loads."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from diffloop.checkpoint import WEIGHTS, CheckpointError, list_complete_checkpoints
from diffloop.cli import main
from diffloop.config import ConfigError, LoraConfig, ModelConfig, load_config, save_config
from diffloop.policies.diffusers_policy import ModelLoadError
from diffloop.policies.families import load_policy
from diffloop.resume import check_resume
from diffloop.testing.runs import tiny_overrides

CPU = torch.device("cpu")


def one_line_error(capsys, *argv: str) -> str:
    """The stderr of ``diffloop ARGV``, asserted to be one ``diffloop: error:`` line (status 2)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("diffloop: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """``diffloop train`` must fail before a Trainer is built: building one is an error here."""
    import diffloop.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("train got past its checks to the Trainer")

    monkeypatch.setattr(diffloop.trainer, "Trainer", refuse)


# ------------------------------------------------------------------ output_dir/checkpoints a file


def test_a_file_named_checkpoints_in_output_dir_is_refused_up_front(tmp_path, capsys, no_training):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    for command in ("check-config", "train"):
        err = one_line_error(capsys, command, f"output_dir={out}")
        assert f"{out / 'checkpoints'} is a file" in err and "choose another output_dir" in err


# ------------------------------------------------------------------ resume: shape-fixing keys


def saved_run(out: Path) -> None:
    out.mkdir(exist_ok=True)
    save_config(load_config(None, [f"output_dir={out}"]), out / "config.yaml")


@pytest.mark.parametrize(
    "change",
    [
        "lora.rank=16",
        "lora.target_modules=[to_q]",
        "lora.enabled=false",
        "model.pretrained=org/another-model",
    ],
)
def test_resume_cannot_change_what_fixes_the_checkpoints_tensors(
    tmp_path, capsys, no_training, change
):
    out = tmp_path / "run"
    saved_run(out)
    key = change.split("=")[0]
    for allow in (key, key.split(".")[0]):  # the key, or its whole section
        args = [f"output_dir={out}", "resume=true", change, f"resume_allow=[{allow}]"]
        with pytest.raises(ConfigError, match=rf"a resume cannot change {re.escape(key)}"):
            check_resume(load_config(None, args))
        for command in ("check-config", "train"):
            err = one_line_error(capsys, command, *args)
            assert f"cannot change {key}" in err and "new run (another output_dir)" in err, err


def test_resume_may_still_change_what_keeps_the_tensors(tmp_path):
    out = tmp_path / "run"
    saved_run(out)
    args = [f"output_dir={out}", "resume=true", "lora.alpha=2", "sample.samples_per_prompt=4"]
    allowed = check_resume(load_config(None, [*args, "resume_allow=[lora,sample]"]))
    assert allowed == {"lora.alpha": 2.0, "sample.samples_per_prompt": 4}


# ------------------------------------------------------------------ model families

FAMILY_FOLDERS = {  # what each family's diffusers directory holds
    "sd": {"unet", "text_encoder", "tokenizer", "scheduler", "vae"},
    "sdxl": {"unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
             "vae"},
    "sd3": {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
            "tokenizer_2", "tokenizer_3", "scheduler", "vae"},
    "flux": {"transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
             "scheduler", "vae"},
}  # fmt: skip
PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
ANY_FOLDER = re.compile(
    r"\b(unet|transformer|text_encoder(?:_\d)?|tokenizer(?:_\d)?|scheduler|vae)/"
)


def assert_names_only_its_family(message: str, family: str, missing: str) -> None:
    named = set(ANY_FOLDER.findall(message))
    assert missing in named, message
    assert named <= FAMILY_FOLDERS[family], f"{family}: {sorted(named - FAMILY_FOLDERS[family])}"
    assert ("transformer" if family in ("sd3", "flux") else "unet") in named, message
    assert PIPELINES[family] in message, message


@pytest.fixture
def family_dir(request, tmp_path) -> tuple[str, Path]:
    """(family, a copy of that family's tiny model directory)."""
    family = request.param
    source = request.getfixturevalue({"sd": "tiny_sd", "sdxl": "tiny_sdxl", "sd3": "tiny_sd3",
                                      "flux": "tiny_flux"}[family])  # fmt: skip
    copy = tmp_path / family
    shutil.copytree(source, copy)
    return family, copy


MISSING = {"sd": "unet", "sdxl": "text_encoder_2", "sd3": "transformer", "flux": "text_encoder_2"}


@pytest.mark.parametrize("family_dir", list(MISSING), indirect=True)
def test_a_missing_component_is_named_with_the_familys_own_layout(family_dir, capsys):
    family, path = family_dir
    shutil.rmtree(path / MISSING[family])
    with pytest.raises(ModelLoadError) as e:
        load_policy(ModelConfig(pretrained=str(path)), LoraConfig(), device=CPU)
    assert_names_only_its_family(str(e.value), family, MISSING[family])
    # check-config refuses it too, before any model loads
    err = one_line_error(capsys, "check-config", f"model.pretrained={path}")
    assert_names_only_its_family(err, family, MISSING[family])


@pytest.mark.parametrize("family_dir", ["sd3", "flux"], indirect=True)
def test_a_transformer_model_without_model_index_is_told_by_its_transformer(family_dir, capsys):
    family, path = family_dir
    (path / "model_index.json").unlink()
    shutil.rmtree(path / "vae")
    with pytest.raises(ModelLoadError) as e:
        load_policy(ModelConfig(pretrained=str(path)), LoraConfig(), device=CPU)
    assert_names_only_its_family(str(e.value), family, "vae")
    err = one_line_error(capsys, "check-config", f"model.pretrained={path}")
    assert_names_only_its_family(err, family, "vae")


@pytest.mark.parametrize("family_dir", ["sd"], indirect=True)
def test_an_unknown_pipeline_class_is_refused_naming_the_supported_ones(family_dir, capsys):
    _, path = family_dir
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "KandinskyPipeline"})
    )
    with pytest.raises(
        ModelLoadError, match="'KandinskyPipeline', which diffloop does not support"
    ):
        load_policy(ModelConfig(pretrained=str(path)), LoraConfig(), device=CPU)
    err = one_line_error(capsys, "check-config", f"model.pretrained={path}")
    assert "model.pretrained=" in err and "'KandinskyPipeline'" in err
    assert all(p in err for p in ("StableDiffusion*", "StableDiffusionXL*", "StableDiffusion3*",
                                  "Flux*"))  # fmt: skip


def test_a_missing_local_model_is_refused_by_check_config_and_a_hub_id_is_not(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for missing in ("./nothere", str(tmp_path / "missing")):
        err = one_line_error(capsys, "check-config", f"model.pretrained={missing}")
        assert f"model.pretrained='{missing}'" in err and "does not exist" in err, err
        assert "diffusers layout" in err and "hub id" in err
    (tmp_path / "afile").write_text("")
    err = one_line_error(capsys, "check-config", f"model.pretrained={tmp_path / 'afile'}")
    assert "is a file, not a model directory" in err
    # A hub id is not looked up: check-config passes offline.
    assert main(["check-config", "model.pretrained=some-org/some-model"]) == 0
    assert main(["check-config"]) == 0  # the shipped shapes model, which has no model_index.json


# ------------------------------------------------------------------ YAML


def test_duplicate_yaml_keys_are_refused_naming_the_key_and_line(tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  learning_rate: 0.001\n  batch_size: 4\n  learning_rate: 0.01\n")
    err = one_line_error(capsys, "check-config", str(config))
    assert "duplicate key 'learning_rate' on line 4 (first on line 2)" in err, err
    one_line_error(capsys, "train", str(config))
    err = one_line_error(capsys, "check-config", "reward.kwargs={a: 1, a: 2}")
    assert "duplicate key 'a'" in err
    # Merge keys (`<<`) are overridden on purpose; YAML 1.2 booleans stay as they were.
    from diffloop.config import load_yaml

    assert load_yaml("b: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 3\nz: no\n") == {
        "b": {"x": 1, "y": 2},
        "m": {"x": 3, "y": 2},
        "z": "no",
    }


def test_duplicate_keys_in_a_sweep_file_are_refused(tmp_path, capsys):
    from diffloop.tools.sweep import SweepError, load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "base: shapes.yaml\nbudget: {samples: 64}\nseeds: [0]\nruns:\n  loop: {}\n  loop: {}\n"
    )
    with pytest.raises(SweepError, match=r"duplicate key 'loop' on line 6 \(first on line 5\)"):
        load_sweep(sweep)
    err = one_line_error(capsys, "compare", str(sweep), "--dry-run")
    assert "duplicate key 'loop'" in err


def test_a_misspelled_shipped_config_name_gets_did_you_mean(capsys, no_training):
    for command in ("check-config", "train"):
        err = one_line_error(capsys, command, "shapes.yml")
        assert "config file 'shapes.yml' does not exist. Did you mean 'shapes.yaml'?" in err, err


# ------------------------------------------------------------------ sample / eval of a damaged run


@pytest.fixture(scope="module")
def damaged_run(tiny_sd, tmp_path_factory) -> Path:
    """A finished 2-epoch tiny run whose newest checkpoint's weights file is corrupt."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    assert main(["train", *tiny_overrides(tiny_sd, out, **{"sample.num_steps": 2})]) == 0
    _, newest = list_complete_checkpoints(out)  # epoch_000001, epoch_000002
    weights = newest / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    return out


SAMPLE = ["--prompt", "a cat", "--num-per-prompt", "1", "--steps", "2", "--device", "cpu"]


def test_sample_falls_back_to_the_newest_valid_checkpoint(damaged_run, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="diffloop.checkpoint"):
        code = main(["sample", str(damaged_run), *SAMPLE, "--output", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err
    assert (
        "epoch_000002" in caplog.text and "falling back to the previous checkpoint" in caplog.text
    )
    assert (tmp_path / "s" / "grid.png").is_file()


def test_eval_falls_back_to_the_newest_valid_checkpoint(damaged_run, tmp_path, caplog, capsys):
    argv = ["eval", str(damaged_run), "--prompts", "shapes/val_pair", "--num-prompts", "1",
            "--images-per-prompt", "1", "--reward", "jpeg_compressibility", "--steps", "2",
            "--output", str(tmp_path / "eval"), "--device", "cpu"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="diffloop.checkpoint"):
        assert main(argv) == 0, capsys.readouterr().err
    assert "falling back to the previous checkpoint" in caplog.text
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert Path(result["targets"][0]["checkpoint"]).name == "epoch_000001"


def test_sample_of_a_run_without_a_valid_checkpoint_says_what_exists(damaged_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(damaged_run, run)
    older = list_complete_checkpoints(run)[0] / WEIGHTS
    older.write_bytes(older.read_bytes()[:-8] + b"garbage!")
    logging.getLogger("diffloop.checkpoint").disabled = True  # the per-checkpoint warnings
    try:
        err = one_line_error(capsys, "sample", str(run), *SAMPLE, "--output", str(tmp_path / "s"))
    finally:
        logging.getLogger("diffloop.checkpoint").disabled = False
    assert "no checkpoint in" in err and "epoch_000001" in err and "epoch_000002" in err, err
    assert "restore one from a backup" in err
    for checkpoint in list_complete_checkpoints(run):
        shutil.rmtree(checkpoint)
    err = one_line_error(capsys, "sample", str(run), *SAMPLE, "--output", str(tmp_path / "s"))
    assert "has no complete checkpoint" in err and "resume=true" in err
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        from diffloop.checkpoint import load_newest_valid_weights

        load_newest_valid_weights(run)


def test_the_family_table_lists_the_folders_the_loaders_require():
    from diffloop.policies.diffusers_policy import REQUIRED_COMPONENTS
    from diffloop.policies.families import family
    from diffloop.policies.sdxl import SDXL_COMPONENTS

    assert family("sd").folders() == list(REQUIRED_COMPONENTS)
    assert family("sdxl").folders() == list(SDXL_COMPONENTS)


def test_another_runs_checkpoint_is_refused_in_one_line(damaged_run, tiny_sd, tmp_path, capsys):
    """``sample RUN --checkpoint`` of a run trained with another lora.rank: names the shapes."""
    other = tmp_path / "other"
    args = tiny_overrides(tiny_sd, other, **{"sample.num_steps": 2, "lora.rank": 2})
    assert main(["train", *args]) == 0
    checkpoint = list_complete_checkpoints(other)[-1]
    argv = ["sample", str(damaged_run), *SAMPLE, "--checkpoint", str(checkpoint),
            "--output", str(tmp_path / "s")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err  # the model loads first: transformers' progress bar precedes
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffloop: error: ") and "Traceback" not in err, err
    assert "parameters have other shapes" in last and "lora.rank" in last, err
