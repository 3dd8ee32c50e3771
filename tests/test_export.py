"""The shareable LoRA (diffloop.export): diffusers file, kohya copy, model card, hub upload.

One tiny SD run with held-out evaluation (module-scoped) is exported; the tests read its lora/
directory: the card states what the run did, the kohya copy has WebUI keys and the run's alpha and
converts back (diffusers' own kohya -> diffusers path) to the diffusers weights and outputs, and an
upload to an unreachable hub fails with one line that names hub.model_id and the retry command,
leaving the run directory complete. Every family's copy for other tools, checked against each
loader's naming rule, is tests/test_lora_formats.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffloop.config import ConfigError, load_config, validate
from diffloop.export import (
    LORA_WEIGHT_NAME,
    HubUploadError,
    card_text,
    held_out_scores,
    kohya_state_dict,
    push_to_hub,
)
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import assert_same_unet, tiny_overrides
from diffloop.trainer import Trainer

ALPHA, RANK = 3.0, 2  # alpha != rank: a kohya copy with diffusers' default alpha (= rank) is wrong


def run_overrides(model, out: Path, **extra) -> list[str]:
    return tiny_overrides(
        model, out, num_epochs=1, **{
            "sample.num_steps": 3, "lora.rank": RANK, "lora.alpha": ALPHA,
            "train.learning_rate": 0.1,
            "eval.prompts": "shapes/val_pair", "eval.num_prompts": 2, "eval.samples_per_prompt": 1,
            **extra,
        },
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """(trainer, run directory) of one finished tiny SD LoRA run with held-out evaluation."""
    out = tmp_path_factory.mktemp("export") / "my_run"
    argv = ["diffloop", "train", *run_overrides(tiny_sd, out)]
    t = Trainer(load_config(None, argv[2:]), argv=argv)
    t.train()
    return t, out


def test_the_lora_directory_holds_weights_kohya_copy_card_and_image(trained):
    _, out = trained
    names = {p.name for p in (out / "lora").iterdir()}
    assert names == {LORA_WEIGHT_NAME, "my_run.safetensors", "README.md", "before_after.png"}


def test_the_card_states_base_algorithm_reward_scores_command_and_tags(trained, tiny_sd):
    from huggingface_hub import ModelCard

    _, out = trained
    card = ModelCard.load(out / "lora" / "README.md")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_reward_mean" in r]
    before, after = evals[0]["eval_reward_mean"], evals[-1]["eval_reward_mean"]
    assert evals[0]["epoch"] == -1 and before != after
    text = card.text
    assert (
        str(tiny_sd) in text and "train.algorithm=loop" in text and "reward_fns:brightness" in text
    )
    assert f"| base | {before:.4f} |" in text and f"{after:.4f} ({after - before:+.4f})" in text
    # the figure is before (left) | after (right), as eval/before_after.json says
    assert "![before (left) and after (right) training](before_after.png)" in text
    assert "(top) and after (bottom)" not in text
    assert "diffloop train model.pretrained=" in text and "lora.alpha=3.0" in text  # run_info argv
    assert "rank 2, alpha 3 (scale 1.5)" in text and "`my_run.safetensors`" in text
    assert card.data.tags == [
        "lora",
        "diffloop",
        "reinforcement-learning",
        "loop",
        "text-to-image",
        "sd",
    ]
    assert card.data.library_name == "diffusers"
    assert card.data.base_model is None  # a local directory is no hub id


def test_card_base_model_is_set_for_hub_ids_and_says_when_nothing_was_measured():
    config = load_config(
        None, ["model.pretrained=org/some-model", "hub.push=true", "hub.model_id=me/x"]
    )
    text = card_text(config, "sd", None, None, None, has_image=False)
    assert "Not measured" in text and 'pipe.load_lora_weights("me/x"' in text
    assert 'DiffusionPipeline.from_pretrained("org/some-model")' in text
    assert "How it was made" not in text and "before_after" not in text


def test_held_out_scores_are_the_base_row_and_the_last_evaluation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"epoch": -1, "eval_reward_mean": 0.25}\n{"epoch": 0, "reward_mean": 1}\n'
        '{"epoch": 1, "eval_reward_mean": 0.3}\n{"epoch": 3, "eval_reward_mean": 0.5}\n'
    )
    got = held_out_scores(path)
    assert (got.before, got.after, got.after_epoch) == (0.25, 0.5, 4)
    path.write_text('{"epoch": 3, "eval_reward_mean": 0.5}\n')  # no base evaluation: no claim
    assert held_out_scores(path) is None


def test_kohya_copy_has_webui_keys_and_the_runs_alpha(trained):
    _, out = trained
    diffusers_sd = load_file(str(out / "lora" / LORA_WEIGHT_NAME))
    kohya = load_file(str(out / "lora" / "my_run.safetensors"))
    modules = {k.split(".")[0] for k in kohya}
    assert (
        all(m.startswith("lora_unet_") for m in modules) and len(modules) == len(diffusers_sd) // 2
    )
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(kohya)
        assert kohya[f"{m}.alpha"].item() == ALPHA  # diffusers' converter would write the rank (2)
        assert kohya[f"{m}.lora_down.weight"].shape[0] == RANK
    assert len(kohya) == 3 * len(modules)
    with safe_open(str(out / "lora" / "my_run.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_alpha"] == "3.0" and f.metadata()["ss_network_dim"] == "2"


def test_kohya_copy_converts_back_to_the_diffusers_weights(trained):
    """diffusers' kohya -> diffusers conversion (what load_lora_weights runs) gives the same
    tensors, with network alpha = the run's alpha."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    def as_peft(sd):  # the keys load_lora_weights hands to peft, for either file
        return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})

    _, out = trained
    expected = as_peft(load_file(str(out / "lora" / LORA_WEIGHT_NAME)))
    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(out / "lora" / "my_run.safetensors")
    )
    state = as_peft(converted)
    assert set(state) == set(expected) and any(".lora_A." in k for k in state)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert alphas and set(alphas.values()) == {ALPHA}


