"""Short training runs for tests: the overrides of a tiny run, running it in-process, and what two
runs' metrics must share.

Two kinds of run:

- on a tiny random-weight pipeline directory (``tiny_overrides`` / ``run``: the conftest fixtures
  ``tiny_sd``, ``tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``), rewarded by ``reward_fns:brightness``,
  the mean pixel value. That reward is a user module (tests/reward_fns.py) found on ``sys.path``
  as a user's own would be: tests/conftest.py puts tests/ there;
- on the shipped shapes-world model (``shapes_overrides``; ``SHORT_SHAPES_RUN`` shortens the
  embedded default).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from diffloop import loops
from diffloop.config import load_config
from diffloop.run_dir import TIME_KEYS
from diffloop.testing.processes import launch
from diffloop.trainer import Trainer

# What a torchrun worker (tests/dist_worker.py) saves in output_dir: each rank's trainable weights.
RANK_PARAMETERS = "params_rank{rank}.safetensors"

# Keys every training epoch's metrics row has.
REQUIRED_METRICS = frozenset({
    "epoch", "reward_mean", "reward_std", "prompts_seen", "reward_queries", "approx_kl", "clipfrac",
    "sample_time_s", "train_time_s",
})  # fmt: skip

# The tiny-pipeline run: 2 prompts x 2 samples, 4 steps, LoRA rank 4.
TINY_RUN: dict[str, Any] = {
    "num_epochs": 2,
    "sample.num_steps": 4,
    "sample.guidance_scale": 3.0,
    "sample.prompts_per_epoch": 2,
    "sample.samples_per_prompt": 2,
    "sample.batch_size": 4,
    "train.batch_size": 2,
    "train.learning_rate": 1e-2,
    "train.clip_range": 0.2,
    # the tiny-model tests were written for these (the defaults before they became the shapes
    # run's)
    "train.timestep_fraction": 1.0,
    "lora.rank": 4,
    "lora.alpha": 4.0,
    "reward.name": "reward_fns:brightness",
    "prompts.source": "list",
    "prompts.prompts": "[a cat, a dog on a bench, a red ball]",
    "eval.prompts": None,
    "logging.progress_bars": False,
    "logging.memory_plan": False,  # ~1.5 s a run; tests/test_memory_plan.py checks the header
}

# A run whose resume must restore more than the weights: PPO's per-prompt stat tracker (a
# 4-reward buffer, used from 2 rewards on) and 2 inner epochs over shuffled minibatches.
STATEFUL_PPO: dict[str, Any] = {
    "train.algorithm": "ppo",
    "sample.samples_per_prompt": 1,
    "sample.prompts_per_epoch": 4,
    "train.stat_tracking_min_count": 2,
    "train.stat_tracking_buffer": 4,
    "train.num_inner_epochs": 2,
}

# The shipped shapes-world model with the smallest run that still trains and checkpoints.
SHAPES_TINY: dict[str, Any] = {
    "model.pretrained": "shapes",
    "num_epochs": 2,
    "cpu_threads": 1,
    "sample.num_steps": 3,
    "sample.prompts_per_epoch": 2,
    "sample.samples_per_prompt": 2,
    "sample.batch_size": 4,
    "train.batch_size": 2,
    "lora.rank": 4,
    "lora.alpha": 4,
    "prompts.source": "shapes/train_pair",
    "reward.name": "shapes_binding",
    "eval.prompts": None,
    "logging.progress_bars": False,
    "logging.tensorboard": False,
    "logging.memory_plan": False,
}

# Overrides that shorten the embedded default (the shapes run, K = 8) and keep its evaluation.
SHORT_SHAPES_RUN = [
    "sample.num_steps=3",
    "sample.prompts_per_epoch=2",
    "sample.batch_size=8",
    "train.batch_size=4",
    "eval.samples_per_prompt=2",
    "logging.progress_bars=false",
    "logging.tensorboard=false",
]


class Killed(Exception):
    """Raised by a test's patched trainer function to stop a run as a kill would."""


@contextlib.contextmanager
def killed_at_epoch(epoch: int, run_dir_suffix: str = "") -> Iterator[None]:
    """Within the block, ``Trainer.run_epoch(epoch)`` raises ``Killed`` (in the run whose
    output_dir ends with ``run_dir_suffix``): the run dies as a kill would, after the earlier
    epochs were logged and checkpointed. Asserts that the block was killed; the trainer is restored
    on leaving."""
    original = Trainer.run_epoch

    def run_epoch_then_die(self: Trainer, e: int) -> Any:
        if e == epoch and str(self.config.output_dir).endswith(run_dir_suffix):
            raise Killed
        return original(self, e)

    Trainer.run_epoch = run_epoch_then_die  # type: ignore[method-assign]
    try:
        yield
    except Killed:
        return
    finally:
        Trainer.run_epoch = original  # type: ignore[method-assign]
    raise AssertionError(f"the run was not killed at epoch {epoch}")


