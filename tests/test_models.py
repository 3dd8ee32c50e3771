"""Model loading, precision, checkpointing options, full fine-tuning, and `diffloop sample`."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffloop.cli import main
from diffloop.config import LoraConfig, ModelConfig
from diffloop.policies.diffusers_policy import ModelLoadError
from diffloop.policies.families import load_policy
from diffloop.testing.runs import run


def test_missing_directory_says_how_to_provide(tmp_path):
    with pytest.raises(ModelLoadError, match="diffusers layout") as err:
        load_policy(
            ModelConfig(pretrained=str(tmp_path / "nope")), LoraConfig(), device=torch.device("cpu")
        )
    assert "nope" in str(err.value)


def test_missing_component_is_named(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelLoadError, match="text_encoder/"):
        load_policy(ModelConfig(pretrained=str(broken)), LoraConfig(), device=torch.device("cpu"))


def test_corrupt_weights_are_a_clear_error(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load the unet"):
        load_policy(ModelConfig(pretrained=str(broken)), LoraConfig(), device=torch.device("cpu"))


def test_uncached_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_policy(
            ModelConfig(pretrained="someone/not-cached-model"),
            LoraConfig(),
            device=torch.device("cpu"),
        )


def test_missing_model_fails_cli_cleanly(tmp_path, capsys):
    code = main(
        [
            "train",
            f"model.pretrained={tmp_path / 'nope'}",
            f"output_dir={tmp_path / 'run'}",
            "reward.name=jpeg_compressibility",
        ]
    )
    assert code == 2
    assert "diffusers layout" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_trainables_fp32(tiny_sd, tmp_path, precision):
    from diffloop.config import load_config
    from diffloop.testing.runs import tiny_overrides
    from diffloop.trainer import Trainer

    trainer = Trainer(
        load_config(
            None,
            tiny_overrides(
                tiny_sd, tmp_path / "run", num_epochs=1, **{"train.mixed_precision": precision}
            ),
        )
    )
    rows = trainer.train()
    assert (
        trainer.policy.unet.conv_in.weight.dtype
        == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    )
    assert all(p.dtype == torch.float32 for p in trainer.policy.trainable_parameters())
    assert all(torch.isfinite(p).all() for p in trainer.policy.trainable_parameters())
    assert rows[0]["onpolicy_logprob_err"] < 1e-3


def test_gradient_checkpointing_gives_the_same_step(tiny_sd, tmp_path):
    plain = run(tiny_sd, tmp_path / "a", num_epochs=1)
    ckpt = run(tiny_sd, tmp_path / "b", num_epochs=1, **{"train.gradient_checkpointing": True})
    assert ckpt[0]["grad_norm"] == pytest.approx(plain[0]["grad_norm"], rel=1e-4)


def test_full_finetuning_exports_a_loadable_pipeline(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    run(tiny_sd, out, num_epochs=1, **{"lora.enabled": False, "train.learning_rate": 1e-3})
    pipe = StableDiffusionPipeline.from_pretrained(
        out / "model", safety_checker=None, requires_safety_checker=False
    )
    base = StableDiffusionPipeline.from_pretrained(
        tiny_sd, safety_checker=None, requires_safety_checker=False
    )
    w = pipe.unet.conv_in.weight
    assert not torch.equal(w, base.unet.conv_in.weight), "full fine-tuning did not change the UNet"


def test_sample_command_from_run_and_from_base(tiny_sd, tmp_path):
    out = tmp_path / "run"
    run(tiny_sd, out, num_epochs=1)
    assert (
        main(
            [
                "sample",
                str(out),
                "--prompt",
                "a cat",
                "--num-per-prompt",
                "2",
                "--steps",
                "3",
                "--output",
                str(tmp_path / "s1"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sample",
                str(tiny_sd),
                "--prompt",
                "a cat",
                "--num-per-prompt",
                "2",
                "--steps",
                "3",
                "--output",
                str(tmp_path / "s2"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    from PIL import Image

    for d in ("s1", "s2"):
        assert Image.open(tmp_path / d / "0000.png").size == (32, 32)
        assert (tmp_path / d / "grid.png").is_file()
