"""An exponential moving average (EMA) of the trainable weights (``train.ema_decay``).

After every optimizer step n (n = 1, 2, ...), for each trainable tensor theta:

    shadow_0 = theta_0                                  (the weights training starts from)
    shadow_n = d * shadow_{n-1} + (1 - d) * theta_n     (d = train.ema_decay, constant)

so shadow_n = d^n theta_0 + (1 - d) sum_{k=1..n} d^(n-k) theta_k. Flow-GRPO keeps one (d = 0.9);
unlike Flow-GRPO's wrapper there is no decay warm-up and no update interval: every optimizer step
updates it, with the same d. The shadow lives in fp32 on the parameters' device (the trainable
parameters are fp32 too), so it is exact to fp32 rounding and identical on every process (each
steps on the same all-reduced gradient). Evaluation and export run inside :meth:`EMA.applied`,
which swaps the shadow into the live parameters and restores them bit-exactly afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


class EMA:
    """The EMA of named parameters ``params`` ({name: parameter}, the policy's trainable ones)."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = dict(params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- d shadow + (1 - d) theta, for every parameter (call after each optimizer step)."""
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

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
