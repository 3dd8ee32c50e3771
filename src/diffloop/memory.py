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
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffloop.errors import DiffloopError

GB = 10**9
GIB = 2**30
ACTIVATION_TOLERANCE = 0.25
"""Relative tolerance of the activation estimate against a real training backward (tests)."""

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def gb(n: float) -> str:
    """Bytes as GB (10^9) with two decimals (GiB in brackets when over 1 GB)."""
    return f"{n / GB:.2f} GB" if n < GB else f"{n / GB:.2f} GB ({n / GIB:.2f} GiB)"


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The config fields the plan reads; the knobs are changes of this."""

    lora: bool = True
    lora_rank: int = 8
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    train_batch: int = 1
    sample_batch: int = 1
    decode_batch: int = 8
    guidance_scale: float = 1.0
    optimizer: str = "adamw"
    ema: bool = False
    fsdp: bool = False
    reshard_after_forward: bool = True
    processes: int = 1
    text_encoder_device: str = "accelerator"
    precompute_embeddings: bool = False
    quant_backend: str = "none"
    quant_type: str | None = None
    quant_components: tuple[str, ...] = ()
    resolution: int | None = None
    text_tokens: int | None = None

    @classmethod
    def from_config(cls, config: Any, processes: int = 1) -> Settings:
        model, train, quant = config.model, config.train, config.model.quantization
        return cls(
            lora=config.lora.enabled,
            lora_rank=config.lora.rank,
            target_modules=tuple(config.lora.target_modules),
            mixed_precision=train.mixed_precision,
            gradient_checkpointing=train.gradient_checkpointing,
            train_batch=train.batch_size,
            sample_batch=config.sample.batch_size,
            decode_batch=config.performance.decode_batch_size,
            guidance_scale=config.sample.guidance_scale,
            optimizer=train.optimizer,
            ema=train.ema_decay is not None,
            fsdp=config.fsdp.enabled,
            reshard_after_forward=config.fsdp.reshard_after_forward,
            processes=processes,
            text_encoder_device=model.text_encoder_device,
            precompute_embeddings=config.prompts.precompute_embeddings,
            quant_backend=quant.backend,
            quant_type=quant.quant_type,
            quant_components=tuple(quant.components),
            resolution=model.resolution,
            text_tokens=_configured_text_tokens(model),
        )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.mixed_precision]


def _configured_text_tokens(model: Any) -> int | None:
    """The family sections' max_sequence_length (whichever is set; the family picks its own)."""
    for name in ("flux", "flux2", "sd3", "qwen_image", "zimage"):
        value = getattr(getattr(model, name, None), "max_sequence_length", None)
        if value is not None:
            return value
    return None


# ----------------------------------------------------------------------------- quantization

# bits per weight of a quantized Linear weight (K = input features): the stored values plus their
# scales. torchao int8 weight-only: one scale per output channel (bf16, 16/K bits per weight);
# int4: groups of 128 with a bf16 scale and zero point (32/128); bitsandbytes nf4/fp4: blocks of
# 64 with an fp32 absmax (0.5 bit; 0.127 with double quantization, not assumed); int8 (LLM.int8):
# one fp32 scale per row; quanto: per-channel fp32 scales, int4 groups of 128.
_BITS: dict[tuple[str, str], Callable[[int], float]] = {
    ("torchao", "int8_weight_only"): lambda k: 8 + 16 / k,
    ("torchao", "float8_weight_only"): lambda k: 8 + 32 / k,
    ("torchao", "int4_weight_only"): lambda k: 4 + 32 / 128,
    ("bitsandbytes", "nf4"): lambda k: 4 + 32 / 64,
    ("bitsandbytes", "fp4"): lambda k: 4 + 32 / 64,
    ("bitsandbytes", "int8"): lambda k: 8 + 32 / k,
    ("quanto", "int8"): lambda k: 8 + 32 / k,
    ("quanto", "float8"): lambda k: 8 + 32 / k,
    ("quanto", "int4"): lambda k: 4 + 32 / 128,
}
DEFAULT_QUANT_TYPE = {"torchao": "int8_weight_only", "bitsandbytes": "nf4", "quanto": "int8"}


