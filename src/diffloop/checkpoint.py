"""Atomic, complete checkpoints: a crash while saving never leaves one that resume would pick up.

Layout: ``output_dir/checkpoints/epoch_000012/`` holding
    trainable.safetensors   trainable parameters (LoRA or the full UNet), fp32
    ema.safetensors         their EMA (only with train.ema_decay), fp32
    optimizer.pt            optimizer state
    lr_scheduler.pt         LR scheduler state
    grad_scaler.pt          fp16 grad scaler state
    rng_rank<r>.pt          python / numpy / torch RNG states of each process
    state.json              epochs completed, optimizer steps, per-prompt reward statistics
    MANIFEST.json           sha256 of every file above; whether all saved tensors were finite
    COMPLETE                written last
A sharded run (fsdp.enabled: the trainable tensors are FSDP2 DTensors) writes the same checkpoint
with ``dcp/`` (``diffloop.sharded_checkpoint``: every process's shards of the trainable weights,
their optimizer state and their EMA, by ``torch.distributed.checkpoint``) in place of
trainable.safetensors, ema.safetensors and optimizer.pt; its manifest lists every file of ``dcp/``
too and records ``"sharded": {"processes": N}``. It resumes on any number of processes, sharded or
not (DCP reshards), and an unsharded checkpoint resumes into a sharded run (its full tensors are
distributed): :func:`load` with the run's ``TrainingTensors``.
Everything is first written to ``.tmp-epoch_000012`` and renamed into place (atomic on POSIX) only
after COMPLETE exists, so a directory named ``epoch_*`` is always whole. A save that fails or is
interrupted (:func:`writing`) removes its ``.tmp-`` directory and leaves the earlier checkpoints
as they were; a full disk is one DiskFullError line naming the directory and the space needed
(``diffloop.disk``).

What is loaded is verified (:func:`load`): every file's sha256 must match the manifest (bytes that
rotted or were truncated after the save) and every tensor of the model and optimizer state must be
finite; otherwise CheckpointError. :func:`load_newest_valid` then falls back to the previous
complete checkpoint, with a warning, and warns about incomplete ones (no COMPLETE marker) it
skips. Rotation (:func:`commit`) never deletes the newest checkpoint whose tensors were finite.

:func:`load_weights` (``diffloop sample`` / ``diffloop eval``) reads only the safetensors weights,
verified the same way, and never unpickles a ``.pt`` file (optimizer, schedulers, RNG states):
loading a checkpoint somebody sent you runs no code from it. Of a sharded checkpoint it reads the
``dcp/`` shards into whole tensors in one process (no process group), its pickled ``.metadata``
through an unpickler that builds DCP's metadata classes only. :func:`load_newest_valid_weights`
falls back from a run's newest checkpoint as :func:`load_newest_valid` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shlex
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffloop import disk
from diffloop.errors import DiffloopError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^epoch_(\d{6})$")
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"


class CheckpointError(DiffloopError, RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file and what to do."""


@dataclass
class TrainingState:
    """What the training loop needs besides tensors to continue exactly."""

    epochs_completed: int
    optimizer_steps: int
    stat_tracker: dict[str, Any] | None
    processes: int | None = None  # that wrote it (None: written before the count was recorded)


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


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``epoch_*`` directories without COMPLETE, and ``.tmp-*`` ones (an interrupted save)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and (
            p.name.startswith(".tmp-")
            or (CHECKPOINT_RE.match(p.name) and not (p / COMPLETE).is_file())
        )
    )


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_complete_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
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


def needed_bytes(output_dir: str | Path, *tensors: Any) -> int:
    """About the bytes a new checkpoint takes: those of its ``tensors`` (state dicts, nested), or
    the size of the newest complete checkpoint if that is larger (it holds the same parts)."""
    latest = latest_checkpoint(output_dir)
    return max(disk.tensor_bytes(tensors), disk.tree_bytes(latest) if latest else 0)


