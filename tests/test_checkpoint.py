"""Checkpoints are verified when loaded, fall back to the previous good one, and are never all lost;
a directory holding any part of a run is not clobbered."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffloop import checkpoint
from diffloop.checkpoint import CheckpointError, latest_checkpoint, list_complete_checkpoints
from diffloop.cli import main
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import comparable, tiny_overrides


def save(out: Path, epoch: int, value: float = 1.0, keep: int = 10) -> Path:
    """A real checkpoint of a 4-element parameter (set to ``value``) after one AdamW step."""
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    optimizer.step()
    with torch.no_grad():
        param.fill_(value)
    tmp = checkpoint.begin(out, epoch)
    checkpoint.write_rank_rng(tmp, 0)
    checkpoint.write_main(
        tmp,
        trainable={"w": param.detach()},
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        grad_scaler=torch.amp.GradScaler("cpu", enabled=False),
        state=checkpoint.TrainingState(
            epochs_completed=epoch, optimizer_steps=epoch, stat_tracker=None
        ),
    )
    return checkpoint.commit(out, tmp, epoch, keep)


def corrupt_tensor_bytes(path: Path) -> None:
    """Overwrite the last 8 bytes of trainable.safetensors (tensor data) with 0xFF: two float32
    NaNs."""
    f = path / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-8:] = b"\xff" * 8
    f.write_bytes(bytes(data))


def test_manifest_holds_each_files_sha256_and_a_clean_checkpoint_loads(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    files = {p.name for p in path.iterdir()} - {checkpoint.MANIFEST, checkpoint.COMPLETE}
    assert set(manifest["sha256"]) == files and manifest["finite"] is True
    assert torch.equal(checkpoint.load(path, rank=0)["trainable"]["w"], torch.ones(4))


def test_corrupt_tensor_bytes_are_refused(tmp_path):
    path = save(tmp_path, 1)
    corrupt_tensor_bytes(path)
    assert torch.isnan(
        load_file(str(path / "trainable.safetensors"))["w"]
    ).any()  # it would load, as NaN
    with pytest.raises(CheckpointError, match="trainable.safetensors' does not match its sha256"):
        checkpoint.load(path, rank=0)


def test_non_finite_tensors_are_refused_even_with_matching_checksums(tmp_path):
    path = save(tmp_path, 1, value=float("inf"))
    assert json.loads((path / checkpoint.MANIFEST).read_text())["finite"] is False
    with pytest.raises(CheckpointError, match="non-finite values in w"):
        checkpoint.load(path, rank=0)


def test_load_falls_back_to_the_previous_checkpoint_and_warns_about_incomplete_ones(
    tmp_path, caplog
):
    save(tmp_path, 1, value=1.0)
    corrupt_tensor_bytes(save(tmp_path, 2, value=2.0))
    half = checkpoint.checkpoint_root(tmp_path) / "epoch_000003"
    half.mkdir()  # no COMPLETE marker (copied halfway, or files deleted)
    with caplog.at_level(logging.WARNING, logger="diffloop.checkpoint"):
        path, parts = checkpoint.load_newest_valid(tmp_path, rank=0)
    assert path.name == "epoch_000001" and torch.equal(parts["trainable"]["w"], torch.ones(4))
    assert "skipping incomplete checkpoint" in caplog.text and "epoch_000003" in caplog.text
    assert (
        "epoch_000002" in caplog.text and "falling back to the previous checkpoint" in caplog.text
    )


def test_no_valid_checkpoint_is_an_error_naming_each(tmp_path):
    corrupt_tensor_bytes(save(tmp_path, 1))
    with pytest.raises(CheckpointError, match="no checkpoint in .* is valid .*epoch_000001"):
        checkpoint.load_newest_valid(tmp_path, rank=0)
    assert checkpoint.load_newest_valid(tmp_path / "elsewhere", rank=0) is None


def test_rotation_never_deletes_the_newest_finite_checkpoint(tmp_path):
    save(tmp_path, 1, value=1.0, keep=1)
    save(tmp_path, 2, value=float("nan"), keep=1)
    save(tmp_path, 3, value=float("nan"), keep=1)
    assert [p.name for p in list_complete_checkpoints(tmp_path)] == ["epoch_000001", "epoch_000003"]
    save(tmp_path, 4, value=4.0, keep=1)  # finite again: the old good one may go now
    assert [p.name for p in list_complete_checkpoints(tmp_path)] == ["epoch_000004"]


# ----------------------------------------------------------------------------- in the trainer


def test_resume_skips_a_corrupt_checkpoint_and_continues_exactly(tiny_sd, tmp_path, caplog):
    assert main(["train", *tiny_overrides(tiny_sd, tmp_path / "full", num_epochs=3)]) == 0
    out = tmp_path / "run"
    args = tiny_overrides(tiny_sd, out, num_epochs=3)
    assert main(["train", *args]) == 0
    corrupt_tensor_bytes(latest_checkpoint(out))  # epoch_000003: NaN LoRA weights
    with caplog.at_level(logging.WARNING, logger="diffloop.checkpoint"):
        assert main(["train", *args, "resume=true"]) == 0
    assert "epoch_000003" in caplog.text and "falling back" in caplog.text
    assert [p.name for p in list_complete_checkpoints(out)] == ["epoch_000002", "epoch_000003"]
    checkpoint.load(latest_checkpoint(out), rank=0)  # rewritten, and valid
    rows = read_metrics(out / "metrics.jsonl")
    assert comparable(rows) == comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))


@pytest.mark.parametrize("entry", ["lora", "model", "metrics.jsonl"])
def test_a_directory_holding_any_part_of_a_run_is_not_clobbered(tiny_sd, tmp_path, capsys, entry):
    out = tmp_path / "run"
    (out / entry).parent.mkdir(parents=True, exist_ok=True)
    if entry.endswith(".jsonl"):
        (out / entry).write_text('{"epoch": 0}\n')
    else:
        (out / entry).mkdir()
    assert main(["train", *tiny_overrides(tiny_sd, out, num_epochs=1)]) == 2
    assert f"already holds a run ({entry})" in capsys.readouterr().err
    assert (out / entry).exists()


def test_overwrite_replaces_the_old_runs_record(tiny_sd, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_sd, out, num_epochs=2)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["train", *tiny_overrides(tiny_sd, out, num_epochs=1), "overwrite=true"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [0]
    assert [p.name for p in list_complete_checkpoints(out)] == ["epoch_000001"]
    assert len((out / "sessions.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"  # not part of the run's record
