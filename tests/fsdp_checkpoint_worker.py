"""Run by torchrun (tests/test_fsdp_checkpoint.py): several runs in one launch (a launch costs
more than a tiny run), their arguments separated by ``---``. Besides ``key=value`` overrides a
run's arguments may hold ``@kill=E`` (the run dies when epoch E starts, after the checkpoints of
the earlier epochs: ``diffloop.testing.runs.killed_at_epoch``) and ``@copy=DIR`` (afterwards the
main process copies the run's output_dir to DIR). A run that finishes writes ``FINAL_PARAMETERS``
into its output_dir: its trainable parameters, gathered whole from the shards (main process), and
``STARTED`` (the epoch this launch started at: a resumed run's first)."""

from __future__ import annotations

import os
import shutil
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
from diffloop.testing.runs import killed_at_epoch
from diffloop.trainer import Trainer

FINAL_PARAMETERS = "final_params.safetensors"
STARTED = "started_at_epoch.txt"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
        for name, p in trainer.policy.named_trainable_parameters().items()
    }


def run(args: list[str]) -> None:
    kill = next((int(a.split("=", 1)[1]) for a in args if a.startswith("@kill=")), None)
    copies = [a.split("=", 1)[1] for a in args if a.startswith("@copy=")]
    config = load_config(None, [a for a in args if not a.startswith("@")])
    if kill is not None:
        with killed_at_epoch(kill):
            Trainer(config).train()
    else:
        trainer = Trainer(config)
        trainer.train()
        params = full_parameters(trainer)
        if trainer.dist.is_main:
            save_file(params, str(Path(config.output_dir) / FINAL_PARAMETERS))
            (Path(config.output_dir) / STARTED).write_text(str(trainer.start_epoch))
    barrier()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for target in copies if rank == 0 else []:
        shutil.copytree(config.output_dir, target)
    barrier()


def split_runs(argv: list[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "---":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


if __name__ == "__main__":
    torch.set_num_threads(1)
    for overrides in split_runs(sys.argv[1:]):
        run(overrides)
    end_processes()
