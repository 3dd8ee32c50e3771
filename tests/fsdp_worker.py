"""Run by torchrun (tests/test_fsdp_training.py): train with the given overrides (several runs:
their overrides separated by ``RUN_SEPARATOR``), then write into each run's output_dir this rank's
full trainable parameters (gathered from the FSDP shards on every rank) and
``reductions_rank<r>.json``: how many backwards ran, after which backward each optimizer step came,
in which backwards gradients were reduce-scattered across processes, and what fraction of the
denoiser's parameters this process holds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from diffloop.config import load_config
from diffloop.distributed import end_processes
from diffloop.optimization import Optimization
from diffloop.testing.runs import RANK_PARAMETERS
from diffloop.trainer import Trainer

RUN_SEPARATOR = "---"
record: dict[str, list[int] | int] = {"backwards": 0, "steps_after": [], "reduced_in": []}
backward, step = Optimization.backward, Optimization.step
reduce_scatter = dist.reduce_scatter_single


def counted_backward(self: Optimization, loss: torch.Tensor) -> None:
    record["backwards"] += 1
    backward(self, loss)


def counted_step(self: Optimization, d) -> torch.Tensor:
    record["steps_after"].append(record["backwards"])
    return step(self, d)


def counted_reduce_scatter(*args, **kwargs):
    record["reduced_in"].append(record["backwards"])  # inside the backward of that number
    return reduce_scatter(*args, **kwargs)


Optimization.backward, Optimization.step = counted_backward, counted_step
dist.reduce_scatter_single = counted_reduce_scatter  # FSDP2's reduce-scatter looks it up per call


def train(overrides: list[str]) -> None:
    """One run: train, then write its full parameters and its reduction record in output_dir."""
    record.update(backwards=0, steps_after=[], reduced_in=[])
    config = load_config(None, overrides)
    trainer = Trainer(config)
    trainer.train()
    rank = trainer.dist.rank
    state = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
        for name, p in trainer.policy.named_trainable_parameters().items()
    }
    # what this process holds of the denoiser (sharded: about 1/N of every parameter, frozen or not)
    params = list(trainer.policy.denoiser.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    record["held_fraction"] = local / sum(p.numel() for p in params)
    record["frozen_sharded"] = all(isinstance(p, DTensor) for p in params if not p.requires_grad)
    out = Path(config.output_dir)
    save_file(state, str(out / RANK_PARAMETERS.format(rank=rank)))
    (out / f"reductions_rank{rank}.json").write_text(json.dumps(record))


def split_runs(argv: list[str]) -> list[list[str]]:
    """Several runs in one launch (a launch costs more than a tiny run): their overrides
    separated by ``RUN_SEPARATOR``)."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == RUN_SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


torch.set_num_threads(1)
for overrides in split_runs(sys.argv[1:]):
    train(overrides)
end_processes()
