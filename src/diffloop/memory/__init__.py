"""The memory plan: the expected peak accelerator bytes of one training process for a resolved
config, as named terms, computed before anything loads (``diffloop check-config``, the train
header). It is arithmetic, not a measurement.

Where the numbers come from:

- Parameter counts come from the real architecture without weights: every component is built on
  the ``meta`` device from its config (a local directory's or a cached hub snapshot's
  ``config.json``; for the known hub ids in ``KNOWN_MODELS``, the real configs ``diffloop bench
  --shape ...`` builds, with the text encoders' full depth restored). The bytes of a frozen
  component are those ``policies.denoiser.cast_frozen`` gives it (T5's ``wo`` kept fp32 in fp16),
  or its quantized size (``bits_per_weight``).
- Trainables are fp32 (``policies.lora.trainables_to_fp32``); gradients one fp32 copy; AdamW two
  fp32 states and a 4-byte step per tensor (``torch.optim.AdamW``), 8-bit AdamW (bitsandbytes) one
  byte per state element plus an fp32 absmax per 256 and two 256-entry code books per tensor
  (tensors under 4096 elements stay fp32); EMA one more fp32 copy.
- Activations: the denoiser's forward at batch 1 and the train resolution runs on ``meta`` under
  ``torch.autograd.graph.saved_tensors_hooks``; the bytes of the distinct storages saved for
  backward (parameters excluded) are one sample's. Times ``train.batch_size``, times 2 when the
  training recomputation evaluates both CFG branches (``DenoiserPolicy.cfg_active``: guidance !=
  1 and not guidance-distilled). With ``train.gradient_checkpointing``: the saved bytes at the
  checkpoint boundaries plus the largest block's own activations (recomputed in backward, one
  block at a time). Tolerance: the tests hold the estimate within ``ACTIVATION_TOLERANCE`` of the
  bytes saved during a real training backward of the tiny models on CPU; on an accelerator
  autocast keeps a few tensors in fp32 that the meta pass (run in the weight dtype) counts at 2
  bytes, and kernels' workspaces are not counted.
- Sampling: the no-grad forward's peak of live tensors (tracked on ``meta``) at
  ``sample.batch_size`` (x 2 with CFG); VAE decode's at ``performance.decode_batch_size`` images.
- FSDP (``fsdp.enabled``, N processes): the denoiser's frozen base, trainables, gradients and
  optimizer states are 1/N per process, plus two all-gathered blocks (the one running and the one
  prefetched) at the weight dtype, or the whole denoiser with ``reshard_after_forward=false``.

Peak = what stays resident + the largest of the phases (encoding, sampling, training), since
gradients exist only between a backward and the optimizer step (set to None after it) and
activations only inside their phase. Allocator fragmentation and the CUDA context (~0.5 GB) are not
in it.

The modules, each importing only those before it: ``settings`` (the config fields read),
``architecture`` (the components on meta), ``activations`` (the meta forwards), ``plan`` (bytes and
terms), ``verdict`` (fits or not, the knobs, the printed lines).
"""

from __future__ import annotations

from diffloop.memory.activations import (
    ACTIVATION_TOLERANCE,
    ActivationEstimate,
    SavedBytes,
    denoiser_blocks,
    denoiser_call,
    estimate_activations,
    fused_attention,
    lora_denoiser,
    parameter_storages,
    vae_decode_peak,
)
from diffloop.memory.architecture import (
    KNOWN_MODELS,
    Architecture,
    UnknownArchitecture,
    architecture,
    policy_class,
)
from diffloop.memory.plan import (
    GB,
    GIB,
    PHASES,
    MemoryPlan,
    Term,
    bits_per_weight,
    component_bytes,
    frozen_bytes,
    gb,
    memory_plan,
    optimizer_bytes,
    plan_for,
    trainable_tensors,
)
from diffloop.memory.settings import DTYPES, Settings
from diffloop.memory.verdict import (
    Knob,
    MemorySizeError,
    knobs,
    memory_summary,
    parse_size,
    plan_lines,
    verdict_lines,
)

__all__ = [
    "ACTIVATION_TOLERANCE",
    "DTYPES",
    "GB",
    "GIB",
    "KNOWN_MODELS",
    "PHASES",
    "ActivationEstimate",
    "Architecture",
    "Knob",
    "MemoryPlan",
    "MemorySizeError",
    "SavedBytes",
    "Settings",
    "Term",
    "UnknownArchitecture",
    "architecture",
    "bits_per_weight",
    "component_bytes",
    "denoiser_blocks",
    "denoiser_call",
    "estimate_activations",
    "frozen_bytes",
    "fused_attention",
    "gb",
    "knobs",
    "lora_denoiser",
    "memory_plan",
    "memory_summary",
    "optimizer_bytes",
    "parameter_storages",
    "parse_size",
    "plan_for",
    "plan_lines",
    "policy_class",
    "trainable_tensors",
    "vae_decode_peak",
    "verdict_lines",
]