def bits_per_weight(backend: str, quant_type: str | None, in_features: int) -> float:
    """Bits one weight of a quantized Linear layer with ``in_features`` inputs takes, scales
    included (``diffloop.policies.quantization.bits_per_weight`` when that module defines it)."""
    qtype = quant_type or DEFAULT_QUANT_TYPE[backend]
    with contextlib.suppress(ImportError, AttributeError):
        module = importlib.import_module("diffloop.policies.quantization")
        return float(module.bits_per_weight(backend, qtype, in_features))
    return _BITS[(backend, qtype)](in_features)


# ----------------------------------------------------------------------------- the architecture


@dataclass
class Architecture:
    """A model's weight-bearing components on ``meta`` and where their configs came from."""

    family: str
    source: str
    components: dict[str, torch.nn.Module]
    denoiser_name: str
    text_encoder_names: tuple[str, ...]
    extra_layers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """{component: [(ModuleList path, real length)]}: a component built shallower than the real
    one (the bench's text encoders); its bytes add the missing layers at the first layer's."""
    text_cap: int | None = None
    """The long-text tokenizer's model_max_length (the text is at most this long), when read."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components[self.denoiser_name]

    @property
    def vae(self) -> torch.nn.Module | None:
        return self.components.get("vae")


class UnknownArchitecture(Exception):
    """No config of the model is reachable; the message says why (one line)."""


def _t5_xxl() -> dict[str, Any]:
    """google/t5-v1_1-xxl's encoder (FLUX.1's text_encoder_2, SD3's text_encoder_3)."""
    from diffloop.testing.tiny_flux import FLUX_CONFIGS

    return dict(FLUX_CONFIGS["dev"]["text_encoder_2"], num_layers=24)


def _known_sd3() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from transformers import T5EncoderModel

    from diffloop.testing.tiny_flow import build_sd3_components, make_t5_tokenizer, t5_config

    parts = build_sd3_components("sd35_medium", device="meta", with_t5=False)
    with torch.device("meta"):
        parts["text_encoder_3"] = T5EncoderModel(t5_config(_t5_xxl(), make_t5_tokenizer()))
    return parts, {}


def _known_flux(guidance: bool) -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_flux import build_flux_components

    parts = build_flux_components("dev", guidance_embeds=guidance, device="meta")
    return parts, {"text_encoder_2": [("encoder.block", 24)]}


def _known_flux2(size: str) -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_flux2 import build_flux2_components

    parts = build_flux2_components(size, device="meta")
    # Mistral-Small-3.1-24B: 40 language layers, 24 Pixtral vision layers (bench builds 3 and 1)
    extra = {
        "text_encoder": [("language_model.layers", 40), ("vision_tower.transformer.layers", 24)]
    }
    return parts, extra if size == "dev" else {}


def _known_qwen_image() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_qwen_image import build_qwen_image_components

    parts = build_qwen_image_components("qwen_image", device="meta")
    # Qwen2.5-VL-7B: 28 language layers, 32 vision blocks (bench builds 2 and 1)
    return parts, {"text_encoder": [("language_model.layers", 28), ("visual.blocks", 32)]}


def _known_zimage() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_zimage import build_zimage_components

    return build_zimage_components("z_image", device="meta"), {}


def _known_sdxl() -> tuple[dict[str, Any], dict[str, list[tuple[str, int]]]]:
    from diffloop.testing.tiny_sdxl import build_sdxl_components

    return build_sdxl_components("base", device="meta"), {}


