"""The plan's arithmetic: bytes of frozen components (quantized or not), trainables, gradients
and optimizer states, and the named terms of :class:`MemoryPlan` with its peak (resident + the
largest phase)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diffloop.config.schema import QUANT_TYPES
from diffloop.errors import DiffloopError
from diffloop.memory.activations import (
    ActivationEstimate,
    denoiser_blocks,
    estimate_activations,
    lora_denoiser,
    vae_decode_peak,
    vae_fp32,
)
from diffloop.memory.architecture import (
    Architecture,
    UnknownArchitecture,
    architecture,
    policy_class,
)
from diffloop.memory.settings import Settings
from diffloop.policies.quantization import bits_per_weight

GB = 10**9
GIB = 2**30


def gb(n: float) -> str:
    """Bytes as GB (10^9) with two decimals (GiB in brackets when over 1 GB)."""
    return f"{n / GB:.2f} GB" if n < GB else f"{n / GB:.2f} GB ({n / GIB:.2f} GiB)"


# ----------------------------------------------------------------------------- bytes


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return t.numel() * (dtype or t.dtype).itemsize


def frozen_bytes(
    module: torch.nn.Module,
    dtype: torch.dtype,
    quantize: tuple[str, str | None] | None = None,
    skip: Callable[[str], bool] = lambda name: False,
) -> int:
    """Bytes of ``module`` frozen in ``dtype`` as ``cast_frozen`` stores it (floating tensors in
    ``dtype``, transformers' keep-in-fp32 ones fp32, integer ones as they are); with ``quantize``
    = (backend, type), each ``nn.Linear`` weight at its ``bits_per_weight``."""
    from diffloop.policies.denoiser import keep_in_fp32_patterns

    keep = keep_in_fp32_patterns(module, dtype)
    pattern = re.compile("|".join(p.replace("*", ".*") for p in keep)) if keep else None
    quantized: dict[int, int] = {}
    if quantize is not None:
        for m in module.modules():
            if type(m) is torch.nn.Linear:
                quantized[id(m.weight)] = m.in_features
    total = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if skip(name):
            continue
        if id(t) in quantized and quantize is not None:
            total += math.ceil(t.numel() * bits_per_weight(*quantize, quantized[id(t)]) / 8)
        elif not t.is_floating_point():
            total += _tensor_bytes(t)
        else:
            fp32 = pattern is not None and pattern.search(name)
            total += _tensor_bytes(t, torch.float32 if fp32 else dtype)
    return total


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """``module``'s submodule at a dotted path ending in ``path`` (e.g. ``language_model.layers``
    under ``model.``)."""
    for name, m in module.named_modules():
        if name == path or name.endswith("." + path):
            return m
    return None


def component_bytes(arch: Architecture, name: str, dtype: torch.dtype, quantize=None) -> int:
    """A frozen component's bytes, the layers its meta build lacks included."""
    module = arch.components[name]
    total = frozen_bytes(module, dtype, quantize)
    for path, length in arch.extra_layers.get(name, []):
        layers = _submodule(module, path)
        if layers is not None and len(layers) and length > len(layers):
            total += (length - len(layers)) * frozen_bytes(layers[0], dtype, quantize)
    return total


def trainable_tensors(arch: Architecture, s: Settings) -> list[torch.nn.Parameter]:
    """The trainable parameters: the LoRA adapter's, or every denoiser parameter."""
    if s.lora:
        module = lora_denoiser(arch, s)
        return [p for n, p in module.named_parameters() if "lora_" in n]
    return list(arch.denoiser.parameters())


def optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    """Optimizer state of tensors of ``sizes`` elements: AdamW exp_avg + exp_avg_sq (fp32) and
    a float32 ``step`` per tensor; 8-bit AdamW (bitsandbytes blockwise, block 256) two uint8
    states, an fp32 absmax per block each and two 256-entry fp32 code books per tensor, fp32
    states for tensors under 4096 elements."""
    total = 0
    for n in sizes:
        if optimizer == "adamw_8bit" and n >= 4096:
            total += 2 * (n + 4 * math.ceil(n / 256)) + 2 * 256 * 4 + 4
        else:
            total += 2 * 4 * n + 4
    return total


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Term:
    """One named amount of the plan: ``phase`` is resident (the whole run), encoding, sampling or
    training (only inside that phase)."""

    name: str
    bytes: int
    phase: str = "resident"
    note: str = ""


PHASES = ("encoding", "sampling", "training")


@dataclass
class MemoryPlan:
    """The plan's terms; ``unknown`` names terms it could not compute (one line each)."""

    terms: list[Term]
    settings: Settings
    source: str = ""
    unknown: list[str] = field(default_factory=list)
    cpu_bytes: int = 0
    """Bytes kept in CPU memory instead (text_encoder_device=cpu / offload)."""

    def phase_bytes(self, phase: str) -> int:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def resident(self) -> int:
        return self.phase_bytes("resident")

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def peak(self) -> int:
        return self.resident + self.phase_bytes(self.peak_phase)

    def lines(self) -> list[str]:
        s = self.settings
        procs = f", {s.processes} process(es), FSDP" if s.fsdp else ""
        out = [f"memory plan per process (arithmetic, not measured{procs}; {self.source}):"]
        for t in self.terms:
            note = f"  ({t.note})" if t.note else ""
            out.append(f"  {t.phase:<9} {t.name:<40} {gb(t.bytes):>22}{note}")
        for line in self.unknown:
            out.append(f"  unknown   {line}")
        if self.cpu_bytes:
            out.append(f"  (in CPU memory, not counted: {gb(self.cpu_bytes)} of text encoders)")
        out.append(f"  peak = resident {gb(self.resident)} + {self.peak_phase} "
                   f"{gb(self.phase_bytes(self.peak_phase))} = {gb(self.peak)}")  # fmt: skip
        return out