def test_kohya_copy_loaded_in_a_pipeline_reproduces_the_trained_unet(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    t, out = trained
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(out / "lora"), weight_name="my_run.safetensors")
    assert_same_unet(t.policy, pipe.unet)


def test_kohya_alpha_is_given_not_the_rank():
    sd = {"unet.a.b.lora_A.weight": torch.ones(4, 8), "unet.a.b.lora_B.weight": torch.zeros(8, 4)}
    kohya = kohya_state_dict(sd, alpha=16.0)
    assert set(kohya) == {
        "lora_unet_a_b.lora_down.weight",
        "lora_unet_a_b.lora_up.weight",
        "lora_unet_a_b.alpha",
    }
    assert (
        kohya["lora_unet_a_b.alpha"].item() == 16.0
        and kohya["lora_unet_a_b.alpha"].dtype == torch.float32
    )


def test_export_imports_no_pipeline_class(tmp_path):
    """The LoRA export goes through the loader mixin: no pipeline module (whose import warns)
    loads."""
    code = (
        "import sys, torch\n"
        "from peft import LoraConfig\n"
        "from diffloop.testing.tiny import make_tiny_unet\n"
        "from diffloop.export import save_lora\n"
        "class P:\n"
        "    lora_loader, lora_component = 'StableDiffusionLoraLoaderMixin', 'unet'\n"
        "p = P(); p.unet = make_tiny_unet()\n"
        "p.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=['to_q']))\n"
        f"save_lora(p, {str(tmp_path)!r})\n"
        "print(sorted(m for m in sys.modules if "
        "m.startswith('diffusers.pipelines.stable_diffusion')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / LORA_WEIGHT_NAME).is_file()


# ----------------------------------------------------------------------------------- hub


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "offline"])
def test_upload_to_an_unreachable_hub_fails_with_one_line_and_loses_nothing(
    trained, monkeypatch, offline
):
    from huggingface_hub import constants

    _, out = trained
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    rows = read_metrics(out / "metrics.jsonl")
    hub = load_config(None, ["hub.push=true", "hub.model_id=someone/my-lora"]).hub
    with pytest.raises(HubUploadError) as err:
        push_to_hub(out / "lora", hub)
    message = str(err.value)
    assert "\n" not in message and "hub.model_id=someone/my-lora" in message
    assert f"hf upload someone/my-lora {out / 'lora'} . --repo-type model --private" in message
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert read_metrics(out / "metrics.jsonl") == rows


