"""Atomic, complete checkpoints: a crash while saving never leaves one that resume would pick up.

Layout: ``output_dir/checkpoints/epoch_000012/`` holding
    trainable.safetensors   trainable parameters (LoRA or the full UNet), fp32
    optimizer.pt            optimizer state
    lr_scheduler.pt         LR scheduler state
    grad_scaler.pt          fp16 grad scaler state
    rng_rank<r>.pt          python / numpy / torch RNG states of each process
    state.json              epochs completed, optimizer steps, per-prompt reward statistics
    COMPLETE                written last
Everything is first written to ``.tmp-epoch_000012`` and renamed into place (atomic on POSIX) only
after COMPLETE exists, so a directory named ``epoch_*`` is always whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffloop.errors import DiffloopError

CHECKPOINT_RE = re.compile(r"^epoch_(\d{6})$")
COMPLETE = "COMPLETE"


class CheckpointError(DiffloopError, RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file and what to do."""


@dataclass
class TrainingState:
    """What the training loop needs besides tensors to continue exactly."""

    epochs_completed: int
    optimizer_steps: int
    stat_tracker: dict[str, Any] | None


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(epochs_completed: int) -> str:
    return f"epoch_{epochs_completed:06d}"


def list_complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_dir_for(output_dir: str | Path, epochs_completed: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-{checkpoint_name(epochs_completed)}"


def begin(output_dir: str | Path, epochs_completed: int) -> Path:
    """(Main process.) A fresh temporary directory for the checkpoint being written."""
    tmp = tmp_dir_for(output_dir, epochs_completed)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_rng(tmp: Path, rank: int) -> None:
    """(Every process.) Its RNG states, into the temporary directory."""
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def write_main(
    tmp: Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    grad_scaler: torch.amp.GradScaler,
    state: TrainingState,
) -> None:
    """(Main process.) Model, optimizer, schedulers and state, then COMPLETE."""
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    torch.save(grad_scaler.state_dict(), tmp / "grad_scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state.__dict__))
    for f in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / COMPLETE).write_text("ok\n")


def commit(output_dir: str | Path, tmp: Path, epochs_completed: int, keep: int) -> Path:
    """(Main process.) Rename into place, then delete all but the newest ``keep`` checkpoints."""
    final = checkpoint_root(output_dir) / checkpoint_name(epochs_completed)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path, loader):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        return loader(path)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint file '{path}' is unreadable ({type(e).__name__}: {e}). Move the directory "
            f"'{path.parent}' aside to resume from the previous checkpoint."
        ) from e


def load(path: Path, rank: int) -> dict[str, Any]:
    """Read a checkpoint directory into a dict of its parts (tensors on CPU)."""
    torch_load = lambda p: torch.load(p, map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{rank}.pt"
    state = _load(path / "state.json", lambda p: json.loads(p.read_text()))
    return {
        "trainable": _load(path / "trainable.safetensors", lambda p: load_file(str(p))),
        "optimizer": _load(path / "optimizer.pt", torch_load),
        "lr_scheduler": _load(path / "lr_scheduler.pt", torch_load),
        "grad_scaler": _load(path / "grad_scaler.pt", torch_load),
        # A resume on more processes than were saved: the extra ones reseed per epoch anyway.
        "rng": _load(rng_file, torch_load) if rng_file.exists() else None,
        "state": TrainingState(**state),
    }
