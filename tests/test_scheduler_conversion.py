"""Defect 1: a model that ships a non-DDIM scheduler trains (finite weights); a degenerate step is
refused.

DDIMScheduler.from_pretrained on an Euler (SDXL-style) config fills the missing set_alpha_to_one
with DDIM's default True: the last step's std is 0, its log-density NaN, and one epoch later every
LoRA weight is NaN. load_components now converts with policies.schedulers.to_ddim, and the trainer
checks every sampled step's std at set-up.
"""

from __future__ import annotations

import pytest
import torch

from diffloop.config import ConfigError, load_config
from diffloop.testing.runs import run, tiny_overrides
from diffloop.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_sd_euler(tmp_path_factory):
    from diffusers import EulerDiscreteScheduler

    from diffloop.testing.tiny import build_tiny_sd

    pipe = build_tiny_sd()
    # As SDXL ships it: no set_alpha_to_one / clip_sample keys, leading spacing with offset 1.
    pipe.scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_sd_euler")
    pipe.save_pretrained(path)
    return path


def test_euler_config_trains_with_finite_lora_weights(tiny_sd_euler, tmp_path):
    config = load_config(None, tiny_overrides(tiny_sd_euler, tmp_path / "run", num_epochs=1))
    trainer = Trainer(config)
    assert trainer.policy.scheduler.config.set_alpha_to_one is False
    rows = trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.policy.trainable_parameters())
    assert rows[0]["onpolicy_logprob_err"] < 1e-5 and rows[0]["grad_norm"] == rows[0]["grad_norm"]


def test_set_alpha_to_one_is_a_clear_config_error(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.scheduler_kwargs\.set_alpha_to_one=false") as e:
        run(
            tiny_sd,
            tmp_path / "run",
            num_epochs=1,
            **{"model.scheduler_kwargs.set_alpha_to_one": True},
        )
    assert "sample.num_steps=4" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_timestep_zero_sampled_is_a_clear_config_error(tiny_sd, tmp_path):
    # linspace spacing samples timestep 0, whose previous alpha is its own: std 0.
    with pytest.raises(ConfigError, match=r"model\.scheduler_kwargs\.timestep_spacing=leading"):
        run(
            tiny_sd,
            tmp_path / "run",
            num_epochs=1,
            **{"model.scheduler_kwargs.timestep_spacing": "linspace"},
        )