KNOWN_MODELS: dict[str, tuple[str, Callable[[], tuple[dict[str, Any], dict]]]] = {
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", _known_sd3),
    "black-forest-labs/FLUX.1-dev": ("flux", lambda: _known_flux(True)),
    "black-forest-labs/FLUX.1-schnell": ("flux", lambda: _known_flux(False)),
    "black-forest-labs/FLUX.2-dev": ("flux2", lambda: _known_flux2("dev")),
    "black-forest-labs/FLUX.2-klein-4B": ("flux2_klein", lambda: _known_flux2("klein_4b")),
    "black-forest-labs/FLUX.2-klein-base-4B": ("flux2_klein", lambda: _known_flux2("klein_4b")),
    "Qwen/Qwen-Image": ("qwen_image", _known_qwen_image),
    "Tongyi-MAI/Z-Image": ("zimage", _known_zimage),
    "Tongyi-MAI/Z-Image-Turbo": ("zimage", _known_zimage),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", _known_sdxl),
}
"""Hub ids whose architecture is known without the hub: the configs ``diffloop bench`` builds
(``diffloop.testing.tiny_*``: the models' config.json values), text encoders at full depth."""


def _policy_class(family_name: str) -> type:
    """The family's policy class (``DenoiserPolicy`` subclass whose family_name it is)."""
    from diffloop.policies.families import family

    module = importlib.import_module(family(family_name).loader.split(":")[0])
    for value in vars(module).values():
        if isinstance(value, type) and getattr(value, "family_name", None) == family_name:
            return value
    raise UnknownArchitecture(f"no policy class of family {family_name}")


def _build_from_directory(family_name: str, root: Path) -> dict[str, torch.nn.Module]:
    """Every weight-bearing component of the family found in ``root``, built on meta from its
    config.json."""
    from diffloop.policies.families import family

    built: dict[str, torch.nn.Module] = {}
    for c in family(family_name).components:
        folder = root / c.name
        if not c.has_weights or not (folder / "config.json").is_file():
            continue
        cls = c.load_class()
        with torch.device("meta"):
            if hasattr(cls, "config_class") and cls.config_class is not None:  # transformers
                config = cls.config_class.from_pretrained(str(folder))
                built[c.name] = cls(config)
            else:  # diffusers ModelMixin
                built[c.name] = cls.from_config(cls.load_config(str(folder)))
    return built


def architecture(pretrained: str, revision: str | None = None) -> Architecture:
    """The model's components on meta: a local directory (or ``shapes``), a hub id whose snapshot
    is in the cache, or a ``KNOWN_MODELS`` id; else :class:`UnknownArchitecture`."""
    from diffloop.policies.families import family_of
    from diffloop.policies.loading import (
        ModelFiles,
        cached_snapshot,
        looks_local,
        read_model_index,
        resolve_pretrained,
    )

    path = resolve_pretrained(pretrained)
    root: Path | None = Path(path) if looks_local(path) else None
    source = f"config.json files in {path}"
    if root is None:
        snapshot = cached_snapshot(pretrained, "model_index.json", revision)
        if snapshot is not None:
            root, source = snapshot, "config.json files in the hub cache"
    if root is not None:
        if not root.is_dir():
            raise UnknownArchitecture(f"{path} is not a directory")
        files = ModelFiles(pretrained, str(root), read_model_index(str(root), pretrained))
        name = family_of(files)
        parts = _build_from_directory(name, root)
        extra: dict[str, list[tuple[str, int]]] = {}
    elif pretrained in KNOWN_MODELS:
        name, build = KNOWN_MODELS[pretrained]
        parts, extra = build()
        source = f"{pretrained}'s config.json values (as `diffloop bench` builds them)"
    else:
        raise UnknownArchitecture(
            f"{pretrained} is neither a local directory nor in the hub cache, and its config is "
            "not among the known models"
        )
    cls = _policy_class(name)
    denoiser = cls.lora_component
    modules = {k: v for k, v in parts.items() if isinstance(v, torch.nn.Module)}
    if denoiser not in modules:
        raise UnknownArchitecture(f"no {denoiser}/config.json in {source}")
    names = tuple(n for n in cls.text_encoder_names if n in modules)
    cap = _tokenizer_cap(root, LONG_TOKENIZER.get(name, "tokenizer")) if root else None
    return Architecture(name, source, modules, denoiser, names, extra, cap)


