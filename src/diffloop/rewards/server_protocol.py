"""The reward server's wire format: JSON in and out, published as JSON Schema at ``GET /schema``.

``PROTOCOL_SCHEMA`` describes every request and answer; the answers are built here
(``score_response``, ``error_response``) so that they and the schema are read side by side. The
request side is checked by ``diffloop.rewards.server_requests.parse_request``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

PROTOCOL = "diffloop-reward/1"
_ERROR = {"$ref": "#/$defs/ErrorResponse"}
# Served at GET /schema. parse_request checks the same rules by hand (with messages naming the
# field) plus those JSON Schema cannot say: equal list lengths, PNG content, one image size.
PROTOCOL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:diffloop:reward-server:1",
    "title": f"diffloop reward server protocol ({PROTOCOL})",
    "description": "JSON over HTTP; images travel as base64 PNG, nothing is pickled. A server "
    "started with a token answers 401 (ErrorResponse) to any request without the header "
    "'Authorization: Bearer TOKEN'.",
    "x-endpoints": {
        "POST /score": {
            "request": {"$ref": "#/$defs/ScoreRequest"},
            "200": {"$ref": "#/$defs/ScoreResponse"},
            "error": _ERROR,
        },
        "GET /health": {"200": {"$ref": "#/$defs/HealthResponse"}, "error": _ERROR},
        "GET /schema": {"200": {"description": "this document"}, "error": _ERROR},
    },
    "$defs": {
        "ScoreRequest": {
            "type": "object",
            "required": ["images", "prompts"],
            "properties": {
                "images": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "string",
                        "contentEncoding": "base64",
                        "contentMediaType": "image/png",
                    },
                    "description": "8-bit RGB PNGs, all of one size, each at most the server's "
                    "max_image_pixels and together at most its max_request_pixels; more than "
                    "max_batch are scored in chunks, in order",
                },
                "prompts": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "one per image",
                },
                "metadata": {
                    "type": "array",
                    "items": {"type": "object"},
                    "description": "one object per image (default: empty objects)",
                },
            },
        },
        "ScoreResponse": {
            "type": "object",
            "required": ["scores", "reward"],
            "additionalProperties": False,
            "properties": {
                "scores": {
                    "type": "array",
                    "items": {"type": ["number", "null"]},
                    "description": "one per image, in order; null where the reward gave NaN/inf",
                },
                "reward": {"type": "string", "description": "the served reward's name"},
            },
        },
        "HealthResponse": {
            "type": "object",
            "required": ["status", "reward", "max_batch", "max_request_bytes", "device"],
            "additionalProperties": False,
            "properties": {
                "status": {"const": "ok"},
                "reward": {"type": "string"},
                "max_batch": {"type": "integer", "minimum": 1},
                "max_request_bytes": {"type": "integer", "minimum": 1},
                "max_image_pixels": {"type": "integer", "minimum": 1},
                "max_request_pixels": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "pixels of all images of one request together",
                },
                "device": {"type": "string", "description": "torch device of the images"},
            },
        },
        "ErrorResponse": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {"type": "string"}},
            "description": "every status other than 200 (400, 401, 404, 405, 411, 413, 500, "
            "and 501 for a method HTTP does not define)",
        },
    },
}


def json_scores(scores: torch.Tensor) -> list[float | None]:
    """(N,) -> JSON-safe list: NaN and +-inf become null (JSON has no NaN)."""
    return [v if math.isfinite(v) else None for v in scores.double().tolist()]


def score_response(scores: torch.Tensor, reward: str) -> dict[str, Any]:
    """(N,) scores of the reward named ``reward`` -> a ``ScoreResponse``."""
    return {"scores": json_scores(scores), "reward": reward}


def error_response(message: str) -> dict[str, str]:
    """The ``ErrorResponse`` of every status other than 200."""
    return {"error": message}


__all__ = [
    "PROTOCOL",
    "PROTOCOL_SCHEMA",
    "error_response",
    "json_scores",
    "score_response",
]
