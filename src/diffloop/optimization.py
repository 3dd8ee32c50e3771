"""The optimizer side of training, in one place: AdamW (or bitsandbytes' 8-bit AdamW), its
learning-rate schedule, the fp16 loss scaler, the EMA of the trainable weights and the guard that
skips non-finite steps. One optimizer step, what a checkpoint keeps of them and how a resume
restores them are each written once, here."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from diffloop.config import ConfigError, TrainConfig
from diffloop.distributed import Distributed
from diffloop.ema import EMA
from diffloop.guards import NonFiniteGuard
from diffloop.policies.base import DiffusionPolicy

logger = logging.getLogger(__name__)


def build_optimizer(
    params: list[torch.nn.Parameter], t: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (torch) or, with train.optimizer=adamw_8bit, bitsandbytes' AdamW8bit (validate() has
    checked that it is installed and that the run has CUDA and no LoRA)."""
    kwargs = {
        "lr": t.learning_rate,
        "betas": (t.adam_beta1, t.adam_beta2),
        "eps": t.adam_epsilon,
        "weight_decay": t.weight_decay,
    }
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if device.type != "cuda":
        raise ConfigError(
            f"train.optimizer=adamw_8bit needs a CUDA device, not {device}; use "
            "train.optimizer=adamw"
        )
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **kwargs)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sharded (FSDP2 DTensor) gradients: the
    norm ||g||_2 over every process's shard (a plain 0-dim tensor, the same on every process), then
    each gradient scaled by min(1, max_norm / (||g|| + 1e-6)). Returns the norm before
    clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):  # a partial norm per shard: reduced over the processes
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def new_ema(policy: DiffusionPolicy, t: TrainConfig) -> EMA | None:
    """The EMA of the policy's current trainable weights as train.ema_* say (None without
    ema_decay)."""
    if t.ema_decay is None:
        return None
    return EMA(
        policy.named_trainable_parameters(),
        t.ema_decay,
        warmup=t.ema_warmup,
        update_interval=t.ema_update_interval,
    )


class Optimization:
    """The optimizer, LR schedule (``num_training_steps`` long), loss scaler, EMA and non-finite
    guard of ``policy``'s trainable parameters, as train.* say; ``steps``: optimizer steps
    taken."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        t: TrainConfig,
        num_training_steps: int,
        device: torch.device,
    ) -> None:
        from diffusers.optimization import get_scheduler

        self.policy, self.train = policy, t
        self.params = policy.trainable_parameters()
        self.optimizer = build_optimizer(self.params, t, device)
        self.ema = new_ema(policy, t)
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=t.lr_warmup_steps,
            num_training_steps=num_training_steps,
        )
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=t.mixed_precision == "fp16")
        self.nonfinite = NonFiniteGuard(t.max_consecutive_nonfinite)
        self.steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the fp16 loss scale (unscaled in other precisions)."""
        self.grad_scaler.scale(loss).backward()

    def step(self, dist: Distributed) -> torch.Tensor:
        """One optimizer step on the gradient accumulated so far, averaged over processes and
        clipped to train.max_grad_norm; a non-finite gradient is skipped (counted, no update). Then
        the LR schedule and the EMA follow. Returns the gradient norm before clipping."""
        # All-reduce first: every process then clips and steps on the same averaged gradient.
        dist.average_gradients(self.params)
        self.grad_scaler.unscale_(self.optimizer)
        max_norm = self.train.max_grad_norm or math.inf
        grad_norm = clip_grad_norm(self.params, max_norm)
        if not self.nonfinite.should_step(grad_norm, self.grad_scaler):  # NaN/inf: no update at all
            self.grad_scaler.update()  # fp16: lowers the loss scale; a no-op otherwise
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm.detach()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.steps)  # n = the steps taken, this one included
        return grad_norm.detach()

    def checkpoint_parts(self, is_main: bool) -> dict[str, Any]:
        """What ``checkpoint.write_main`` keeps of them (the EMA's weights: main process only)."""
        ema = self.ema.state_dict() if self.ema is not None and is_main else None
        return {
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "grad_scaler": self.grad_scaler,
            "ema": ema,
        }

    def load(self, parts: dict[str, Any], path: Path, steps: int) -> None:
        """Restore from a loaded checkpoint (``checkpoint.load``: ``parts``, read from ``path``),
        after the policy's trainable weights, with ``steps`` optimizer steps taken; then the
        config applies again (``apply_config``). A checkpoint without the EMA the config asks for
        restarts it from the loaded weights, with a warning."""
        if parts["optimizer"] is not None:  # None: restored in place (a sharded checkpoint)
            self.optimizer.load_state_dict(parts["optimizer"])
        self.lr_scheduler.load_state_dict(parts["lr_scheduler"])
        self.grad_scaler.load_state_dict(parts["grad_scaler"])
        self.apply_config()
        if self.ema is not None and parts.get("ema") is not None:
            self.ema.load_state_dict(parts["ema"])
        elif self.ema is not None:
            logger.warning(
                "train.ema_decay is set but %s holds no EMA: it restarts from the loaded weights",
                path,
            )
            self.ema = new_ema(self.policy, self.train)
        self.steps = steps

    def apply_config(self) -> None:
        """After loading their states, the optimizer and LR schedule follow the config again: a
        resume may change the rate (resume_allow) or the schedule's length (num_epochs). With
        nothing changed this sets the very values (and floats: LambdaLR's own formula) that were
        loaded."""
        t, sched = self.train, self.lr_scheduler
        sched.base_lrs = [t.learning_rate] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group.update(
                initial_lr=t.learning_rate,
                lr=t.learning_rate * lr_lambda(sched.last_epoch),
                betas=(t.adam_beta1, t.adam_beta2),
                eps=t.adam_epsilon,
                weight_decay=t.weight_decay,
            )
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
