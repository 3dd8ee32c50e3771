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

Sharding (``fsdp.enabled``): the trained denoiser is sharded with PyTorch FSDP2
(``torch.distributed.fsdp.fully_shard``, :meth:`Distributed.shard_policy`), each of its blocks
(:func:`denoiser_blocks`: the diffusers model's ``_no_split_modules`` classes, peft's LoRA layers
inside them) a unit, then the rest of the model; under LoRA the frozen base is sharded too. Each
process then holds 1/N of the weights, gradients and optimizer states; a unit's weights are
all-gathered just before it runs. FSDP reduce-scatters (averages) the gradients itself, on the last
backward of an optimizer step only (:meth:`Distributed.set_gradient_sync`: every earlier backward of
the step accumulates locally, as without sharding), so :meth:`Distributed.average_gradients` then
does nothing. Every process must run the sharded model the same number of times (each forward
all-gathers): samples, minibatches and evaluation images are split evenly, or the setting is
refused before anything loads. diffloop shards the model itself: accelerate's own FSDP plugin is
never built (:func:`refuse_sharding` refuses its launch environment unless fsdp.enabled=true, and
the environment variable is hidden from ``Accelerator()``); DeepSpeed is refused.

Mixed precision: the policy's own (train.mixed_precision: frozen weights in low precision, fp32
trainables); accelerate is never asked to autocast. A launcher that asks for another one
(``ACCELERATE_MIXED_PRECISION``) is warned about, naming both settings
(:func:`mixed_precision_conflict`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from diffloop.config import FSDPConfig
from diffloop.errors import DiffloopError

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


class ShardingNotSupported(DiffloopError, RuntimeError):
    """accelerate is configured to shard the model in a way diffloop does not (DeepSpeed, or its
    FSDP plugin without fsdp.enabled=true)."""


def requested_sharding(environ: Mapping[str, str] = os.environ) -> str | None:
    """ "FSDP" or "DeepSpeed" when accelerate's launch environment asks for it, else None.

    ``accelerate launch`` exports ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED = "true" when the
    accelerate config's distributed_type is FSDP / DEEPSPEED (or --use_fsdp / --use_deepspeed is
    given); ``Accelerator()`` then builds the plugin from those variables."""
    for var, name in SHARDING_ENV.items():
        if environ.get(var, "false").lower() in ("true", "1", "yes"):
            return name
    return None


def refuse_sharding(environ: Mapping[str, str] = os.environ, fsdp_enabled: bool = False) -> None:
    """Raise ShardingNotSupported when accelerate asks for DeepSpeed, or for FSDP while
    fsdp.enabled is false (``fsdp_enabled``): diffloop shards with its own FSDP2 setting only (see
    the module doc)."""
    name = requested_sharding(environ)
    if name is None or (name == "FSDP" and fsdp_enabled):
        return
    var = next(v for v, n in SHARDING_ENV.items() if n == name)
    if name == "FSDP":
        raise ShardingNotSupported(
            f"accelerate is configured for FSDP ({var}=true, from `accelerate config` or "
            "`accelerate launch --use_fsdp`) but fsdp.enabled=false, and diffloop does not shard "
            "without it: set fsdp.enabled=true (diffloop shards the denoiser itself with FSDP2; "
            "docs/distributed.md), or launch without FSDP (`accelerate launch --multi_gpu ...`)"
        )
    raise ShardingNotSupported(
        f"accelerate is configured for DeepSpeed ({var}=true, from `accelerate config` or "
        "`accelerate launch --use_deepspeed`), which diffloop does not support: launch without it "
        "(`accelerate launch --multi_gpu ...`) and set fsdp.enabled=true to shard the model "
        "(docs/distributed.md)"
    )


@contextlib.contextmanager
def without_accelerate_sharding(environ: MutableMapping[str, str] = os.environ) -> Iterator[None]:
    """accelerate's sharding variables hidden inside the block, so ``Accelerator()`` builds no FSDP
    plugin of its own (diffloop shards with ``fully_shard``); restored afterwards."""
    saved = {var: environ.pop(var) for var in SHARDING_ENV if var in environ}
    try:
        yield
    finally:
        environ.update(saved)


def denoiser_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units of a denoiser: its submodules whose class is named in the diffusers model's
    ``_no_split_modules`` (UNet: resnets, transformer blocks and whole up blocks; SD3 / FLUX:
    the transformer blocks), outermost first-found only (a block inside another block belongs to
    the outer one's unit), in module order. Empty for a model that declares none (then the whole
    model is one unit). peft's LoRA layers sit inside the blocks they adapt."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()  # ids of the modules under a block already taken
    for sub in module.modules():
        if sub is module or id(sub) in inside or type(sub).__name__ not in names:
            continue
        blocks.append(sub)
        inside.update(id(m) for m in sub.modules())
    return blocks


def mixed_precision_policy(mixed_precision: str) -> Any:
    """FSDP2's precision for train.mixed_precision: weights all-gathered and computed in bf16 /
    fp16 (``param_dtype``; None for "no": in their own dtype), gradients reduced in fp32
    (``reduce_dtype``); the sharded trainable weights (the optimizer's) stay fp32. The inputs are
    not cast (``cast_forward_inputs=False``): the policy passes them as it does unsharded, under
    its autocast (the timestep stays fp32: in bf16, 937.5 would round to 936)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


class Distributed:
    """A thin view of accelerate's process state for the trainer."""

    sharded: bool = False
    """True once :meth:`shard_policy` has sharded the policy's denoiser (FSDP2)."""

    def __init__(self, cpu: bool = False, fsdp_enabled: bool = False) -> None:
        # Before Accelerator() builds an FSDP / DeepSpeed plugin we would not use.
        refuse_sharding(fsdp_enabled=fsdp_enabled)
        # Mixed precision is handled by the policy (frozen weights in low precision, fp32
        # trainables), so accelerate is only asked for the process group and the device. Under
        # torchrun on a machine without CUDA, accelerate only builds the gloo group when told
        # cpu=True.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu = cpu or (launched and not torch.cuda.is_available())
        with without_accelerate_sharding():  # diffloop shards itself (shard_policy)
            self.accelerator = Accelerator(cpu=cpu)
        self._sharded_module: torch.nn.Module | None = None
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

    def shard_policy(self, policy: Any, fsdp_config: FSDPConfig, mixed_precision: str) -> None:
        """Shard ``policy``'s denoiser in place with FSDP2 (``fsdp_config``: config.fsdp): each of
        :func:`denoiser_blocks` a unit, then the root (the rest), over all processes (one mesh
        dimension: every rank of every node), with :func:`mixed_precision_policy` of
        ``mixed_precision`` (train.mixed_precision). The trainable parameters become DTensors
        holding this rank's shard: call before the optimizer is built. A no-op unless
        fsdp_config.enabled."""
        if not fsdp_config.enabled or self.sharded:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        module = policy.denoiser
        if self.world_size == 1:
            logger.warning("fsdp.enabled=true on 1 process: the one shard is the whole model")
        if not dist.is_initialized():  # one process not launched by torchrun: a group of 1
            backend = "gloo" if self.device.type == "cpu" else "nccl"
            dist.init_process_group(backend, store=dist.HashStore(), world_size=1, rank=0)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        kwargs = {
            "mesh": mesh,
            "reshard_after_forward": fsdp_config.reshard_after_forward,
            "mp_policy": mixed_precision_policy(mixed_precision),
        }
        blocks = denoiser_blocks(module)
        if not blocks:
            logger.warning(
                "%s declares no blocks (_no_split_modules): FSDP shards it as one unit",
                type(module).__name__,
            )
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        self._sharded_module = module
        self.sharded = True

    def set_gradient_sync(self, enabled: bool) -> None:
        """Whether the next backward reduce-scatters the gradients (FSDP: True on the last backward
        of an optimizer step, False on the earlier ones, which accumulate unreduced). Without
        sharding a no-op: :meth:`average_gradients` all-reduces once per step."""
        if self._sharded_module is not None:
            self._sharded_module.set_requires_gradient_sync(enabled)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the accumulated gradients of ``params``, flattened into one buffer.
        Sharded: nothing (FSDP has reduce-scattered them, averaged, on the step's last
        backward)."""
        if self.world_size == 1 or self.sharded:
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


def end_processes() -> None:
    """Leave the process group once a command has finished, after the caller has dropped its
    trainer: collect the garbage first, so the sharded modules and their optimizer states are freed
    while Python still runs (left to interpreter shutdown, gloo's worker threads release their
    tensors after Python has begun tearing down, and the process aborts with "terminate called
    without an active exception" after a successful run), wait for every process, then destroy the
    group. A no-op when no group was initialised (no collection either: a full one costs ~0.2 s
    once torch and diffusers are loaded)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
