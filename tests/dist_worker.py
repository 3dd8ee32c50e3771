"""Run by torchrun (``diffloop.testing.runs.two_processes_and_one``): train, then save this rank's
trainable parameters. tests/ goes on ``sys.path`` for the user-style rewards (``reward_fns``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from safetensors.torch import save_file

from diffloop.config import load_config
from diffloop.distributed import end_processes
from diffloop.testing.runs import RANK_PARAMETERS
from diffloop.trainer import Trainer

torch.set_num_threads(1)
config = load_config(None, sys.argv[1:])
trainer = Trainer(config)
trainer.train()
rank = trainer.dist.rank
state = {k: v.contiguous() for k, v in trainer.policy.trainable_state_dict().items()}
save_file(state, str(Path(config.output_dir) / RANK_PARAMETERS.format(rank=rank)))
del trainer  # freed before the process group ends (end_processes)
end_processes()
