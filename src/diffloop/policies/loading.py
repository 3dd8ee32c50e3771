"""What every family's loading shares: the error a missing or unreadable weight raises, and where
``model.pretrained`` points."""

from __future__ import annotations

from diffloop.errors import DiffloopError


class ModelLoadError(DiffloopError, RuntimeError):
    """Weights could not be found or read; the message says what was looked for and how to fix it."""


def resolve_pretrained(name: str) -> str:
    """``shapes`` -> the shapes-world weights shipped in the package; anything else unchanged."""
    if name == "shapes":
        from diffloop.shapes.model import SHIPPED_WEIGHTS_DIR

        return str(SHIPPED_WEIGHTS_DIR)
    return name