def resume_command(output_dir: str | Path) -> str:
    """The command that resumes the run in ``output_dir`` (its config is read from there)."""
    return shlex.join(["diffloop", "train", f"output_dir={output_dir}", "resume=true"])


def writing(
    output_dir: str | Path, epochs_completed: int, needed: int, *, is_main: bool
) -> AbstractContextManager[None]:
    """Wrap the save of checkpoint ``epochs_completed`` (about ``needed`` bytes): when it fails or
    is interrupted the main process removes its temporary directory (the earlier checkpoints are
    untouched), and a full disk becomes one DiskFullError line naming the checkpoint directory,
    the space needed, the checkpoint kept and the command that resumes."""
    latest = latest_checkpoint(output_dir)
    kept = (
        f"the earlier checkpoint {latest} is complete and kept"
        if latest is not None
        else "there is no earlier checkpoint"
    )
    return disk.written_aside(
        tmp_dir_for(output_dir, epochs_completed) if is_main else None,
        checkpoint_root(output_dir),
        needed,
        what=f"checkpoint {checkpoint_name(epochs_completed)}",
        kept=kept,
        then=f"resume with: {resume_command(output_dir)}",
    )


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
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """(Main process.) Model (and its EMA), optimizer, schedulers and state, then MANIFEST, then
    COMPLETE."""
    nonfinite = nonfinite_tensors(trainable) + nonfinite_tensors(
        _optimizer_tensors(optimizer.state_dict())
    )
    nonfinite += [f"ema.{k}" for k in nonfinite_tensors(ema or {})]
    _warn_nonfinite(tmp, nonfinite)
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / WEIGHTS))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_WEIGHTS))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _write_rest_and_seal(tmp, lr_scheduler, grad_scaler, state, finite=not nonfinite)


def _warn_nonfinite(tmp: Path, nonfinite: list[str]) -> None:
    if nonfinite:
        logger.warning(
            "checkpoint %s holds non-finite values (%s): it is saved, but resume will not load it "
            "and rotation keeps the last finite checkpoint",
            tmp.name,
            ", ".join(nonfinite[:4]),
        )


def _write_rest_and_seal(
    tmp: Path, lr_scheduler: Any, grad_scaler: Any, state: TrainingState, **manifest: Any
) -> None:
    """(Main process.) What every checkpoint holds besides its tensors (the LR schedule, the loss
    scaler, the training state), then :func:`seal` with ``manifest``."""
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    torch.save(grad_scaler.state_dict(), tmp / "grad_scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state.__dict__))
    seal(tmp, **manifest)


def seal(tmp: Path, *, finite: bool, **extra: Any) -> None:
    """(Main process.) MANIFEST (the sha256 of every file under ``tmp``, by relative path; whether
    the saved tensors were all finite; ``extra``), every file synced, then COMPLETE."""
    found = sorted(f for f in tmp.rglob("*") if f.is_file())
    files = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in found}
    (tmp / MANIFEST).write_text(json.dumps({"sha256": files, "finite": finite, **extra}, indent=1))
    for f in tmp.rglob("*"):  # data on disk before the rename makes the checkpoint visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    (tmp / COMPLETE).write_text("ok\n")


