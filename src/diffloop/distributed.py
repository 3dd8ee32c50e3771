"""Everything that knows about multiple processes lives here (accelerate appears only here and in
diffloop.tracking, which uses its experiment trackers).

Layout of an epoch's samples: the B prompts x K samples form a global list of B*K samples ordered
prompt-major (sample g belongs to prompt g // K). Process r holds the contiguous slice
[r * n, (r + 1) * n), n = B*K / world_size, so a prompt's K samples may straddle processes. Rewards
are all-gathered in that global order, so every process computes the same (B, K) advantage table
with each leave-one-out baseline over all K rewards of its group, then keeps its own slice.

Gradients: we do not wrap the UNet in DDP. Each optimizer step accumulates gradients locally over
``gradient_accumulation_steps`` minibatches x the trained timesteps of each (each backward is
scaled by 1 / (that count)), then averages them across processes with one all-reduce just before
clipping and stepping. That makes synchronisation under accumulation explicit and impossible to
skip (the bug DDPO shipped), works unchanged for LoRA and full fine-tuning, and since every process
holds the same number of samples the average equals the single-process gradient of the whole batch.

Sharding: none. Every process holds a full copy of the trained model, so an accelerate configuration
that asks for FSDP or DeepSpeed (``accelerate config`` / ``accelerate launch --use_fsdp``, which set
``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``) is refused before anything loads instead of
being silently ignored (docs/flow_matching.md: LoRA fits FLUX.1 unsharded; full fine-tuning of a
FLUX-size transformer needs sharding diffloop does not do).

Mixed precision: the policy's own (train.mixed_precision: frozen weights in low precision, fp32
trainables); accelerate is never asked to autocast. A launcher that asks for another one
(``ACCELERATE_MIXED_PRECISION``) is warned about, naming both settings
(:func:`mixed_precision_conflict`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from accelerate import Accelerator

logger = logging.getLogger(__name__)

# `accelerate launch --mixed_precision X` (or the default accelerate config file it reads) sets
# this.
ACCELERATE_MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


def mixed_precision_conflict(
    configured: str, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The warning to give when accelerate's launcher asks for a mixed precision other than
    ``train.mixed_precision`` (``configured``), else None. diffloop applies its own precision
    (frozen weights in low precision, fp32 trainables), never accelerate's autocast, so accelerate's
    setting would otherwise be silently ignored."""
    asked = environ.get(ACCELERATE_MIXED_PRECISION_ENV)
    if asked is None or asked.lower() == configured:
        return None
    return (
        f"accelerate asks for mixed precision {asked!r} "
        f"({ACCELERATE_MIXED_PRECISION_ENV}, from `accelerate "
        "launch --mixed_precision` or its config file) but "
        f"train.mixed_precision={configured}: diffloop "
        f"applies train.mixed_precision only, so this run uses {configured!r}; set "
        f"train.mixed_precision={asked.lower()} or launch with --mixed_precision {configured}"
    )


def warn_on_mixed_precision_conflict(configured: str) -> None:
    """Log :func:`mixed_precision_conflict`'s warning for this process's environment, if any."""
    message = mixed_precision_conflict(configured)
    if message is not None:
        logger.warning(message)


SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


class ShardingNotSupported(RuntimeError):
    """accelerate is configured to shard the model (FSDP / DeepSpeed), which diffloop does not
    do."""


def requested_sharding(environ: Mapping[str, str] = os.environ) -> str | None:
    """ "FSDP" or "DeepSpeed" when accelerate's launch environment asks for it, else None.

    ``accelerate launch`` exports ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED = "true" when the
    accelerate config's distributed_type is FSDP / DEEPSPEED (or --use_fsdp / --use_deepspeed is
    given); ``Accelerator()`` then builds the plugin from those variables."""
    for var, name in SHARDING_ENV.items():
        if environ.get(var, "false").lower() in ("true", "1", "yes"):
            return name
    return None


def refuse_sharding(environ: Mapping[str, str] = os.environ) -> None:
    """Raise ShardingNotSupported when accelerate asks for FSDP / DeepSpeed (see the module doc)."""
    name = requested_sharding(environ)
    if name is None:
        return
    var = next(v for v, n in SHARDING_ENV.items() if n == name)
    raise ShardingNotSupported(
        f"accelerate is configured for {name} ({var}=true, from `accelerate config` or "
        "`accelerate launch`), but diffloop does not shard models: each process would "
        "train a full "
        f"unsharded copy and the {name} setting would be ignored. Launch without it (`accelerate "
        "launch --multi_gpu ...`, or an accelerate config with distributed_type: MULTI_GPU) and "
        "train a LoRA adapter (lora.enabled=true), which fits FLUX.1 and SD3.5 unsharded; full "
        "fine-tuning of a FLUX-size transformer is not supported (docs/flow_matching.md)."
    )


class Distributed:
    """A thin view of accelerate's process state for the trainer."""

    def __init__(self, cpu: bool = False) -> None:
        refuse_sharding()  # before Accelerator() builds an FSDP / DeepSpeed plugin we would not use
        # Mixed precision is handled by the policy (frozen weights in low precision, fp32
        # trainables), so accelerate is only asked for the process group and the device. Under
        # torchrun on a machine without CUDA, accelerate only builds the gloo group when told
        # cpu=True.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu = cpu or (launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

    def check_mixed_precision(self, configured: str) -> None:
        """Warn (main process) when accelerate's launcher asked for another mixed precision."""
        if self.is_main:
            warn_on_mixed_precision_conflict(configured)

    def local_slice(self, total: int) -> slice:
        """This process's contiguous share of ``total`` globally ordered samples."""
        n = total // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``tensor`` (same shape on all) along dim 0, in rank order."""
        if self.world_size == 1:
            return tensor
        return self.accelerator.gather(tensor.contiguous().to(self.device)).to(tensor.device)

    def mean_scalar(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def sum_scalar(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def max_scalar(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process."""
        return self.sum_scalar(float(bool(flag))) == self.world_size

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the accumulated gradients of ``params``, flattened into one buffer."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            numel = g.numel()
            p.grad = flat[offset : offset + numel].view_as(p).clone()
            offset += numel

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every process's (picklable) ``obj``, in rank order, on every process."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        self.accelerator.end_training()
