"""The config fields the memory plan reads (:class:`Settings`); the verdict's knobs are changes
of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
