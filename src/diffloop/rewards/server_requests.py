"""What the reward server decodes from a request, and the limits it checks before decoding.

A ``POST /score`` body becomes images (N, 3, H, W) float32 = uint8 / 255, so a reward sees exactly
the images the client's PNG encoder quantised (``rewards.images.to_uint8``), plus N prompts and N
metadata objects (``parse_request``). Anything refused raises ``BadRequest`` (400) or
``RequestTooLarge`` (413) with a message for the client.

Memory: a request is bounded twice before it is decoded: its body by the server's
``max_request_bytes`` (from Content-Length, checked by the handler) and its pixels by
``max_request_pixels`` (from each PNG's IHDR chunk, read by this module and not by Pillow, so
Pillow's own decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``, which a library may have raised
or disabled, is never what protects the server). A PNG compresses a flat image about 1000:1, so
the body limit alone does not bound the decoded size. Decoding costs about 15 bytes per pixel (the
uint8 batch, then its float32 copy): the default budget, 32 images of 1024x1024 (the client's
default ``batch_size`` at SDXL / FLUX size), is about 0.5 GB per request (per request in flight:
each connection is parsed in its own thread).
The JSON is checked for nesting depth by a scan of its bytes before ``json.loads`` (which recurses
once per level) sees it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# 32 images of 1024x1024: the client's default batch_size at SDXL / FLUX size (about 0.5 GB decoded)
DEFAULT_MAX_REQUEST_PIXELS = 32 * 1024 * 1024
# A request is three levels deep plus its metadata; json.loads recurses once per level, and a body
# of a few kB nested thousands deep would otherwise end in RecursionError.
MAX_JSON_DEPTH = 64


class BadRequest(ValueError):
    """The request is malformed; answered with ``status`` (400) and this message."""

    status: int = HTTPStatus.BAD_REQUEST


class RequestTooLarge(BadRequest):
    """The request's images hold more pixels than the server decodes per request; answered 413."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


# A JSON string: from a quote to the next unescaped quote, or to the end of the body (an
# unterminated string, which json.loads refuses anyway). Possessive quantifiers and the end-of-body
# alternative make every match succeed without backtracking, so the scan is linear in the body.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = np.array([c in b"[{" for c in range(256)])


def json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep the arrays and objects of a UTF-8 JSON text nest, found without parsing it.

    Strings are cut out, every byte but the brackets dropped, and the depth is the running sum of
    +1 (``[`` ``{``) / -1 (``]`` ``}``), its maximum over the text: no recursion, O(len(body)).
    In UTF-8 a byte below 0x80 is always that ASCII character, so the bytes give the text's
    structure. The scan stops once the depth passes ``limit`` (the value returned is then > limit).
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for start in range(0, len(brackets), 2**20):  # (chunk,) int32: at most 4 MB at a time
        codes = np.frombuffer(brackets, np.uint8, count=min(2**20, len(brackets) - start),
                              offset=start)  # fmt: skip
        running = depth + np.cumsum(np.where(_OPENING[codes], 1, -1), dtype=np.int32)
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
        if deepest > limit:
            break
    return deepest


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes, index: int) -> tuple[int, int]:
    """(width, height) of a PNG from its IHDR chunk, which the format puts first (bytes 8-24:
    length, "IHDR", width, height as big-endian uint32), read without Pillow or decoding."""
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise BadRequest(f"images[{index}] is not a decodable PNG: it does not start with a PNG "
                         "signature and IHDR chunk")  # fmt: skip
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def decode_base64(text: Any, index: int) -> bytes:
    """images[index] -> its bytes; BadRequest unless it is a base64 string."""
    if not isinstance(text, str):
        raise BadRequest(f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"images[{index}] is not valid base64: {exc}") from None


