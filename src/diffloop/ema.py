"""An exponential moving average (EMA) of the trainable weights (``train.ema_decay``).

After optimizer step n (n = 1, 2, ...: the trainer's ``optimizer_steps`` once the step is taken),
for each trainable tensor theta:

    shadow_0 = theta_0                                      (the weights training starts from)
    shadow   <- d_n shadow + (1 - d_n) theta_n              only if (n + 1) % I == 0
    d_n      = d                                            (train.ema_warmup=false)
             = min((1 + n) / (10 + n), d)                   (train.ema_warmup=true)

with d = ``train.ema_decay`` and I = ``train.ema_update_interval`` (1: every step). With I = 1 and
no warm-up, shadow_n = d^n theta_0 + (1 - d) sum_{k=1..n} d^(n-k) theta_k.

Flow-GRPO (flow_grpo/ema.py ``EMAModuleWrapper``; scripts/train_sd3.py, train_sd3_fast.py,
train_flux.py, train_flux_fast.py) builds it with d = 0.9, I = 8 and always warms up: its
``step(params, global_step)`` blends with min((1 + n) / (10 + n), d) when (n + 1) % I == 0, n =
the optimizer steps taken so far, so its first update follows step 7 (d_7 = 8/17 = 0.47), then 15,
23, ...; d reaches 0.9 at n = 80. Its decay 0.9 is per update, i.e. per 8 optimizer steps: do not
copy 0.9 without I = 8 (0.9 at every step averages ~10 steps, not ~80). One difference: Flow-GRPO
calls ``step`` after every training micro-batch, with global_step unchanged until the next optimizer
step, so with G micro-batches of gradient accumulation per process an update step blends G times
with the same weights (decay d_n^G: G = 2 in its 32-GPU SD3.5 configs, 6 in its FLUX ones); here an
update step blends once. The shipped configs state which decay they use for it.

The step counter is the trainer's, saved in and restored from every checkpoint, and the shadow is
saved too (``ema.safetensors``), so a resumed run's EMA equals the uninterrupted run's. The shadow
lives in fp32 on the parameters' device (the trainable parameters are fp32 too), so it is exact to
fp32 rounding and identical on every process (each steps on the same all-reduced gradient).
Evaluation and export run inside :meth:`EMA.applied`, which swaps the shadow into the live
parameters and restores them bit-exactly afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

WARMUP_OFFSET = 10
"""The warm-up's d_n = min((1 + n) / (WARMUP_OFFSET + n), d), as Flow-GRPO's wrapper."""


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """d_n: ``decay``, or min((1 + n) / (10 + n), decay) with the warm-up (n = ``step`` >= 0)."""
    if not warmup:
        return decay
    return min((1 + step) / (WARMUP_OFFSET + step), decay)


def ema_updates_at(step: int, interval: int) -> bool:
    """Whether optimizer step n = ``step`` updates the EMA: (n + 1) % interval == 0
    (Flow-GRPO's)."""
    return (step + 1) % interval == 0


class EMA:
    """The EMA of named parameters ``params`` ({name: parameter}, the policy's trainable ones), with
    decay ``decay``, optional warm-up and update interval (module docstring)."""

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        decay: float,
        *,
        warmup: bool = False,
        update_interval: int = 1,
    ) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if update_interval < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {update_interval}")
        self.decay = float(decay)
        self.warmup = warmup
        self.update_interval = update_interval
        self.params = dict(params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """After optimizer step n = ``step``: shadow <- d_n shadow + (1 - d_n) theta when n is an
        update step; returns whether it was. ``step`` may be omitted only without warm-up and with
        interval 1 (then every call updates with d)."""
        if step is None:
            if self.warmup or self.update_interval != 1:
                raise ValueError("an EMA with warm-up or an update interval needs the step number")
            step = 0
        if not ema_updates_at(step, self.update_interval):
            return False
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{name: shadow tensor} on the CPU (for ``ema.safetensors`` in a checkpoint)."""
        return {n: s.detach().cpu().clone() for n, s in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the shadow from :meth:`state_dict`; the names must be exactly the parameters'."""
        missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the trainable parameters: {len(missing)} missing, "
                f"{len(unexpected)} unexpected (e.g. {sorted(missing or unexpected)[:3]})"
            )
        for name, s in self.shadow.items():
            s.copy_(state[name].to(s.device, s.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; afterwards their own values again
        (copied back exactly: training continues from the live weights, not the average)."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(live[name])


def maybe_applied(ema: EMA | None) -> contextlib.AbstractContextManager:
    """``ema.applied()``, or a no-op context when there is no EMA."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
