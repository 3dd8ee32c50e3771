"""The tensors of a sharded run's checkpoint, through ``torch.distributed.checkpoint`` (DCP).

Only ``diffloop.checkpoint`` (and the trainer's export) import this module. Under FSDP2
(``fsdp.enabled``) the trainable parameters, their AdamW moments and their EMA are DTensors: each
process holds 1/N of every tensor. A checkpoint then keeps them as DCP writes them, in the
checkpoint's ``dcp/`` directory: every process writes its own shards (``__<rank>_0.distcp``) and
the main process the ``.metadata`` that maps each tensor's global shape onto the shard files. Keys
(flattened): ``training.model.<parameter>``, ``training.optimizer.state.<parameter>.<moment>`` and
``training.optimizer.param_groups``, ``training.ema.<parameter>``; only trainable parameters (a
LoRA's frozen base is the pretrained model, loaded from model.pretrained as always).

Resharding: a DCP load reads each process's part of every tensor from whichever shard files hold
it, so a checkpoint written by N processes loads into M (1 -> 2, 2 -> 1, ...), and into an unsharded
run (plain tensors get the whole tensor). The other way, an unsharded checkpoint's full tensors are
distributed onto the DTensors of a sharded run (:func:`load_full`). ``torch.distributed.checkpoint
.state_dict`` (``get_state_dict`` / ``set_state_dict``) names the optimizer state by parameter name,
not by index, which is what makes it independent of the process count.

:func:`read_full` reads a sharded checkpoint's weights as whole tensors in a single process, with no
process group (``diffloop sample`` / ``diffloop eval``); :func:`full_state_dict` gathers a live
sharded module's weights (a collective) for the export. DCP's ``.metadata`` is a pickle: it is read
by an unpickler that builds only DCP's metadata classes, torch sizes and dtypes (:class:`Reader`),
and the tensors are read with ``torch.load(weights_only=True)``, so reading weights runs no code
from the checkpoint (the optimizer's ``param_groups``, pickled objects, are read only on resume).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

DCP_DIR = "dcp"
KEY = "training"  # the one Stateful entry of the DCP state dict
MODEL, OPTIMIZER, EMA = "model", "optimizer", "ema"
# Trainable parameters only: a LoRA run's frozen base is not checkpointed.
OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Setting them: the frozen ones are absent on purpose (the names were checked against the model).
SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def is_sharded(tensor: Any) -> bool:
    """``tensor`` is a DTensor (a shard of a tensor spread over the processes)."""
    return isinstance(tensor, DTensor)


def module_is_sharded(module: torch.nn.Module) -> bool:
    """Any parameter of ``module`` is a DTensor (FSDP2 has sharded it)."""
    return any(is_sharded(p) for p in module.parameters())


@dataclass
class TrainingTensors:
    """What a checkpoint restores in place: the trained module (its trainable parameters, named as
    in ``module.named_parameters()``), the optimizer over them, and the EMA shadow ({name: tensor},
    None without train.ema_decay)."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        """(DCP's Stateful) {model: {name: tensor}, optimizer: {state, param_groups}, ema}."""
        model, optimizer = get_state_dict(self.module, self.optimizer, options=OPTIONS)
        out = {MODEL: model, OPTIMIZER: optimizer}
        if self.ema is not None:
            out[EMA] = self.ema
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """(DCP's Stateful) After DCP has filled :meth:`state_dict`'s tensors: into the module and
        the optimizer (the EMA shadow was filled in place)."""
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state[MODEL],
            optim_state_dict=state[OPTIMIZER],
            options=SET_OPTIONS,
        )