def save_sharded(
    output_dir: str | Path,
    epochs_completed: int,
    keep: int,
    *,
    tensors: Any,
    lr_scheduler: Any,
    grad_scaler: torch.amp.GradScaler,
    state: TrainingState,
    dist: Any,
) -> None:
    """(Every process: collectives.) Checkpoint ``epochs_completed`` of a sharded run: ``tensors``
    (``sharded_checkpoint.TrainingTensors``) into ``dcp/`` by every process, the rest as
    :func:`write_main` writes it, by the main process; written aside and committed (``keep``
    kept) as an unsharded checkpoint is. ``dist``: the run's ``Distributed``."""
    from diffloop import sharded_checkpoint as sharded

    tmp = tmp_dir_for(output_dir, epochs_completed)
    nonfinite = sorted({n for names in dist.gather_objects(sharded.local_nonfinite(tensors))
                        for n in names})  # fmt: skip
    if dist.is_main:
        _warn_nonfinite(tmp, nonfinite)
    local = disk.tensor_bytes(tensors.state_dict())
    needed = max(local * dist.world_size, needed_bytes(output_dir))
    with writing(output_dir, epochs_completed, needed, is_main=dist.is_main):
        if dist.is_main:
            begin(output_dir, epochs_completed)
        dist.wait()
        write_rank_rng(tmp, dist.rank)
        sharded.save(tmp / sharded.DCP_DIR, tensors)
        dist.wait()
        if dist.is_main:
            _write_rest_and_seal(
                tmp, lr_scheduler, grad_scaler, state,
                finite=not nonfinite, sharded={"processes": dist.world_size},
            )  # fmt: skip
            commit(output_dir, tmp, epochs_completed, keep)
    dist.wait()


