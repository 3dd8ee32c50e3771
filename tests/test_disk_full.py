"""A full disk while saving a checkpoint or the export is one line naming the directory and the
space needed; the earlier checkpoint stays complete and loadable, no truncated file is left as the
export, and `resume=true` afterwards finishes the run. Tested by making the writers fail midway (a
partial file, then ENOSPC) and, where this machine lets us mount one, on a real small tmpfs."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffloop import checkpoint
from diffloop.checkpoint import resume_command
from diffloop.cli import main
from diffloop.testing.runs import shapes_overrides


def one_line_error(err: str) -> str:
    """The one error line of stderr (the model loader's progress bar may come before it)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum("error" in x.lower() for x in lines) == 1, err[-3000:]
    assert lines[-1].startswith("diffloop: error: no space left on device in ")
    return lines[-1]


def full_disk(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def assert_checkpoint_complete(path: Path, epochs: int) -> None:
    assert path.name == f"epoch_{epochs:06d}"
    assert checkpoint.load(path, rank=0)["state"].epochs_completed == epochs  # verified, loadable


def assert_no_partial_dirs(out: Path) -> None:
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


# ----------------------------------------------------------------------------- injected


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_earlier_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = shapes_overrides(out, num_epochs=2)
    real_save = torch.save

    def save_until_full(obj, f, *a, **k):
        if Path(f).parent.name == ".tmp-epoch_000002" and Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"\0" * 1000)  # partly written, then the disk is full
            raise full_disk(f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_full)
    assert main(["train", *args]) == 2
    line = one_line_error(capsys.readouterr().err)
    root = out / "checkpoints"
    earlier = root / "epoch_000001"
    assert line.startswith(
        f"diffloop: error: no space left on device in {root} while writing checkpoint "
        "epoch_000002: it needs about "
    )
    from diffloop.disk import format_bytes

    needed = checkpoint.needed_bytes(out)  # the size of the complete earlier checkpoint
    assert f"it needs about {format_bytes(needed)}, " in line
    assert f"the earlier checkpoint {earlier} is complete and kept" in line
    assert line.endswith(f"resume with: {resume_command(out)}")
    assert [p.name for p in root.iterdir()] == ["epoch_000001"]  # the partial save is gone
    assert_checkpoint_complete(earlier, 1)
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert main(["train", *args, "resume=true"]) == 0
    assert_checkpoint_complete(checkpoint.latest_checkpoint(out), 2)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_disk_full_during_the_export_leaves_no_truncated_file(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    lora = out / "lora"
    real_save = safetensors.torch.save_file

    def save_until_full(tensors, filename, *a, **k):
        if Path(filename).name == "pytorch_lora_weights.safetensors":
            Path(filename).write_bytes(b"\0" * 100)  # truncated, then the disk is full
            raise full_disk(filename)
        return real_save(tensors, filename, *a, **k)

    # No export yet: nothing is left where the export goes.
    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    assert main(["train", *shapes_overrides(out, num_epochs=1)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(
        f"diffloop: error: no space left on device in {lora} while writing the LoRA export: "
    )
    kept = out / "checkpoints" / "epoch_000001"
    assert f"the run's last checkpoint {kept} is kept" in line
    assert line.endswith(f"export it again with: {resume_command(out)}")
    assert not lora.exists()
    assert_no_partial_dirs(out)
    assert_checkpoint_complete(kept, 1)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert main(["train", *shapes_overrides(out, num_epochs=1), "resume=true"]) == 0
    first = {p.name: p.read_bytes() for p in lora.iterdir()}
    assert load_file(str(lora / "pytorch_lora_weights.safetensors"))

    # An earlier export: it stays exactly as it was.
    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    assert main(["train", *shapes_overrides(out, num_epochs=2), "resume=true"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"and the earlier export in {lora}" in line
    assert {p.name: p.read_bytes() for p in lora.iterdir()} == first
    assert_no_partial_dirs(out)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert main(["train", *shapes_overrides(out, num_epochs=2), "resume=true"]) == 0
    assert load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert {p.name: p.read_bytes() for p in lora.iterdir()} != first  # the epoch-2 weights


def test_each_writers_way_of_saying_the_disk_is_full(tmp_path):
    """open().write: OSError(ENOSPC); safetensors: its text; torch.save: a short write (errno lost),
    a full disk only when less is free than the write needs."""
    from diffloop.disk import is_disk_full

    assert is_disk_full(full_disk("f"), tmp_path, 1)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path, 1)
    serializing = Exception(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert is_disk_full(serializing, tmp_path, 1)
    short_write = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    )
    assert is_disk_full(short_write, tmp_path, needed=1 << 62)
    assert not is_disk_full(short_write, tmp_path, needed=1)  # room enough: some other failure
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, 1 << 62)
    try:
        try:
            raise full_disk("f")
        except OSError as e:
            raise RuntimeError("while saving") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped, tmp_path, 1)  # the cause counts


# ----------------------------------------------------------------------------- a real small disk


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only); skips the test where that fails."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.mark.slow
def test_a_real_full_disk_during_a_checkpoint_and_then_the_export(tmp_path, capsys):
    # The tiny run's checkpoint takes 332 KiB on a tmpfs (an 80 KB LoRA, its 220 KB AdamW state),
    # its export 172 KiB, the rest of the record 20 KiB: 600 KiB hold one checkpoint but not two
    # (torch.save of optimizer.pt runs out), 770 KiB two checkpoints (684) but not the export (856).
    with small_disk(tmp_path / "disk", "600k") as disk:
        out = disk / "run"
        args = shapes_overrides(out, num_epochs=2)
        assert main(["train", *args]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"in {out / 'checkpoints'} while writing checkpoint epoch_000002" in line
        assert_checkpoint_complete(checkpoint.latest_checkpoint(out), 1)
        assert_no_partial_dirs(out)
        grow(disk, "770k")
        assert main(["train", *args, "resume=true"]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"in {out / 'lora'} while writing the LoRA export" in line
        assert not (out / "lora").exists()
        assert_no_partial_dirs(out)
        assert_checkpoint_complete(checkpoint.latest_checkpoint(out), 2)
        grow(disk, "2m")
        assert main(["train", *args, "resume=true"]) == 0
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
