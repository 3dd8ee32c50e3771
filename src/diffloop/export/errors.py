"""The export's error, shared by its modules: a LoRA that cannot be saved or copied as trained."""

from __future__ import annotations

from diffloop.errors import DiffloopError


class ExportError(DiffloopError, TypeError):
    """A policy does not say how its LoRA is saved (diffloop's own bug, or a new policy's)."""
