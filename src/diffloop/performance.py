"""Process-wide backend settings, set once per process (by the trainer and by every tool that
samples the way a run does), never as a side effect of building a policy."""

from __future__ import annotations

import torch

from diffloop.config import PerformanceConfig, resolve_cpu_threads


def set_backend_flags(
    performance: PerformanceConfig, device: torch.device, cpu_threads: int | str | None = None
) -> int | None:
    """TF32 matmuls/convolutions on CUDA (``performance.allow_tf32``) and the number of CPU
    threads (``cpu_threads``: an int, "auto" = the available cores, see
    ``config.resolve_cpu_threads``, or None = unchanged). Returns the thread count set (None:
    unchanged)."""
    threads = resolve_cpu_threads(cpu_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = performance.allow_tf32
        torch.backends.cudnn.allow_tf32 = performance.allow_tf32
    return threads
