"""Measurement: FLOP counts, medians of timed calls under a deadline, peak memory, the matmul
rate of the hardware floor, and one item's result."""

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from typing_extensions import Self


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's ``FlopCounterMode`` attributes to the ops ``fn()`` runs (matmul/conv/attention;
    a multiply-add counts 2). Backward ops are counted when ``fn`` calls ``backward``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def _cpu_attention_formulas() -> dict[Any, Any]:
    """torch counts the CUDA attention kernels (flash, efficient, cudnn) but not the CPU one that
    ``scaled_dot_product_attention`` dispatches to; without this the CPU count misses QK^T and
    AV."""
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward
    return mapping


def _sdpa_forward(
    q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_backward(
    grad_shape: Any,
    q_shape: Any,
    k_shape: Any,
    v_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kw: Any,
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class Deadline:
    """Wall-clock budget for the whole run; items check it before each timed repeat."""

    def __init__(self, limit_s: float | None) -> None:
        self.start = time.perf_counter()
        self.limit_s = limit_s

    def exceeded(self) -> bool:
        return self.limit_s is not None and time.perf_counter() - self.start > self.limit_s


@dataclass(frozen=True)
class BenchRun:
    """What every item of one measurement shares: the settings (``args``), the device, the matmul
    rate measured on it (FLOP/s: each item's fraction is its FLOP/s over this), the run's time
    limit, and the result dict the items fill (``out["items"]``, ``out["skipped"]``,
    ``out["floor"]``).
    A variant is ``dataclasses.replace(run, args=..., out=...)``."""

    args: argparse.Namespace
    device: torch.device
    matmul_rate: float
    deadline: Deadline
    out: dict[str, Any]


def median_seconds(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    warmup: int,
    deadline: Deadline,
    warmup_times: list[float] | None = None,
) -> tuple[float, list[float]]:
    """Median over ``repeats`` timed calls after ``warmup`` untimed ones (their times appended to
    ``warmup_times``: the first includes torch.compile's compilation). Stops early at the deadline
    once at least one call is timed; raises TimeoutError if none could be."""
    for _ in range(warmup):
        if deadline.exceeded():
            break
        seconds = time_once(fn, device)
        if warmup_times is not None:
            warmup_times.append(seconds)
    times: list[float] = []
    for _ in range(repeats):
        if times and deadline.exceeded():
            break
        if not times and deadline.exceeded():
            raise TimeoutError("time limit reached before the first timed repeat")
        times.append(time_once(fn, device))
    return statistics.median(times), times


class PeakMemory:
    """Peak memory of a block: CUDA max allocated (MiB), or growth of the process's peak resident
    set on CPU (MiB; 0 when earlier work already reached that peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss_growth"

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = _peak_rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mib = _peak_rss_mib() - self._rss0


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale * 1.0


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Hardware floor: R = 2 n^3 / t for one (n, n) @ (n, n) ``torch.matmul``, best of
    ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocation
    best = min(time_once(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    return 2.0 * n**3 / best


# ---------------------------------------------------------------------------------------- results


@dataclass
class ItemResult:
    """One timed item. ``per_sample_s`` = median_s / samples; ``flops`` = counted FLOPs of one timed
    call; ``fraction_of_matmul`` = flops / median_s / matmul rate."""

    name: str
    what: str
    samples: int
    median_s: float
    times_s: list[float]
    per_sample_s: float
    samples_per_s: float
    flops: float
    tflops_per_s: float
    fraction_of_matmul: float
    unet_evals_per_s: float | None = None
    peak_memory_mib: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def make_item(
    name: str,
    what: str,
    samples: int,
    median_s: float,
    times_s: list[float],
    flops: float,
    matmul_rate: float,
    unet_evals: int | None,
    mem: PeakMemory,
) -> ItemResult:
    achieved = flops / median_s
    return ItemResult(
        name=name,
        what=what,
        samples=samples,
        median_s=median_s,
        times_s=times_s,
        per_sample_s=median_s / samples,
        samples_per_s=samples / median_s,
        flops=flops,
        tflops_per_s=achieved / 1e12,
        fraction_of_matmul=achieved / matmul_rate,
        unet_evals_per_s=None if unet_evals is None else unet_evals / median_s,
        peak_memory_mib=mem.mib,
    )
