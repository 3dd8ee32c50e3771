"""What every family's loading shares: the error a missing or unreadable weight raises, and where
``model.pretrained`` points."""

from __future__ import annotations

import torch

from diffloop.errors import DiffloopError

# train.mixed_precision -> the dtype the frozen weights load in (trainables stay fp32). The trainer
# and every tool that reloads a run (``diffloop eval``, ``diffloop sample``) use it, so they
# sample the same network.
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(DiffloopError, RuntimeError):
    """Weights could not be found or read; the message says what was looked for and how to fix it."""


def resolve_pretrained(name: str) -> str:
    """``shapes`` -> the shapes-world weights shipped in the package; anything else unchanged."""
    if name == "shapes":
        from diffloop.shapes.model import SHIPPED_WEIGHTS_DIR

        return str(SHIPPED_WEIGHTS_DIR)
    return name