def test_a_run_with_hub_push_ends_with_the_upload_error_after_writing_everything(
    tiny_sd, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    from diffloop.cli import main

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "run"
    argv = run_overrides(
        tiny_sd,
        out,
        **{"hub.push": "true", "hub.model_id": "someone/my-lora", "eval.prompts": None},
    )
    assert main(["train", *argv]) != 0
    assert (out / "lora" / "README.md").is_file() and (out / "lora" / LORA_WEIGHT_NAME).is_file()
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0]
    assert (out / "checkpoints" / "epoch_000001" / "COMPLETE").is_file()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["hub.push=true"], "hub.push=true needs hub.model_id"),
        (
            ["hub.push=true", "hub.model_id=no spaces/x"],
            "hub.model_id=no spaces/x must be a hub repository id",
        ),
        (["hub.push=true", "hub.model_id=justaname"], "must be a hub repository id namespace/name"),
        (
            ["hub.push=true", "hub.model_id=a/b", "hub.token_env=DIFFLOOP_TEST_UNSET_TOKEN"],
            "hub.token_env",
        ),
    ],
)
def test_hub_settings_are_checked_when_push_is_on(overrides, match, tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "hub.push=false", *overrides[1:]])
    validate(config)  # push off: model_id is not looked at
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"output_dir={tmp_path}", *overrides])


def test_sdxl_kohya_copy_loaded_in_its_pipeline_reproduces_the_trained_unet(tiny_sdxl, tmp_path):
    """SDXL plugs in with its loader mixin alone: same files, and its kohya copy reloads exactly."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "sdxl_run"
    t = Trainer(load_config(None, run_overrides(tiny_sdxl, out, **{"eval.prompts": None})))
    t.train()
    assert {p.name for p in (out / "lora").iterdir()} == {
        LORA_WEIGHT_NAME,
        "sdxl_run.safetensors",
        "README.md",
    }
    assert "sdxl" in (out / "lora" / "README.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.load_lora_weights(str(out / "lora"), weight_name="sdxl_run.safetensors")
    assert_same_unet(t.policy, pipe.unet)


def test_the_shapes_cards_usage_code_runs_and_loads_the_trained_lora(tmp_path):
    """The card's own snippet, executed (the shapes model has no pipeline class: its UNet)."""
    out = tmp_path / "shapes_run"
    t = Trainer(load_config(None, run_overrides("shapes", out, **{"eval.prompts": None})))
    t.train()
    text = (out / "lora" / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "path/to/this/directory" in code
    scope: dict = {}
    exec(code.replace("path/to/this/directory", str(out / "lora")), scope)  # noqa: S102 - our own card
    assert_same_unet(t.policy, scope["unet"])


def test_a_policy_that_does_not_name_its_loader_is_refused_before_training():
    from diffloop.export import ExportError, check_exportable

    class Bare:
        unet = None

    check_exportable(Bare(), lora_enabled=False)  # full fine-tuning: the policy's own export
    with pytest.raises(
        ExportError, match="Bare cannot export a LoRA: it needs the class attributes lora_loader"
    ):
        check_exportable(Bare(), lora_enabled=True)
    Bare.lora_loader, Bare.lora_component = "NoSuchLoraLoaderMixin", "unet"
    with pytest.raises(ExportError, match="got 'NoSuchLoraLoaderMixin'"):
        check_exportable(Bare(), lora_enabled=True)
    Bare.lora_loader = "SD3LoraLoaderMixin"
    check_exportable(Bare(), lora_enabled=True)