def decode_png(data: bytes, index: int, size: tuple[int, int]) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8. Only RGB PNGs are accepted (no silent alpha or palette drop).

    ``size``: the (width, height) ``png_size`` read and the caller checked against its limits;
    Pillow must agree before it decodes. Its mode is read from the header, so a non-RGB image is
    refused before it is decoded too.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.size != size:
            raise BadRequest(f"images[{index}] is not a decodable PNG: its IHDR says "
                             f"{size[0]}x{size[1]} but it opens as "
                             f"{image.width}x{image.height}")  # fmt: skip
        if image.mode != "RGB":
            raise BadRequest(f"images[{index}] has mode {image.mode}; send 8-bit RGB PNGs")
        image.load()
    except BadRequest:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, when lower than the server's
        raise RequestTooLarge(
            f"images[{index}] is {size[0]}x{size[1]}, over Pillow's decompression-bomb limit "
            f"({exc}); restart the server with --max-image-pixels below it"
        ) from None
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for corrupt data)
        raise BadRequest(f"images[{index}] is not a decodable PNG: {exc}") from None
    return np.asarray(image)


def check_pixels(
    sizes: list[tuple[int, int]], max_pixels: int, max_request_pixels: int
) -> tuple[int, int]:
    """The one (width, height) of a request's images, from their headers; refuses an image over
    ``max_pixels`` (400), all of them over ``max_request_pixels`` (413), or mixed sizes (400)."""
    for i, (width, height) in enumerate(sizes):
        if width * height > max_pixels:
            raise BadRequest(
                f"images[{i}] is {width}x{height}, over the server's limit of {max_pixels} pixels"
            )
    total = sum(width * height for width, height in sizes)
    if total > max_request_pixels:
        width, height = sizes[0]
        fit = max_request_pixels // max(1, width * height)
        raise RequestTooLarge(
            f"the request's {len(sizes)} images hold {total} pixels, over the server's budget of "
            f"{max_request_pixels} pixels per request (--max-request-pixels); send at most {fit} "
            f"images of {width}x{height} per request (reward.kwargs.batch_size) or restart the "
            "server with a larger --max-request-pixels"
        )
    if len(set(sizes)) > 1:
        shapes = sorted({(height, width, 3) for width, height in sizes})
        raise BadRequest(f"all images of a request must have one size, got {shapes}")
    return sizes[0]


def parse_json(body: bytes) -> Any:
    """A UTF-8 JSON body -> its value; BadRequest if it is not UTF-8 JSON or nests deeper than
    MAX_JSON_DEPTH (checked before ``json.loads``, which recurses once per level)."""
    try:
        text = body.decode("utf-8")  # json.loads(bytes) would also guess UTF-16 / UTF-32
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: it is not UTF-8 ({exc})") from None
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(
            f"body nests arrays / objects more than {MAX_JSON_DEPTH} levels deep (at least "
            f"{depth}); a request is {{images, prompts, metadata}} with shallow metadata"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def parse_request(
    body: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """JSON body -> images (N, 3, H, W) float32 in [0, 1] (uint8 / 255), prompts [N], metadata [N].

    Every image's size is read from its PNG header and checked (``check_pixels``) before any is
    decoded; they are then decoded one by one into a single (N, H, W, 3) uint8 array.
    Raises BadRequest (RequestTooLarge: 413) with a message for the client on anything refused.
    """
    request = parse_json(body)
    if not isinstance(request, dict):
        raise BadRequest("body must be a JSON object with 'images', 'prompts' and 'metadata'")
    images, prompts = request.get("images"), request.get("prompts")
    if not isinstance(images, list) or not images:
        raise BadRequest("'images' must be a non-empty list of base64 PNG strings")
    n = len(images)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompts' must be a list of strings")
    metadata = request.get("metadata", [{} for _ in range(n)])
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest("'metadata' must be a list of objects")
    if len(prompts) != n or len(metadata) != n:
        raise BadRequest(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata")
    pngs = [decode_base64(text, i) for i, text in enumerate(images)]
    sizes = [png_size(data, i) for i, data in enumerate(pngs)]
    width, height = check_pixels(sizes, max_pixels, max_request_pixels)
    stacked = np.empty((n, height, width, 3), np.uint8)  # the only full-size uint8 copy
    for i, data in enumerate(pngs):
        stacked[i] = decode_png(data, i, (width, height))
    # div_ in place: one float32 copy of the batch, not two
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255), prompts, metadata


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "MAX_JSON_DEPTH",
    "BadRequest",
    "RequestTooLarge",
    "check_pixels",
    "decode_base64",
    "decode_png",
    "json_depth",
    "parse_json",
    "parse_request",
    "png_size",
]
