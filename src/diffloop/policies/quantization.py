"""A quantized frozen base (QLoRA for diffusion): ``model.quantization``.

The frozen components it lists (default: the denoiser, ``unet`` / ``transformer``; text encoders by
folder name) load through the quantization backends diffusers and transformers ship, by
``quantization_config=`` in ``from_pretrained`` (:func:`load_kwargs`, which the one loader,
``loading.from_pretrained``, adds): torchao (weight-only int8 / float8, CPU and CUDA),
bitsandbytes (4-bit NF4 / FP4, 8-bit; CUDA only), optimum-quanto. Only ``nn.Linear`` weights are
quantized (the backends' rule); norms, convolutions, embeddings and biases stay in the weight
dtype. peft then wraps the quantized linear layers with its LoRA layers (``TorchaoLoraLinear``,
``Linear4bit`` / ``Linear8bitLt``; quanto's ``QLinear`` is an ``nn.Linear`` and gets the plain
one), whose trainable A and B are fp32 (``lora.trainables_to_fp32``). The sampler and the training
recomputation call the same module, so they see the same quantized weights and the on-policy
ratio stays 1.

``diffloop.config.validate`` checks the settings (backend, quant_type, LoRA, the package, CUDA);
:func:`check_family_components` checks the component names once the family is known (check-config
for a local model, the loader for a hub id). Nothing here imports a backend until a model loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from diffloop.config import QuantizationConfig
from diffloop.config.schema import QUANT_TYPES, require

DENOISERS = ("unet", "transformer")

# Storage per quantized weight, in bits, for a weight matrix of rows of ROW_LENGTH inputs. Each
# backend stores the quantized values plus per-row or per-block scales (measured on torchao 0.18:
# an int8 row carries an fp32 scale and an int8 zero point, a float8 row an fp32 scale):
#   torchao int8_weight_only   8 + (32 + 8) / row          per-row scale + zero point
#   torchao float8_weight_only 8 + 32 / row                per-row fp32 scale
#   torchao int4_weight_only   4 + (16 + 16) / 128         bf16 scale + zero per group of 128
#   bitsandbytes nf4 / fp4     4 + 8 / 64 + 32 / (64 * 256) double quantization: an 8-bit absmax
#                              per block of 64, an fp32 scale per 256 absmax
#   bitsandbytes int8          8 + 32 / row                LLM.int8 fp32 row scale (SCB)
#   quanto int8 / float8       8 + 16 / row                per-row scale in the weight dtype
#   quanto int4                4 + (16 + 16) / 128         scale + shift per group of 128
ROW_LENGTH = 3072
"""Inputs per weight row :func:`bits_per_weight` assumes when not told (FLUX.1's hidden width;
the per-row overheads are then < 0.02 bits)."""

_PER_ROW_BITS: dict[tuple[str, str], tuple[float, float]] = {
    ("torchao", "int8_weight_only"): (8.0, 40.0),
    ("torchao", "float8_weight_only"): (8.0, 32.0),
    ("torchao", "int4_weight_only"): (4.0 + 32.0 / 128, 0.0),
    ("bitsandbytes", "nf4"): (4.0 + 8.0 / 64 + 32.0 / (64 * 256), 0.0),
    ("bitsandbytes", "fp4"): (4.0 + 8.0 / 64 + 32.0 / (64 * 256), 0.0),
    ("bitsandbytes", "int8"): (8.0, 32.0),
    ("quanto", "int8"): (8.0, 16.0),
    ("quanto", "float8"): (8.0, 16.0),
    ("quanto", "int4"): (4.0 + 32.0 / 128, 0.0),
}
"""(backend, quant_type) -> (bits per weight, bits per row)."""


def enabled(q: QuantizationConfig) -> bool:
    """Whether ``model.quantization`` quantizes anything (backend is not none)."""
    return q.backend != "none"


def quant_type(q: QuantizationConfig) -> str:
    """``q.quant_type``, or the backend's default (the first of ``QUANT_TYPES``)."""
    return q.quant_type or QUANT_TYPES[q.backend][0]