LONG_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
"""The tokenizer of the family's long text (the others': ``tokenizer``)."""


def _tokenizer_cap(root: Path, folder: str) -> int | None:
    """``model_max_length`` of ``root/folder/tokenizer_config.json`` (None if absent or huge:
    transformers writes 1e30 for "no limit")."""
    import json

    path = root / folder / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and value < 10**6 else None


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


def lora_denoiser(arch: Architecture, s: Settings) -> torch.nn.Module:
    """A meta copy of the denoiser with the run's LoRA adapter (``policies.lora.add_lora``, the
    family's default targets when lora.target_modules is left at its default)."""
    from diffloop.config import LoraConfig
    from diffloop.policies.lora import add_lora

    module = copy.deepcopy(arch.denoiser)
    config = LoraConfig(enabled=True, rank=s.lora_rank, target_modules=list(s.target_modules))
    add_lora(module, config, _policy_class(arch.family).DEFAULT_LORA_TARGETS)
    return module


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


# ----------------------------------------------------------------------------- activations


class _SavedBytes:
    """Distinct storages saved for backward (parameters excluded), as a saved_tensors_hooks
    pair: ``total`` bytes."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude:
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @contextlib.contextmanager
    def hooks(self) -> Iterator[_SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


class _FlashAttention(torch.autograd.Function):
    """Scaled dot-product attention as the fused kernels store it (flash / memory-efficient on
    GPUs, flash on CPU): the output (..., L, Dv), and for backward q, k, v, the output and an fp32
    logsumexp (..., L); meta's own path would be the math one, which materialises (L, L)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(*args: Any, **kw: Any) -> Any:
    """``F.scaled_dot_product_attention``'s signature (query, key, value positional or named)."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if i < len(args) else kw[n] for i, n in enumerate(names))
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as ``_FlashAttention`` inside (meta passes)."""
    from unittest import mock

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa):
        yield


