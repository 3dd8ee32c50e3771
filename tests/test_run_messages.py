"""What a run tells its user: a progress line for every held-out evaluation (the trainer's and
``diffloop eval``'s), and at the end where the LoRA is, which file loads in which tool, and one line
of Python that loads it (executed here on a tiny SD run)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from diffloop.config import load_config
from diffloop.export import LORA_WEIGHT_NAME, SHARE_FORMATS, export_summary_lines
from diffloop.testing.runs import assert_same_unet, tiny_overrides
from diffloop.trainer import Trainer

EVAL = {"eval.prompts": "shapes/val_pair", "eval.num_prompts": 2, "eval.samples_per_prompt": 1}


# ----- progress of the evaluations ----------------------------------------------------------------


@pytest.mark.parametrize("bars", [True, False])
def test_the_trainers_evaluation_shows_a_progress_line_naming_what_it_evaluates(
    bars, tmp_path, capfd
):
    overrides = tiny_overrides("shapes", tmp_path / "run", **EVAL, **{"sample.num_steps": 2})
    t = Trainer(load_config(None, [*overrides, f"logging.progress_bars={str(bars).lower()}"]))
    capfd.readouterr()
    t.evaluate(tag="base")
    err = capfd.readouterr().err
    if bars:
        assert "evaluating base: 2 prompts x 1 image" in err, err
        assert "1/1" in err, err  # a bar over the evaluation's batches
    else:
        assert "evaluating" not in err, err


@pytest.mark.parametrize("bars", [True, False])
def test_diffloop_eval_shows_a_progress_line_per_target(bars, tmp_path, capfd):
    from diffloop.tools.evaluate import evaluate_model

    evaluate_model(
        "shapes",
        prompts="shapes/val_pair",
        rewards=["shapes_binding"],
        num_prompts=2,
        images_per_prompt=2,
        num_steps=2,
        batch_size=2,
        progress_bars=bars,
    )
    err = capfd.readouterr().err
    if bars:
        assert "evaluating shapes: 2 prompts x 2 images" in err, err
        assert "2/2" in err, err
    else:
        assert "evaluating" not in err, err


# ----- the end of a run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_sd, tmp_path_factory):
    """(trainer, run directory, what train() printed) of a finished tiny SD LoRA run."""
    out = tmp_path_factory.mktemp("messages") / "msg_run"
    overrides = tiny_overrides(tiny_sd, out, num_epochs=1, **{"train.learning_rate": 0.1})
    t = Trainer(load_config(None, overrides))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        t.train()
    return t, out, printed.getvalue()


def _after(lines: list[str], marker: str) -> str:
    return lines[lines.index(marker) + 1].strip()


def test_the_end_of_a_run_names_the_lora_and_which_file_loads_where(finished):
    _, out, printed = finished
    lines = printed.splitlines()
    lora = out / "lora"
    assert f"LoRA written to {lora}/ (model card: {lora / 'README.md'})" in lines
    diffusers_file, copy = lora / LORA_WEIGHT_NAME, lora / "msg_run.safetensors"
    assert _after(lines, f"  {diffusers_file}") == "loads in diffusers (the Python line below)"
    assert _after(lines, f"  {copy}").startswith("loads in ComfyUI (models/loras), AUTOMATIC1111")
    assert diffusers_file.is_file() and copy.is_file() and (lora / "README.md").is_file()
    assert f'  images: diffloop sample {out} --prompt "..."' in lines


def test_the_printed_python_line_loads_the_trained_lora(finished, tiny_sd):
    t, out, printed = finished
    code = _after(printed.splitlines(), "  in Python:")
    assert code.startswith("from diffusers import DiffusionPipeline; pipe = ")
    assert f'"{tiny_sd}"' in code and f'"{(out / "lora").as_posix()}"' in code
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the line a user pastes
    assert_same_unet(t.policy, scope["pipe"].unet)


@pytest.mark.parametrize("family", sorted(SHARE_FORMATS))
def test_each_familys_copy_is_named_with_the_tools_that_load_it(family, tmp_path):
    config = load_config(None, [f"output_dir={tmp_path / 'run'}", "model.pretrained=org/base"])
    lora = tmp_path / "run" / "lora"
    lora.mkdir(parents=True)
    copy = lora / f"run{SHARE_FORMATS[family].suffix}.safetensors"
    copy.touch()
    lines = export_summary_lines(config, family, lora)
    assert _after(lines, f"  {copy}") == "loads in " + SHARE_FORMATS[family].tools.replace("`", "")
    assert _after(lines, "  in Python:") == (
        "from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained("
        f'"org/base"); pipe.load_lora_weights("{lora.as_posix()}", '
        f'weight_name="{LORA_WEIGHT_NAME}")'
    )


def test_the_shapes_model_says_its_python_loads_the_unet(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path / 'run'}"])  # the shapes default
    text = "\n".join(export_summary_lines(config, "sd", Path(config.output_dir) / "lora"))
    assert "unet.load_lora_adapter(" in text and "no diffusers pipeline class" in text
    assert "diffloop sample" in text


def test_a_full_fine_tune_names_the_model_directory(tmp_path):
    config = load_config(
        None, [f"output_dir={tmp_path / 'run'}", "model.pretrained=org/base", "lora.enabled=false"]
    )
    model = Path(config.output_dir) / "model"
    lines = export_summary_lines(config, "sd", model)
    assert lines[0].startswith(f"model written to {model}/")
    assert _after(lines, "  in Python:").endswith(
        f'pipe = DiffusionPipeline.from_pretrained("{model.as_posix()}")'
    )