def is_sharded(path: Path) -> bool:
    """Checkpoint ``path`` was written by a sharded run (its tensors are in ``dcp/``)."""
    return (path / "dcp").is_dir()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nonfinite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` holding a NaN or inf."""
    return [
        k
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]


def _optimizer_tensors(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict's per-parameter state as {"state.<param>.<key>": tensor}."""
    return {
        f"state.{p}.{k}": v
        for p, per in state_dict.get("state", {}).items()
        for k, v in per.items()
    }


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verify_files(path: Path, only: tuple[str, ...] | None = None) -> None:
    """CheckpointError unless every file the manifest lists (or those of it named in ``only``) has
    its recorded sha256."""
    manifest = _manifest(path)
    if manifest is None:
        if (path / MANIFEST).exists():
            raise CheckpointError(f"checkpoint '{path}': {MANIFEST} is unreadable")
        logger.warning(
            "checkpoint %s has no %s (saved by an older diffloop): its bytes are not verified",
            path,
            MANIFEST,
        )
        return
    for name, expected in manifest["sha256"].items():
        if only is not None and name not in only:
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file '{f}' is missing")
        if sha256_file(f) != expected:
            raise CheckpointError(
                f"checkpoint file '{f}' does not match its sha256 in {MANIFEST} (corrupt bytes)"
            )


def commit(output_dir: str | Path, tmp: Path, epochs_completed: int, keep: int) -> Path:
    """(Main process.) Rename into place, then delete all but the newest ``keep`` checkpoints."""
    final = checkpoint_root(output_dir) / checkpoint_name(epochs_completed)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    complete = list_complete_checkpoints(output_dir)
    finite = [p for p in complete if (_manifest(p) or {}).get("finite", False)]
    protected = finite[-1] if finite else None  # a run that went NaN keeps its last good state
    for old in complete[:-keep]:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path, loader):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing")
    try:
        return loader(path)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint file '{path}' is unreadable ({type(e).__name__}: {e})"
        ) from e


def load(path: Path, rank: int, tensors: Any = None) -> dict[str, Any]:
    """Read and verify a checkpoint directory into a dict of its parts (tensors on CPU).

    CheckpointError if a file is missing, unreadable, differs from its manifest sha256, or a model
    or optimizer tensor is non-finite.

    ``tensors`` (``sharded_checkpoint.TrainingTensors``; every process of a run that passes them
    calls this together): a sharded checkpoint is read into them in place (resharded: any process
    count, sharded or not), and so is an unsharded one when they are sharded; the parts
    ``trainable`` and ``optimizer`` are then None and ``ema`` is the restored EMA (None if the
    checkpoint has none). Without ``tensors`` a sharded checkpoint gives its whole trainable and EMA
    weights and no optimizer state (None).
    """
    verify_files(path)
    torch_load = lambda p: torch.load(p, map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{rank}.pt"
    state = _load(path / "state.json", lambda p: json.loads(p.read_text()))
    common = {
        "lr_scheduler": _load(path / "lr_scheduler.pt", torch_load),
        "grad_scaler": _load(path / "grad_scaler.pt", torch_load),
        # A resume on more processes than were saved: the extra ones reseed per epoch anyway.
        "rng": _load(rng_file, torch_load) if rng_file.exists() else None,
        "state": TrainingState(**state),
    }
    if is_sharded(path):
        return {**common, **_load_sharded(path, tensors)}
    parts = {
        "trainable": _load(path / WEIGHTS, lambda p: load_file(str(p))),
        "ema": _load(path / EMA_WEIGHTS, lambda p: load_file(str(p)))
        if (path / EMA_WEIGHTS).exists()
        else None,
        "optimizer": _load(path / "optimizer.pt", torch_load),
        **common,
    }
    nonfinite = nonfinite_tensors(parts["trainable"]) + nonfinite_tensors(
        _optimizer_tensors(parts["optimizer"])
    )
    nonfinite += [f"ema.{k}" for k in nonfinite_tensors(parts["ema"] or {})]
    if nonfinite:
        names = ", ".join(nonfinite[:4])
        raise CheckpointError(f"checkpoint '{path}' holds non-finite values in {names}")
    if tensors is not None and _sharded_run(tensors):
        from diffloop import sharded_checkpoint as sharded

        restored = sharded.load_full(
            tensors, parts["trainable"], parts["optimizer"], parts["ema"], path
        )
        parts.update(trainable=None, optimizer=None, ema=tensors.ema if restored else None)
    return parts


def _sharded_run(tensors: Any) -> bool:
    from diffloop import sharded_checkpoint as sharded

    return sharded.module_is_sharded(tensors.module)


def _load_sharded(path: Path, tensors: Any) -> dict[str, Any]:
    """A sharded checkpoint's tensors (:func:`load`). Whether they were finite is what the save
    recorded in the manifest (computed over every process's shards, and the bytes are verified
    against it), so every process decides alike before the collective read."""
    from diffloop import sharded_checkpoint as sharded

    if not (_manifest(path) or {}).get("finite", False):
        raise CheckpointError(f"checkpoint '{path}' holds non-finite values (recorded when saved)")
    directory = path / sharded.DCP_DIR
    try:
        if tensors is None:
            return {
                "trainable": sharded.read_full(directory, sharded.MODEL),
                "ema": sharded.read_full(directory, sharded.EMA) or None,
                "optimizer": None,
            }
        restored = sharded.load(directory, tensors)
    except DiffloopError:
        raise
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"checkpoint '{directory}' is unreadable ({type(e).__name__}: {str(e)[:300]})"
        ) from e
    return {"trainable": None, "optimizer": None, "ema": tensors.ema if restored else None}


def load_weights(path: Path, *, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of checkpoint ``path`` for inference: (state dict on CPU, the file it came from).

    ``ema``: the EMA weights when the checkpoint has them (a run with train.ema_decay evaluates and
    exports its EMA), else the trained weights. Only that safetensors file is read and checked
    (its manifest sha256, finite values); no pickle (optimizer, schedulers, RNG) is opened, so a
    damaged or untrusted ``.pt`` file cannot matter. Raises CheckpointError.
    """
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {COMPLETE} marker)")
    if is_sharded(path):
        return _load_sharded_weights(path, ema=ema)
    name = EMA_WEIGHTS if ema and (path / EMA_WEIGHTS).is_file() else WEIGHTS
    verify_files(path, only=(name,))
    weights = _load(path / name, lambda p: load_file(str(p)))
    nonfinite = nonfinite_tensors(weights)
    if nonfinite:
        raise CheckpointError(
            f"checkpoint '{path / name}' holds non-finite values in {', '.join(nonfinite[:4])}"
        )
    return weights, name


def _load_sharded_weights(path: Path, *, ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`load_weights` of a sharded checkpoint: its ``dcp/`` files verified, the EMA (or the
    trained) weights read whole in this process (``sharded_checkpoint.read_full``: no process
    group, no pickle but DCP's metadata classes)."""
    from diffloop import sharded_checkpoint as sharded

    manifest = _manifest(path) or {}
    dcp_files = tuple(n for n in manifest.get("sha256", {}) if n.startswith(sharded.DCP_DIR + "/"))
    verify_files(path, only=dcp_files)
    if not manifest.get("finite", False):
        raise CheckpointError(f"checkpoint '{path}' holds non-finite values (recorded when saved)")
    directory = path / sharded.DCP_DIR
    try:
        weights = sharded.read_full(directory, sharded.EMA) if ema else {}
        name = f"{sharded.DCP_DIR} ({sharded.EMA if weights else sharded.MODEL})"
        weights = weights or sharded.read_full(directory, sharded.MODEL)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"checkpoint '{directory}' is unreadable ({type(e).__name__}: {str(e)[:300]})"
        ) from e
    if not weights:
        raise CheckpointError(f"checkpoint '{directory}' holds no trainable weights")
    return weights, name


def load_newest_valid(
    output_dir: str | Path, rank: int, tensors: Any = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint that loads and verifies; older ones are fallbacks (warned).
    ``tensors``: as :func:`load` takes them (a run's, to restore in place).

    None if there is no complete checkpoint; CheckpointError (naming each failure) if none is valid.
    """
    return _newest_that_loads(
        output_dir,
        lambda path: load(path, rank, tensors),
        fix="restore one from a backup, or start afresh with overwrite=true",
    )


def load_newest_valid_weights(
    output_dir: str | Path, *, ema: bool = True
) -> tuple[Path, dict[str, torch.Tensor], str]:
    """(checkpoint, state dict, file name) of the newest complete checkpoint whose weights verify
    (:func:`load_weights`), for ``diffloop sample`` / ``diffloop eval`` of a run: an older one is
    the fallback, with the warning a resume gives. CheckpointError naming what exists and what to
    do when no checkpoint is complete or none has valid weights."""
    found = _newest_that_loads(
        output_dir,
        lambda path: load_weights(path, ema=ema),
        fix="restore one from a backup, pass another run, or retrain (diffloop train "
        f"output_dir={output_dir} overwrite=true)",
    )
    if found is None:
        incomplete = ", ".join(p.name for p in incomplete_checkpoints(output_dir))
        raise CheckpointError(
            f"run directory '{output_dir}' has no complete checkpoint"
            + (f" (only incomplete ones: {incomplete})" if incomplete else "")
            + "; train it first, or resume it to write one: diffloop train "
            f"output_dir={output_dir} resume=true"
        )
    path, (weights, name) = found
    return path, weights, name


def _newest_that_loads(output_dir: str | Path, load_one, fix: str) -> tuple[Path, Any] | None:
    """(path, ``load_one(path)``) of the newest complete checkpoint for which ``load_one`` raises
    no CheckpointError; each failure is warned ("falling back to the previous checkpoint"), and so
    is each incomplete checkpoint skipped. None if none is complete; CheckpointError (each failure,
    then ``fix``) if none loads."""
    for p in incomplete_checkpoints(output_dir):
        logger.warning(
            "skipping incomplete checkpoint %s (no %s marker: a save that did not finish)",
            p,
            COMPLETE,
        )
    candidates = list_complete_checkpoints(output_dir)[::-1]
    failures = []
    for path in candidates:
        try:
            return path, load_one(path)
        except CheckpointError as e:
            failures.append(str(e))
            logger.warning("%s; falling back to the previous checkpoint", e)
    if not candidates:
        return None
    raise CheckpointError(
        f"no checkpoint in {checkpoint_root(output_dir)} is valid ({'; '.join(failures)}); {fix}"
    )
