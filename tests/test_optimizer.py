"""train.optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW where it can run.

bitsandbytes is not installed here (it is the optional extra ``diffloop[bnb]``), so these tests
check the refusals, each one line naming train.optimizer and the fix, in the order a user meets
them: LoRA (decided without looking at the machine), a missing package, no CUDA device.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from diffloop.cli import main
from diffloop.config import ConfigError, load_config
from diffloop.optimization import build_optimizer

FULL = "lora.enabled=false"


def config(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", *overrides])


def test_default_is_torch_adamw_with_the_configured_hyperparameters(tmp_path):
    t = config(
        tmp_path, "train.learning_rate=0.01", "train.adam_beta1=0.8", "train.weight_decay=0.5"
    ).train
    assert t.optimizer == "adamw"
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], t, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.01, (0.8, 0.999), 0.5)


def test_8bit_adamw_with_lora_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit is for full fine-tuning"):
        config(tmp_path, "train.optimizer=adamw_8bit")


def test_8bit_adamw_without_bitsandbytes_is_refused(tmp_path):
    assert importlib.util.find_spec("bitsandbytes") is None  # the test's premise
    with pytest.raises(
        ConfigError,
        match=r"needs bitsandbytes, which is not installed: pip install 'diffloop\[bnb\]'",
    ):
        config(tmp_path, "train.optimizer=adamw_8bit", FULL)


def test_8bit_adamw_without_cuda_is_refused(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit needs a CUDA device"):
        config(tmp_path, "train.optimizer=adamw_8bit", FULL)


def test_building_8bit_adamw_on_a_cpu_device_is_refused(tmp_path):
    t = config(tmp_path).train
    t.optimizer = "adamw_8bit"  # past validation (e.g. a library caller on a CUDA box forcing CPU)
    with pytest.raises(ConfigError, match="needs a CUDA device, not cpu"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], t, torch.device("cpu"))


def test_unknown_optimizer_names_the_choices(tmp_path):
    with pytest.raises(
        ConfigError, match="train.optimizer='adam8' must be one of adamw, adamw_8bit"
    ):
        config(tmp_path, "train.optimizer=adam8")


def test_check_config_prints_one_line(tmp_path, capsys):
    assert main(["check-config", f"output_dir={tmp_path}", "train.optimizer=adamw_8bit", FULL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(
        "diffloop: error: train.optimizer=adamw_8bit needs bitsandbytes"
    )