# What DCP's .metadata pickle is made of (torch 2.13); anything else is refused.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class Reader(dcp.FileSystemReader):
    """DCP's file reader whose ``.metadata`` unpickler builds nothing but DCP's metadata."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("a checkpoint's .metadata holds no DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save(directory: Path, tensors: TrainingTensors) -> None:
    """(Every process: a collective.) Write ``tensors`` into the DCP directory ``directory``."""
    dcp.save({KEY: tensors}, checkpoint_id=str(directory))


def stored_tensors(directory: Path) -> dict[str, TensorStorageMetadata]:
    """{flattened key: its global shape and dtype} of a DCP directory (read from ``.metadata``)."""
    metadata = Reader(str(directory)).read_metadata()
    return {
        k: m
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def stored_part(directory: Path, part: str) -> dict[str, TensorStorageMetadata]:
    """{parameter name: metadata} of one part (``MODEL`` or ``EMA``) of a DCP directory."""
    prefix = f"{KEY}.{part}."
    return {
        k[len(prefix) :]: m for k, m in stored_tensors(directory).items() if k.startswith(prefix)
    }


def load(directory: Path, tensors: TrainingTensors) -> bool:
    """(Every process: a collective.) Fill ``tensors`` from the DCP directory ``directory``,
    resharded onto this run's processes. Returns whether the EMA was restored (False when the
    checkpoint has none, or the run keeps none). Names or shapes that differ from the checkpoint's
    raise ``CheckpointMismatchError`` before anything is read."""
    stored = stored_part(directory, MODEL)
    check_matches(tensors.module, {n: tuple(m.size) for n, m in stored.items()}, directory.parent)
    with_ema = tensors.ema is not None and bool(stored_part(directory, EMA))
    target = tensors if with_ema else TrainingTensors(tensors.module, tensors.optimizer)
    dcp.load({KEY: target}, checkpoint_id=str(directory))
    return with_ema


def check_matches(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """``CheckpointMismatchError`` (one line) unless ``shapes`` ({name: global shape}, a
    checkpoint's trainable tensors) names exactly ``module``'s trainable parameters, shaped as they
    are (another run's checkpoint, other lora.* settings)."""
    from diffloop.policies.base import CheckpointMismatchError

    params = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(shapes), set(shapes) - set(params)
    reshaped = [n for n in set(params) & set(shapes) if shapes[n] != params[n]]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(reshaped)} reshaped parameters (e.g. "
            f"{sorted(missing or unexpected or reshaped)[:3]}); was it written with other lora.* "
            "or model.* settings?"
        )


def load_full(
    tensors: TrainingTensors,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    ema: dict[str, torch.Tensor] | None,
    where: Path,
) -> bool:
    """(Every process: a collective.) An unsharded checkpoint's full tensors into the sharded
    ``tensors``: ``trainable`` ({name: tensor}), ``optimizer`` (``Optimizer.state_dict()``: state
    keyed by parameter index, in the order of the trainable parameters, which both runs share) and
    ``ema``, from checkpoint ``where``. Each process keeps its own shard of each. Returns whether
    the EMA was restored."""
    check_matches(tensors.module, {n: tuple(t.shape) for n, t in trainable.items()}, where)
    names = [n for n, p in tensors.module.named_parameters() if p.requires_grad]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer["param_groups"]]
    by_name = {
        "state": {names[i]: s for i, s in optimizer["state"].items()},
        "param_groups": groups,
    }
    set_state_dict(
        tensors.module,
        tensors.optimizer,
        model_state_dict=trainable,
        optim_state_dict=by_name,
        options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False),
    )
    if tensors.ema is None or ema is None:
        return False
    for name, shadow in tensors.ema.items():
        full = ema[name].to(shadow.dtype)
        shadow.copy_(
            distribute_tensor(full, shadow.device_mesh, shadow.placements)
            if is_sharded(shadow)
            else full
        )
    return True


def local_nonfinite(tensors: TrainingTensors) -> list[str]:
    """Names of the tensors whose shard on this process holds a NaN or inf (model, optimizer state,
    EMA); the caller combines the processes' answers."""
    state = tensors.state_dict()
    flat = dict(state[MODEL])
    flat.update({f"ema.{k}": v for k, v in (state.get(EMA) or {}).items()})
    for name, per in state[OPTIMIZER].get("state", {}).items():
        flat.update({f"state.{name}.{k}": v for k, v in per.items()})
    return [k for k, v in flat.items() if _local(v).is_floating_point() and not _finite(v)]


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def _finite(t: Any) -> bool:
    return not isinstance(t, torch.Tensor) or bool(torch.isfinite(_local(t)).all())


def read_full(directory: Path, part: str) -> dict[str, torch.Tensor]:
    """One part (``MODEL`` or ``EMA``) of a DCP directory as whole tensors on the CPU, read in this
    process alone (no process group: ``diffloop sample`` / ``diffloop eval``). {} if absent."""
    prefix = f"{KEY}.{part}."
    found = {k: m for k, m in stored_tensors(directory).items() if k.startswith(prefix)}
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in found.items()}
    if state:
        with warnings.catch_warnings():  # "no process group: loading in one process", as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=Reader(str(directory)), no_dist=True)
    return {k[len(prefix) :]: v for k, v in state.items()}


def full_state_dict(
    module: torch.nn.Module, keep: Callable[[str], bool], *, is_main: bool
) -> dict[str, torch.Tensor]:
    """(Every process: a collective.) ``module.state_dict()``'s entries whose name ``keep`` accepts,
    as whole tensors on the CPU of the main process ({} on the others). Each sharded tensor is
    all-gathered in turn, so a process holds one whole tensor at a time besides the result."""
    out = {}
    for name, tensor in module.state_dict().items():
        if not keep(name):
            continue
        full = tensor.full_tensor() if is_sharded(tensor) else tensor
        if is_main:
            out[name] = full.detach().cpu().clone()
    return out


def unsharded_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """(Main process.) A plain copy of the diffusers model ``module`` (FSDP2 made it a subclass of
    its own class) holding ``state`` (:func:`full_state_dict` of every entry), built on the meta
    device so no second random initialisation is paid; buffers outside the state dict (non-
    persistent ones, never sharded) are taken from ``module``."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls.from_config(module.config)
    copy.load_state_dict(state, strict=True, assign=True)
    buffers = dict(module.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, buffers[name].detach().cpu().clone(),
                                                      persistent=False)  # fmt: skip
    return copy.eval().requires_grad_(False)


def export_weights(policy: Any, lora: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """(Every process: a collective.) What the export of a sharded run writes, gathered whole on
    the main process ({} on the others): the adapted module's LoRA weights (``lora``), else its
    whole state dict (full fine-tuning)."""
    keep = (lambda name: "lora_" in name) if lora else (lambda name: True)
    return full_state_dict(policy.denoiser, keep, is_main=is_main)


@contextlib.contextmanager
def with_denoiser(policy: Any, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """(Main process.) Inside the block the policy's denoiser (its attribute and pipeline
    component ``policy.lora_component``) is :func:`unsharded_copy` holding ``state``; the sharded
    one afterwards."""
    name = policy.lora_component
    sharded = getattr(policy, name)
    copy = unsharded_copy(sharded, state)
    setattr(policy, name, copy)
    policy.components[name] = copy
    try:
        yield
    finally:
        setattr(policy, name, sharded)
        policy.components[name] = sharded