def bits_per_weight(
    backend: str, quant_type: str | None = None, in_features: int = ROW_LENGTH
) -> float:
    """Bits one weight of a quantized ``nn.Linear`` with ``in_features`` inputs (a row) takes in
    memory, scales included (table above); ``quant_type`` None: the backend's default. Only linear
    weights are quantized: the rest of a module stays in the weight dtype. ValueError for backend
    none (its weights take the weight dtype's bits)."""
    if backend == "none":
        raise ValueError("backend none stores weights in the weight dtype, unquantized")
    per_weight, per_row = _PER_ROW_BITS[(backend, quant_type or QUANT_TYPES[backend][0])]
    return per_weight + per_row / in_features


def describe(q: QuantizationConfig) -> str:
    """One phrase for the run header and the model card: ``torchao int8_weight_only on the
    denoiser`` (or on the listed components); ``none`` when off."""
    if not enabled(q):
        return "none"
    where = ", ".join(q.components) if q.components else "the denoiser"
    bits = bits_per_weight(q.backend, q.quant_type)
    return f"{q.backend} {quant_type(q)} on {where} ({bits:.2f} bits per weight)"


def quantizable(name: str) -> bool:
    """A component name that may be quantized: a denoiser or a text encoder."""
    return name in DENOISERS or name.startswith("text_encoder")


def check_family_components(q: QuantizationConfig, label: str, names: Sequence[str]) -> None:
    """``model.quantization.components`` are among the family's own (``label``, component
    ``names``) denoiser and text encoders (ConfigError naming those; the VAE is never
    quantized)."""
    own = [name for name in names if quantizable(name)]
    for name in q.components:
        require(
            name in own,
            f"model.quantization.components: '{name}' is not a quantizable component of "
            f"{label}; use its denoiser or text encoders: {', '.join(own)}",
        )


def quantized_names(q: QuantizationConfig, family_components: Sequence[str]) -> set[str]:
    """The component names that load quantized: ``q.components``, or the denoiser among
    ``family_components``; none when off."""
    if not enabled(q):
        return set()
    if q.components:
        return set(q.components)
    return {name for name in family_components if name in DENOISERS}


def quantization_config(q: QuantizationConfig, library: str, dtype: torch.dtype) -> Any:
    """The ``quantization_config`` object of ``library`` ("diffusers" or "transformers") for
    ``q``: TorchAoConfig (its torchao ``AOBaseConfig``), BitsAndBytesConfig (4-bit: NF4 / FP4
    with double quantization and ``dtype`` compute; 8-bit: LLM.int8) or QuantoConfig."""
    lib = importlib.import_module(library)
    kind = quant_type(q)
    if q.backend == "torchao":
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        ao = {
            "int8_weight_only": Int8WeightOnlyConfig,
            "float8_weight_only": Float8WeightOnlyConfig,
        }
        return lib.TorchAoConfig(quant_type=ao[kind]())
    if q.backend == "bitsandbytes":
        if kind == "int8":
            return lib.BitsAndBytesConfig(load_in_8bit=True)
        return lib.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    if library == "diffusers":
        return lib.QuantoConfig(weights_dtype=kind)
    return lib.QuantoConfig(weights=kind)


def load_kwargs(component_cls: str, q: QuantizationConfig, dtype: torch.dtype, device: Any) -> dict:
    """``from_pretrained`` keywords that load a component of class ``component_cls``
    (``diffusers.X`` / ``transformers.X``) quantized: the backend's config, the dtype of what stays
    unquantized (the torchao quantizer otherwise picks bf16), and on an accelerator the device
    (weights quantize there as they load; on CPU no device_map: torchao leaves weights mapped to
    "cpu" unquantized, taking them for offloaded ones)."""
    library = component_cls.split(".", 1)[0]
    kwargs: dict[str, Any] = {
        "quantization_config": quantization_config(q, library, dtype),
        ("torch_dtype" if library == "diffusers" else "dtype"): dtype,
    }
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    return kwargs


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A weight a quantization backend holds (a torchao / bitsandbytes / optimum-quanto tensor
    type): never cast or copied as a plain tensor."""
    kinds = {type(t).__module__, type(t.data).__module__}
    return any(k.split(".")[0] in ("torchao", "bitsandbytes", "optimum") for k in kinds)
