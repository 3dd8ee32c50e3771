"""The verdict: whether a plan's peak fits a ``--gpu-memory`` size, the settings that would lower
it (each alone), and the lines ``diffloop check-config`` and the train header print."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from diffloop.errors import DiffloopError
from diffloop.memory.architecture import Architecture, architecture
from diffloop.memory.plan import gb, memory_plan, one_line, plan_for
from diffloop.memory.settings import Settings


class MemorySizeError(DiffloopError, ValueError):
    """A ``--gpu-memory`` size that is not a number with a unit."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes of ``24GB`` (10^9), ``24GiB`` (2^30), ``80G`` (read as GB, as GPUs are sold),
    ``512MB``, ``1TB``, or a bare number of bytes. Anything else: a one-line
    :class:`MemorySizeError`."""
    m = _SIZE.match(text or "")
    if not m or (m.group(3) and not m.group(2)):
        raise MemorySizeError(
            f"{flag}={text!r} is not a memory size; give a number and a unit such as 24GB, "
            "24GiB or 80G"
        )
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    value = number * (1024 if binary else 1000) ** power
    if value <= 0:
        raise MemorySizeError(f"{flag}={text!r} must be more than 0 bytes; e.g. 24GB")
    return int(value)


@dataclass(frozen=True)
class Knob:
    """A change of settings, its config words, and the plan's peak with it."""

    words: str
    peak: int
    saves: int


def knobs(arch: Architecture, s: Settings, gpu_bytes: int) -> list[Knob]:
    """Each setting that lowers the peak, alone, with the bytes it saves (largest first)."""
    base = plan_for(arch, s).peak
    options: list[tuple[str, Settings]] = []
    if not s.lora:
        options.append(("lora.enabled=true", dataclasses.replace(s, lora=True)))
    if not s.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true",
                        dataclasses.replace(s, gradient_checkpointing=True)))  # fmt: skip
    if s.quant_backend == "none" and s.lora:
        for backend, qtype in (("torchao", "int8_weight_only"), ("bitsandbytes", "nf4")):
            options.append(
                (
                    f"model.quantization.backend={backend} (quant_type={qtype})",
                    dataclasses.replace(s, quant_backend=backend, quant_type=qtype),
                )
            )
    if arch.text_encoder_names and not s.precompute_embeddings and \
            s.text_encoder_device != "cpu":  # fmt: skip
        options.append(
            (
                "prompts.precompute_embeddings=true",
                dataclasses.replace(s, precompute_embeddings=True),
            )
        )
        options.append(
            ("model.text_encoder_device=cpu", dataclasses.replace(s, text_encoder_device="cpu"))
        )
    if not s.fsdp or s.processes == 1:
        for n in (2, 4, 8):
            options.append(
                (
                    f"fsdp.enabled=true with {n} processes",
                    dataclasses.replace(s, fsdp=True, processes=n),
                )
            )
    batch = s.train_batch // 2
    while batch >= 1:
        options.append((f"train.batch_size={batch}", dataclasses.replace(s, train_batch=batch)))
        if plan_for(arch, options[-1][1]).peak <= gpu_bytes:
            break
        batch //= 2
    out = []
    for words, changed in options:
        peak = plan_for(arch, changed).peak
        if peak < base:
            out.append(Knob(words, peak, base - peak))
    return sorted(out, key=lambda k: -k.saves)


def verdict_lines(config: Any, gpu_bytes: int, processes: int = 1) -> list[str]:
    """The plan, and whether its peak fits ``gpu_bytes``; if not, the knobs that lower it."""
    plan = memory_plan(config, processes)
    lines = plan.lines()
    if not plan.terms:
        return lines + [f"  fits {gb(gpu_bytes)}: unknown (no plan)"]
    if plan.peak <= gpu_bytes:
        return lines + [f"  fits {gb(gpu_bytes)}: yes, {gb(gpu_bytes - plan.peak)} to spare"]
    lines.append(f"  fits {gb(gpu_bytes)}: NO, {gb(plan.peak - gpu_bytes)} over; knobs that lower "
                 "the peak (each alone):")  # fmt: skip
    arch = architecture(config.model.pretrained, config.model.revision)
    for k in knobs(arch, plan.settings, gpu_bytes):
        fits = "fits" if k.peak <= gpu_bytes else "not enough alone"
        lines.append(f"    {k.words}: saves {gb(k.saves)} -> {gb(k.peak)} ({fits})")
    return lines


def plan_lines(config: Any, gpu_memory: str | None = None, processes: int = 1) -> list[str]:
    """What check-config and the train header print: the plan, and with ``gpu_memory`` (a size
    such as 24GB) the verdict."""
    if gpu_memory is not None:
        return verdict_lines(config, parse_size(gpu_memory), processes)
    return memory_plan(config, processes).lines()


def memory_summary(config: Any, processes: int = 1) -> list[str]:
    """The train header's lines: the plan's peak and its largest terms (``check-config`` prints
    the whole plan). Never raises: a plan that cannot be made is said in one line."""
    try:
        plan = memory_plan(config, processes)
    except Exception as e:  # noqa: BLE001 -- the header must not stop a run that would train
        return [f"memory plan (arithmetic): not computed ({type(e).__name__}: {one_line(e)})"]
    if not plan.terms:
        return ["memory plan (arithmetic): " + "; ".join(plan.unknown)]
    phase = plan.peak_phase
    top = sorted((t for t in plan.terms if t.phase in ("resident", phase)), key=lambda t: -t.bytes)
    largest = ", ".join(f"{t.name} {gb(t.bytes).split(' (')[0]}" for t in top[:4])
    head = (
        f"memory plan per process (arithmetic, not measured): peak {gb(plan.peak)} in {phase}; "
        f"largest: {largest} (`diffloop check-config ... --gpu-memory SIZE`: the whole plan)"
    )
    return [
        head,
        *(f"memory plan: unknown {line}" for line in plan.unknown),
    ]