def _plan_terms(arch: Architecture, s: Settings, acts: ActivationEstimate | None) -> MemoryPlan:
    n = s.processes if s.fsdp else 1
    dtype = s.dtype
    quant = None
    if s.quant_backend != "none":
        quant = (s.quant_backend, s.quant_type or QUANT_TYPES[s.quant_backend][0])
    quantized = set(s.quant_components) or {arch.denoiser_name}
    qname = f", {quant[0]} {quant[1]}" if quant else ""
    terms: list[Term] = []
    shard = f" / {n} (FSDP)" if n > 1 else ""

    # the denoiser: frozen base (LoRA) or fp32 trainables (full)
    trainables = trainable_tensors(arch, s)
    sizes = [p.numel() for p in trainables]
    train_bytes = 4 * sum(sizes)
    d = arch.denoiser_name
    if s.lora:
        q = quant if d in quantized else None
        base = component_bytes(arch, d, dtype, q)
        terms.append(Term(f"frozen {d}", math.ceil(base / n), note=f"{dtype}{qname if q else ''}"
                          f"{shard}"))  # fmt: skip
        trainable_note = f"LoRA r{s.lora_rank}, {sum(sizes) / 1e6:.1f}M fp32"
    else:
        buffers = sum(_tensor_bytes(b, dtype) for b in arch.denoiser.buffers())
        if buffers:
            terms.append(Term(f"{d} buffers", math.ceil(buffers / n), note=str(dtype)))
        trainable_note = f"full {d}, {sum(sizes) / 1e9:.2f}B fp32"
    terms.append(Term("trainables", math.ceil(train_bytes / n), note=trainable_note + shard))
    terms.append(Term("optimizer states", math.ceil(optimizer_bytes(sizes, s.optimizer) / n),
                      note=f"{s.optimizer}{shard}"))  # fmt: skip
    if s.ema:
        terms.append(Term("EMA of the trainables", math.ceil(train_bytes / n), note="fp32" + shard))

    # text encoders
    cpu = 0
    for name in arch.text_encoder_names:
        q = quant if name in quantized else None
        size = component_bytes(arch, name, dtype, q)
        where = s.text_encoder_device
        note = f"{dtype}{qname if q else ''}"
        if where == "cpu":
            cpu += size
            continue
        if s.precompute_embeddings or where == "offload":
            why = "precomputed, then freed" if s.precompute_embeddings else "offloaded"
            terms.append(Term(f"text encoder {name}", size, "encoding", f"{note}, {why}"))
            if where == "offload":
                cpu += size
        else:
            terms.append(Term(f"text encoder {name}", size, note=note + ", resident"))

    # the VAE
    if arch.vae is not None:
        vae_dtype = torch.float32 if vae_fp32(arch, s) else dtype
        terms.append(Term("frozen vae", frozen_bytes(arch.vae, vae_dtype), note=str(vae_dtype)))

    # training phase
    terms.append(Term("gradients", math.ceil(train_bytes / n), "training", "fp32" + shard))
    evals = 2 if s.guidance_scale != 1.0 and not policy_class(arch.family).guidance_distilled \
        else 1  # fmt: skip
    plan = MemoryPlan(terms, s)
    if acts is None:
        plan.unknown.append("activations: the denoiser's forward did not run on meta")
    else:
        per = acts.checkpointed if s.gradient_checkpointing else acts.full
        how = "checkpointed" if s.gradient_checkpointing else "no checkpointing"
        cfg = ", x2 CFG branches" if evals == 2 else ""
        terms.append(Term("activations", per * s.train_batch * evals, "training",
                          f"{gb(per)}/sample ({how}) x batch {s.train_batch}{cfg}"))  # fmt: skip
        terms.append(Term("sampling forward", acts.sampling * s.sample_batch * evals, "sampling",
                          f"no grad, batch {s.sample_batch}{cfg}"))  # fmt: skip
    if s.fsdp and n > 1:
        blocks = denoiser_blocks(arch.denoiser)
        block = max((frozen_bytes(b, dtype) for b in blocks), default=0)
        whole = frozen_bytes(arch.denoiser, dtype)
        gathered = 2 * block if s.reshard_after_forward else whole
        why = "2 blocks: running + prefetched" if s.reshard_after_forward else "whole denoiser"
        for phase in ("sampling", "training"):
            terms.append(Term("FSDP all-gathered parameters", gathered, phase, why))
    if arch.vae is not None:
        batch = min(s.decode_batch, s.sample_batch)
        terms.append(Term("VAE decode", vae_decode_peak(arch, s, batch), "sampling",
                          f"{batch} image(s) at once"))  # fmt: skip
    plan.cpu_bytes = cpu
    return plan


def memory_plan(config: Any, processes: int = 1) -> MemoryPlan:
    """The plan of ``config`` run on ``processes`` processes (FSDP divides by it). An unknown
    architecture gives a plan with no terms and one ``unknown`` line, never an exception."""
    s = Settings.from_config(config, processes)
    try:
        arch = architecture(config.model.pretrained, config.model.revision)
    except (UnknownArchitecture, DiffloopError, OSError, ValueError) as e:
        why = f"every term: no config of model.pretrained='{config.model.pretrained}'"
        return MemoryPlan([], s, unknown=[f"{why} ({one_line(e)})"])
    return plan_for(arch, s)


def plan_for(arch: Architecture, s: Settings) -> MemoryPlan:
    acts: ActivationEstimate | None
    why = ""
    try:
        acts = estimate_activations(arch, s)
    except Exception as e:  # noqa: BLE001 -- a forward meta cannot run: an unknown term, one line
        acts, why = None, f"{type(e).__name__}: {one_line(e)}"[:200]
    plan = _plan_terms(arch, s, acts)
    if acts is None:
        plan.unknown[-1] = f"activations: the denoiser's forward did not run on meta ({why})"
    plan.source = arch.source
    return plan


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