def parameter_storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage()._cdata for p in module.parameters()} | {
        b.untyped_storage()._cdata for b in module.buffers()
    }


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors produced inside (no-grad passes on meta): each new storage is
    counted until its tensor is freed (``weakref.finalize``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _drop(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.seen:
                    n = t.untyped_storage().nbytes()
                    self.seen.add(key)
                    self.live += n
                    weakref.finalize(t, self._drop, key, n)
        self.peak = max(self.peak, self.live)
        return out


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's per-block units (the classes diffusers' ``_no_split_modules`` names, else
    the UNet's down/mid/up blocks)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in module.modules() if type(m).__name__ in names]
    if found:
        return found
    return [m for attr in ("down_blocks", "up_blocks") for m in getattr(module, attr, [])] + (
        [module.mid_block] if getattr(module, "mid_block", None) is not None else []
    )


def _latent_side(arch: Architecture, s: Settings) -> tuple[int, int]:
    """(image side, latent side) of the run: model.resolution (else the family's default) over
    the VAE's downsampling."""
    vae = arch.vae
    cfg = getattr(vae, "config", None)
    if cfg is None:
        factor = 1
    elif hasattr(cfg, "temperal_downsample"):
        factor = 2 ** len(cfg.temperal_downsample)
    else:
        factor = 2 ** (len(cfg.block_out_channels) - 1)
    dcfg = arch.denoiser.config
    if s.resolution is not None:
        side = s.resolution
    elif hasattr(dcfg, "sample_size") and arch.family in ("sd", "sdxl", "sd3"):
        size = dcfg.sample_size
        side = (size if isinstance(size, int) else size[0]) * factor
    else:
        side = 1024
    return side, side // factor


DEFAULT_TEXT_TOKENS = {"sd": 77, "sdxl": 77, "sd3": 256, "flux": 512, "flux2": 512,
                       "flux2_klein": 512, "qwen_image": 512, "zimage": 512}  # fmt: skip


def _text_tokens(arch: Architecture, s: Settings) -> int:
    n = s.text_tokens if s.text_tokens is not None else DEFAULT_TEXT_TOKENS[arch.family]
    if arch.text_cap is not None and arch.family not in ("sd", "sdxl"):
        n = min(n, arch.text_cap)
    return 77 + n if arch.family == "sd3" else (77 if arch.family in ("sd", "sdxl") else n)


def denoiser_call(
    arch: Architecture, module: torch.nn.Module, s: Settings, batch: int, dtype: torch.dtype
) -> Callable[[], Any]:
    """A call of ``module`` (the denoiser) on meta inputs of one training forward's shapes: the
    latents at the train resolution and ``_text_tokens`` of text."""
    meta = torch.device("meta")
    _, side = _latent_side(arch, s)
    text = _text_tokens(arch, s)
    c = module.config
    t = torch.ones(batch, device=meta)

    def rand(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=meta, dtype=dtype)

    f = arch.family
    if f in ("sd", "sdxl"):
        kwargs: dict[str, Any] = {"encoder_hidden_states": rand(batch, text, c.cross_attention_dim)}
        if f == "sdxl":
            time_ids = 6 * c.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": rand(batch, c.projection_class_embeddings_input_dim - time_ids),
                "time_ids": rand(batch, 6),
            }
        x = rand(batch, c.in_channels, side, side)
        return lambda: module(x, t, **kwargs).sample
    if f == "sd3":
        x = rand(batch, c.in_channels, side, side)
        text_states = rand(batch, text, c.joint_attention_dim)
        pooled = rand(batch, c.pooled_projection_dim)
        return lambda: module(
            hidden_states=x, timestep=t, encoder_hidden_states=text_states,
            pooled_projections=pooled, return_dict=False,
        )[0]  # fmt: skip
    tokens = (side // 2) ** 2
    if f == "flux":
        from diffloop.policies.flux import latent_image_ids, text_ids

        x = rand(batch, tokens, c.in_channels)
        kwargs = {
            "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
            "pooled_projections": rand(batch, c.pooled_projection_dim),
            "txt_ids": text_ids(text, meta),
            "img_ids": latent_image_ids(side, side, meta),
        }
        if c.guidance_embeds:
            kwargs["guidance"] = torch.ones(batch, device=meta)
        return lambda: module(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    if f in ("flux2", "flux2_klein"):
        from diffloop.policies.flux2 import position_ids

        x = rand(batch, tokens, c.in_channels)
        kwargs = {"encoder_hidden_states": rand(batch, text, c.joint_attention_dim)}
        kwargs |= position_ids(batch, side // 2, side // 2, text, meta)
        if c.guidance_embeds:
            kwargs["guidance"] = torch.ones(batch, device=meta)
        return lambda: module(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    if f == "qwen_image":
        x = rand(batch, tokens, c.in_channels)
        kwargs = {
            "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
            "img_shapes": [[(1, side // 2, side // 2)]] * batch,
        }
        return lambda: module(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    if f == "zimage":
        from diffloop.policies.zimage import call_transformer

        x = rand(batch, c.in_channels, side, side)
        caps = [rand(text, c.cap_feat_dim) for _ in range(batch)]
        return lambda: call_transformer(module, x, t, caps, dtype)
    raise UnknownArchitecture(f"no meta forward for family {f}")


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes saved for backward by one sample's denoiser forward (``full``), with gradient
    checkpointing (``checkpointed``: the boundaries plus the largest block's own), and the
    no-grad forward's peak of live tensors (``sampling``)."""

    full: int
    checkpointed: int
    sampling: int


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module``'s floating tensors in ``dtype`` (a meta copy; diffusers' ``.to`` would warn)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return module


def estimate_activations(arch: Architecture, s: Settings) -> ActivationEstimate:
    """Run the denoiser's forward on meta at batch 1 (with the run's LoRA or all trainable) and
    measure the saved and the live bytes (module docstring)."""
    dtype = s.dtype
    module = _cast(lora_denoiser(arch, s) if s.lora else copy.deepcopy(arch.denoiser), dtype)
    if s.lora:
        module.requires_grad_(False)
        for n, p in module.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        module.requires_grad_(True)
    module.train()
    exclude = parameter_storages(module)
    call = denoiser_call(arch, module, s, 1, dtype)
    blocks = _blocks(module)
    per_block: list[int] = []
    saved = _SavedBytes(exclude)

    def before(_m: Any, _a: Any) -> None:
        per_block.append(-saved.total)

    def after(_m: Any, _a: Any, _o: Any) -> None:
        per_block[-1] += saved.total

    handles = [b.register_forward_pre_hook(before) for b in blocks]
    handles += [b.register_forward_hook(after) for b in blocks]
    try:
        with saved.hooks(), fused_attention():
            call()
    finally:
        for h in handles:
            h.remove()
    full = saved.total
    checkpointed = full
    if getattr(module, "_supports_gradient_checkpointing", False):
        module.enable_gradient_checkpointing()
        boundary = _SavedBytes(exclude)
        with boundary.hooks(), fused_attention():
            call()
        checkpointed = boundary.total + max(per_block, default=0)
        module.disable_gradient_checkpointing()
    live = _LiveBytes()
    with torch.no_grad(), fused_attention(), live:
        call()
    return ActivationEstimate(full, min(checkpointed, full), live.peak)


def vae_decode_peak(arch: Architecture, s: Settings, batch: int) -> int:
    """Peak live bytes of decoding ``batch`` latents (no grad, on meta) in the VAE's dtype."""
    vae = arch.vae
    if vae is None:
        return 0
    dtype = torch.float32 if _vae_fp32(arch, s) else s.dtype
    module = _cast(copy.deepcopy(vae), dtype)
    _, side = _latent_side(arch, s)
    channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim
    shape = (batch, channels, 1, side, side) if arch.family == "qwen_image" else (
        batch, channels, side, side)  # fmt: skip
    z = torch.empty(*shape, device="meta", dtype=dtype)
    live = _LiveBytes()
    with torch.no_grad(), fused_attention(), live:
        module.decode(z)
    return live.peak


def _vae_fp32(arch: Architecture, s: Settings) -> bool:
    upcast = _policy_class(arch.family).upcast_vae
    return upcast and bool(getattr(arch.vae.config, "force_upcast", False))


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
        quant = (s.quant_backend, s.quant_type or DEFAULT_QUANT_TYPE[s.quant_backend])
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
        vae_dtype = torch.float32 if _vae_fp32(arch, s) else dtype
        terms.append(Term("frozen vae", frozen_bytes(arch.vae, vae_dtype), note=str(vae_dtype)))

    # training phase
    terms.append(Term("gradients", math.ceil(train_bytes / n), "training", "fp32" + shard))
    evals = 2 if s.guidance_scale != 1.0 and not _policy_class(arch.family).guidance_distilled \
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
        blocks = _blocks(arch.denoiser)
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
        return MemoryPlan([], s, unknown=[f"{why} ({_one_line(e)})"])
    return plan_for(arch, s)


def plan_for(arch: Architecture, s: Settings) -> MemoryPlan:
    acts: ActivationEstimate | None
    why = ""
    try:
        acts = estimate_activations(arch, s)
    except Exception as e:  # noqa: BLE001 -- a forward meta cannot run: an unknown term, one line
        acts, why = None, f"{type(e).__name__}: {_one_line(e)}"[:200]
    plan = _plan_terms(arch, s, acts)
    if acts is None:
        plan.unknown[-1] = f"activations: the denoiser's forward did not run on meta ({why})"
    plan.source = arch.source
    return plan


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------- the verdict


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
        return [f"memory plan (arithmetic): not computed ({type(e).__name__}: {_one_line(e)})"]
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