def as_overrides(settings: dict[str, Any]) -> list[str]:
    """``key=value`` command-line overrides; None is written ``null``."""
    return [f"{k}={'null' if v is None else v}" for k, v in settings.items()]


def tiny_overrides(model_dir: Path, out: Path, **extra: Any) -> list[str]:
    """``TINY_RUN`` on the pipeline directory ``model_dir`` into ``out``; ``extra`` wins."""
    return as_overrides(
        {"model.pretrained": str(model_dir), "output_dir": str(out), **TINY_RUN, **extra}
    )


def shapes_overrides(out: Path, **extra: Any) -> list[str]:
    """``SHAPES_TINY`` into ``out``; ``extra`` wins."""
    return as_overrides({**SHAPES_TINY, "output_dir": out, **extra})


def run(model_dir: Path, out: Path, **extra: Any) -> list[dict]:
    """Train ``tiny_overrides(model_dir, out, **extra)`` in-process; its metrics rows."""
    config = load_config(None, tiny_overrides(model_dir, out, **extra))
    return Trainer(config).train()


def two_processes_and_one(
    worker: Path, model_dir: Path, out: Path, accumulation: int, **extra: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train ``tiny_overrides(model_dir, ..., **extra)`` with the torchrun script ``worker`` on two
    processes into ``out/"two"``, each accumulating ``accumulation`` minibatches into a step, and on
    one process into ``out/"one"``, accumulating twice as many (the same sampling batches as each
    rank). Returns the trainable weights saved by rank 0 and rank 1 of the two and by the one."""
    for name, nproc, steps in (("two", 2, accumulation), ("one", 1, 2 * accumulation)):
        settings = {**extra, "train.gradient_accumulation_steps": steps}
        launch(worker, nproc, tiny_overrides(model_dir, out / name, **settings))
    rank0, rank1, one = (
        load_file(str(out / name / RANK_PARAMETERS.format(rank=rank)))
        for name, rank in (("two", 0), ("two", 1), ("one", 0))
    )
    return rank0, rank1, one


def worst_onpolicy_logprob_error(trainer: Trainer, traj: Any, minibatch: int) -> float:
    """max |log p_theta - log p_old| over every stored step of ``traj`` (trajectories the trainer's
    policy has just sampled), recomputed by the training forward in minibatches of ``minibatch``
    as training groups them; asserts each recomputed log-probability is finite. On-policy it must
    be 0 up to floating-point noise."""
    policy, sampler, worst = trainer.policy, trainer.sampler, 0.0
    with torch.no_grad():
        for start in range(0, len(traj), minibatch):
            batch = traj.index(slice(start, start + minibatch))
            for j in range(batch.timesteps.shape[1]):
                step = torch.full((len(batch),), j, dtype=torch.long)
                log_prob = loops.transition_log_prob(policy, batch, step, sampler)[0]
                assert torch.isfinite(log_prob).all()
                worst = max(worst, float((log_prob - batch.log_probs[:, j]).abs().max()))
    return worst


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without the timing keys (the only ones two equal runs may differ in)."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def kl_to_base_around_first_step(config: Any) -> tuple[list[float], list[float]]:
    """kl_to_base of ``loops.step_loss`` (the trainer's policy, sampler and loss settings) at every
    step of two sampled trajectories: at the initial parameters, then after one optimizer step on
    that loss with advantages (+1, -1). The first is exactly 0 (a fresh LoRA is the base model)."""
    trainer = Trainer(config)
    loss = dataclasses.replace(trainer.loss_settings, log_kl=True)
    prompts, seeds = ["a cat", "a dog on a bench"], [1, 2]
    _, traj = next(loops.sample_batches(trainer.policy, prompts, seeds, trainer.sampler, 2))
    adv = torch.tensor([1.0, -1.0])

    def kl_per_step(backward: bool) -> list[float]:
        kls = []
        for j in range(traj.timesteps.shape[1]):
            step = torch.full((2,), j, dtype=torch.long)
            value, stats = loops.step_loss(
                trainer.policy, traj, adv, step, trainer.sampler, loss, on_policy=False
            )
            if backward:
                value.backward()
            kls.append(stats["kl_to_base"].item())
        return kls

    before = kl_per_step(backward=True)
    trainer.optimization.optimizer.step()
    return before, kl_per_step(backward=False)


def assert_same_unet(policy: Any, unet: Any) -> None:
    """``unet`` (a pipeline's, LoRA loaded) gives the trained policy's UNet outputs, which differ
    from the base model's (else the comparison proves nothing)."""
    policy.train(False)
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = policy.unet_conditioning(["a cat", "a red ball"])
    ts = torch.tensor([500, 20])
    with torch.no_grad():
        trained_out = policy.unet(x, ts, **cond).sample
        got = unet(x, ts, **cond).sample
        with policy.reference():
            base = policy.unet(x, ts, **cond).sample
    assert (trained_out - base).abs().max() > 1e-4, "training did not move the model"
    torch.testing.assert_close(got, trained_out, rtol=1e-4, atol=1e-5)
