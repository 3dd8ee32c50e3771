"""``diffloop sample`` / ``diffloop eval`` read only the safetensors weights of a checkpoint.

No pickle (optimizer, LR schedule, grad scaler, RNG states) is opened: a run whose .pt files are
garbage still samples and evaluates, torch.load is never called, and the weights themselves are
still verified (sha256 from the manifest). A run with train.ema_decay samples its EMA weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffloop.checkpoint import (
    EMA_WEIGHTS,
    WEIGHTS,
    CheckpointError,
    latest_checkpoint,
    load_weights,
)
from diffloop.cli import main
from diffloop.config import load_config
from diffloop.testing.runs import tiny_overrides
from diffloop.trainer import Trainer

PICKLES = ("optimizer.pt", "lr_scheduler.pt", "grad_scaler.pt", "rng_rank0.pt")


@pytest.fixture(scope="module")
def run_dir(tiny_sd, tmp_path_factory):
    """A finished one-epoch tiny run with EMA, whose pickled checkpoint files are then garbage."""
    out = tmp_path_factory.mktemp("weights_only") / "run"
    config = load_config(None, tiny_overrides(tiny_sd, out, num_epochs=1, **{
        "sample.num_steps": 2, "train.ema_decay": 0.5, "train.learning_rate": 0.05}))  # fmt: skip
    Trainer(config).train()
    for name in PICKLES:
        (latest_checkpoint(out) / name).write_bytes(b"not a pickle \x80\x04 at all")
    return out


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_sample_from_a_run_with_garbage_optimizer_files(run_dir, tmp_path, no_unpickling, capsys):
    out = tmp_path / "samples"
    argv = ["sample", str(run_dir), "--prompt", "a cat", "--num-per-prompt", "2", "--steps", "2",
            "--output", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "grid.png").is_file() and (out / "0001.png").is_file()


def test_eval_of_a_run_with_garbage_optimizer_files(run_dir, tmp_path, no_unpickling, capsys):
    argv = ["eval", str(run_dir), "--prompts", "shapes/val_pair", "--num-prompts", "1",
            "--images-per-prompt", "1", "--reward", "jpeg_compressibility", "--steps", "2",
            "--output", str(tmp_path / "eval"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_load_weights_prefers_the_ema_and_can_take_the_trained_weights(run_dir, no_unpickling):
    path = latest_checkpoint(run_dir)
    ema, name = load_weights(path)
    trained, other = load_weights(path, ema=False)
    assert (name, other) == (EMA_WEIGHTS, WEIGHTS)
    assert ema.keys() == trained.keys() and any(not torch.equal(ema[k], trained[k]) for k in ema)
    assert all(torch.equal(ema[k], v) for k, v in load_file(str(path / EMA_WEIGHTS)).items())


def test_corrupt_weights_are_still_refused(run_dir, tmp_path, no_unpickling):
    import shutil

    copy = tmp_path / "epoch_000001"
    shutil.copytree(latest_checkpoint(run_dir), copy)
    data = bytearray((copy / EMA_WEIGHTS).read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN in the last float
    (copy / EMA_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ema.safetensors' does not match its sha256"):
        load_weights(copy)
