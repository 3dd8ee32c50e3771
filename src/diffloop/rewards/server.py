"""Serve any registry reward over HTTP: ``diffloop serve-reward NAME [options]``.

Protocol (JSON only: nothing is ever unpickled; images travel as PNG):

    POST /score   {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...]}
              ->  200 {"scores": [float | null, ...], "reward": NAME}   (one per image, in order;
                  null where the reward gave NaN or inf, which the client turns back into NaN)
    GET /health -> 200 {"status": "ok", "reward": NAME, "max_batch": B, "max_request_bytes": M,
                        "max_image_pixels": P1, "max_request_pixels": P, "device": D}
    GET /schema -> 200 the protocol as JSON Schema (``PROTOCOL_SCHEMA``: requests and answers)

    400 {"error": ...}  malformed JSON (or not UTF-8), arrays / objects nested deeper than
                        ``MAX_JSON_DEPTH``, wrong types, count mismatch, undecodable / non-RGB PNG,
                        images of different sizes, an image over ``max_image_pixels``
    401 {"error": ...}  the server has a token and the request lacks ``Authorization: Bearer
                        TOKEN`` or carries another one (every path, /health included, so that
                        the trainer's set-up check already catches a missing or wrong token)
    405 {"error": ...}  any other method (PUT, DELETE, PATCH, HEAD, ...), with an ``Allow`` header
                        (a method HTTP does not define: 501, also JSON)
    411 / 413           no Content-Length / a body over ``max_request_bytes``: refused from the
                        header alone, before the body is read (it is then drained, unbuffered and
                        for at most ``DRAIN_SECONDS``, so the client reads the 413 instead of a reset)
    413 {"error": ...}  the images of a request hold more than ``max_request_pixels`` pixels in
                        all: refused from the PNG headers, before any image is decoded
    500 {"error": ...}  the reward raised or returned an unusable output (see registry.score); as a
                        last resort, anything else a handler raised (logged in one line)

Memory: a request is bounded twice before it is decoded: its body by ``max_request_bytes`` (from
Content-Length) and its pixels by ``max_request_pixels`` (from each PNG's IHDR chunk, read by this
module and not by Pillow, so Pillow's own decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``,
which a library may have raised or disabled, is never what protects the server). A PNG compresses a
flat image about 1000:1, so the body limit alone does not bound the decoded size. Decoding costs
about 15 bytes per pixel (the uint8 batch, then its float32 copy): the default budget, 32 images of
1024x1024 (the client's default ``batch_size`` at SDXL / FLUX size), is about 0.5 GB per request
(per request in flight: each connection is parsed in its own thread).
The JSON is checked for nesting depth by a scan of its bytes before ``json.loads`` (which recurses
once per level) sees it.

Images are decoded to (N, 3, H, W) float32 = uint8 / 255, so a reward sees exactly the images the
client's PNG encoder quantised (``rewards.images.to_uint8``). A request larger than ``max_batch``
images is scored in chunks of ``max_batch``, results concatenated in order. Reward calls are
serialised by a lock (reward models are rarely thread-safe); the HTTP threads only parse and encode.

``--device`` (any torch device string: cpu, cuda, cuda:1, mps, ...) is checked at start; the images
go there, a reward whose constructor takes ``device`` is built with it, and a model reward
(``ModelReward``) moves its networks there at start, so a wrong or full device fails at once.

Authentication: none unless a token is given (``--token``, else ``DIFFLOOP_REWARD_TOKEN``; never
printed or logged); the server binds 127.0.0.1 unless told otherwise. Over plain http the token is
readable on the network: beyond a trusted network put an https proxy in front.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import inspect
import io
import json
import logging
import math
import re
import struct
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffloop.errors import CommandParser
from diffloop.rewards.model_loading import ModelReward
from diffloop.rewards.registry import (
    RewardError,
    build_reward,
    check_reward_name,
    reward_factory,
    reward_name,
    score,
)
from diffloop.rewards.remote import TOKEN_ENV, check_token, token_from_env

logger = logging.getLogger(__name__)

DRAIN_SECONDS = 2.0
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


def resolve_device(text: str | torch.device, what: str = "device") -> torch.device:
    """A torch device string -> a device this process can allocate on; ValueError naming ``what``
    (e.g. ``--device``) if it does not parse, has no data (meta), or is not available here."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{what} {str(text)!r} is not a torch device ({exc}); e.g. cpu, cuda, cuda:1, mps"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")  # one CPU device: cpu:0 is cpu
    if device.type == "meta":
        raise ValueError(f"{what} {text}: the meta device holds no data; use cpu, cuda:N, ...")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what} {text}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{what} {text}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001  (each backend raises its own type)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what} {text}: not available here ({first})") from None
    return device


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
                             f"{size[0]}x{size[1]} but it opens as {image.width}x{image.height}")  # fmt: skip
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


def json_scores(scores: torch.Tensor) -> list[float | None]:
    """(N,) -> JSON-safe list: NaN and +-inf become null (JSON has no NaN)."""
    return [v if math.isfinite(v) else None for v in scores.double().tolist()]


class RewardHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding one reward and the limits its handler enforces."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        reward: Callable[..., Any],
        *,
        max_batch: int = 64,
        max_request_bytes: int = 64 * 2**20,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        device: str | torch.device = "cpu",
        socket_timeout: float = 120.0,
        token: str | None = None,
    ) -> None:
        if min(max_batch, max_request_bytes, max_image_pixels, max_request_pixels) < 1:
            raise ValueError(
                "max_batch, max_request_bytes, max_image_pixels and max_request_pixels must be >= 1"
            )
        # bytes, for hmac.compare_digest (its time does not depend on where the tokens differ)
        self._token = None if token is None else check_token(token, "token").encode()
        self.reward = reward
        self.reward_name = reward_name(reward)
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.device = resolve_device(device)
        self.socket_timeout = socket_timeout
        self.reward_lock = threading.Lock()
        super().__init__(address, RewardRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line for an error outside a request's handling (the base class prints a
        traceback); the handler answers its own errors (``RewardRequestHandler.handle_one_request``)."""
        exc = sys.exc_info()[1]
        logger.error("connection from %s failed: %s", client_address[0], _one_line(exc))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requires_token(self) -> bool:
        return self._token is not None

    def authorised(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (True when there is none)."""
        if self._token is None:
            return True
        scheme, _, sent = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            sent.strip().encode(), self._token
        )

    def score_batch(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """(N, 3, H, W) -> (N,) float32 with NaN for invalid, in chunks of ``max_batch``.

        Raises RewardError (the reward raised, or returned a wrong shape / non-numbers).
        """
        out = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            with self.reward_lock:
                result = score(
                    self.reward, images[chunk].to(self.device), prompts[chunk], metadata[chunk]
                )
            out.append(result.scores)
        return torch.cat(out)


def _one_line(exc: BaseException | None) -> str:
    """``Type: first line of the message`` (a log line or an answer, never a traceback)."""
    if exc is None:
        return "unknown error"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# The method each path answers (the Allow header of a 405); other paths answer 404 to GET / POST.
ALLOWED_METHODS = {"/score": "POST", "/health": "GET", "/schema": "GET"}


class RewardRequestHandler(BaseHTTPRequestHandler):
    """POST /score, GET /health and GET /schema; every answer is JSON, errors included."""

    server: RewardHTTPServer
    server_version = "diffloop-reward/1"
    _answered = False  # whether the current request's status line has been sent

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # a stalled client cannot hold a thread forever
        super().setup()

    def handle_one_request(self) -> None:
        """The base class's request cycle, with a last resort: whatever a handler raises is answered
        with a JSON 500 (unless an answer had already begun) and logged in one line, so a client is
        never left without a reply and the log never holds a traceback."""
        self._answered = False
        try:
            super().handle_one_request()
        except ConnectionError as exc:  # the client went away: nobody to answer
            self.close_connection = True
            logger.info("%s %s: connection lost (%s)", self._method(), self._path(), _one_line(exc))
        except Exception as exc:  # noqa: BLE001  (the last resort: any handler bug)
            self.close_connection = True
            logger.error("%s %s -> 500: unhandled %s", self._method(), self._path(), _one_line(exc))
            if self._answered or not self._method():
                return  # an answer has begun, or no request was read: nothing more can be sent
            try:
                self._reply(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    {"error": f"internal server error ({_one_line(exc)}); see the server's log"},
                )
            except OSError:
                pass

    def _method(self) -> str:
        return getattr(self, "command", None) or ""  # unset before a request line is read

    def _path(self) -> str:
        return getattr(self, "path", "")  # unset when the request line did not parse

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (a malformed request line, headers too long, a method HTTP
        does not define: 501) as JSON, like every other answer."""
        self._error(code, message or explain or HTTPStatus(code).phrase)

    def _method_not_allowed(self) -> None:
        """405 for PUT, DELETE, PATCH, HEAD, OPTIONS, TRACE and CONNECT, naming the allowed method."""
        allowed = ALLOWED_METHODS.get(self.path, "GET, POST")
        self._error(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"method {self.command} is not allowed on {self.path!r}; use "
            + " or ".join(f"{m} {p}" for p, m in ALLOWED_METHODS.items()),
            {"Allow": allowed},
        )
        raw = self.headers.get("Content-Length", "")
        if raw.isdigit():
            self._drain(int(raw))  # so a client still sending reads the 405, not a reset

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = (
        _method_not_allowed
    )

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _reply(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self._answered = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        logger.warning("%s %s -> %d: %s", self._method(), self._path(), status, message)
        self.close_connection = True
        self._reply(status, {"error": message}, headers)

    def _check_token(self) -> bool:
        """True if the request may proceed; else answers 401 (draining a POST's body unread)."""
        if self.server.authorised(self.headers.get("Authorization")):
            return True
        sent = "a wrong token" if self.headers.get("Authorization") else "no token"
        self._error(
            HTTPStatus.UNAUTHORIZED,
            f"this server requires a bearer token and the request carried {sent}; send "
            f"'Authorization: Bearer TOKEN' (diffloop: set {TOKEN_ENV} or reward.kwargs.token)",
            {"WWW-Authenticate": 'Bearer realm="diffloop-reward"'},
        )
        raw = self.headers.get("Content-Length", "")
        if raw.isdigit():
            self._drain(int(raw))
        return False

    def _health(self) -> dict[str, Any]:
        s = self.server
        return {
            "status": "ok",
            "reward": s.reward_name,
            "max_batch": s.max_batch,
            "max_request_bytes": s.max_request_bytes,
            "max_image_pixels": s.max_image_pixels,
            "max_request_pixels": s.max_request_pixels,
            "device": str(s.device),
        }

    def do_GET(self) -> None:
        routes = {"/health": self._health, "/schema": lambda: PROTOCOL_SCHEMA}
        if self.path not in routes:
            self._error(
                HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; use GET /health or GET /schema"
            )
            return
        if self._check_token():
            self._reply(HTTPStatus.OK, routes[self.path]())

    def do_POST(self) -> None:
        if self.path != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; use POST /score")
            return
        if not self._check_token():
            return
        length = self._content_length()
        if length is None:
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self._error(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes")
            return
        try:
            images, prompts, metadata = parse_request(
                body, self.server.max_image_pixels, self.server.max_request_pixels
            )
        except BadRequest as exc:
            self._error(exc.status, str(exc))
            return
        try:
            scores = self.server.score_batch(images, prompts, metadata)
        except RewardError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
            return
        except Exception as exc:  # noqa: BLE001  (e.g. CUDA errors: still a JSON answer)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
            return
        self._reply(
            HTTPStatus.OK, {"scores": json_scores(scores), "reward": self.server.reward_name}
        )

    def _content_length(self) -> int | None:
        """The body size from the header, or None after answering 400 / 411 / 413."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._error(
                HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send Content-Length"
            )
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return None
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            self._error(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {raw!r}")
            return None
        limit = self.server.max_request_bytes
        if length > limit:
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request of {length} bytes is over the server's limit of {limit} bytes "
                f"({limit / 2**20:g} MB); send fewer images per request (the client's batch_size) "
                "or restart the server with a larger --max-request-mb",
            )
            self._drain(length)
            return None
        return length

    def _drain(self, length: int) -> None:
        """Discard up to ``length`` unread body bytes for at most DRAIN_SECONDS (never buffered).

        Closing a socket with unread data makes the kernel send a reset, and a client still sending
        would see "connection reset" instead of the 413 already written (a lingering close, as
        nginx does).
        """
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            self.connection.settimeout(0.2)
            while length > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(length, 2**16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:  # timeout or reset: the client stopped sending
            pass


def make_server(
    reward: Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    max_batch: int = 64,
    max_request_bytes: int = 64 * 2**20,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    device: str | torch.device = "cpu",
    token: str | None = None,
) -> RewardHTTPServer:
    """A bound (not yet serving) server for ``reward``; port 0 picks a free port (see ``.url``).
    ``token``: require ``Authorization: Bearer TOKEN`` on every request (None: no authentication).
    ``max_image_pixels`` bounds each image, ``max_request_pixels`` all images of one request
    together (both read from the PNG headers before decoding; see the module docstring).
    ValueError if ``device`` is not available here (see ``resolve_device``).

    Serve with ``server.serve_forever()`` (e.g. in a thread); stop with ``server.shutdown()`` then
    ``server.server_close()``.
    """
    return RewardHTTPServer(
        (host, port),
        reward,
        max_batch=max_batch,
        max_request_bytes=max_request_bytes,
        max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels,
        device=device,
        token=token,
    )


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="diffloop serve-reward",
        description="Serve a reward over HTTP (POST /score, GET /health, GET /schema); use it in "
        "training with reward.name=remote reward.kwargs.url=http://HOST:PORT",
    )
    parser.add_argument("name", help="registry reward name or package.module:attr")
    parser.add_argument("--kwargs", default="{}", help="reward constructor kwargs as a JSON object")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0: all; set a token!)"
    )
    parser.add_argument("--port", type=_port, default=8765, help="port (0: any free port)")
    parser.add_argument("--max-batch", type=int, default=64, help="images per reward call")
    parser.add_argument(
        "--max-request-mb", type=float, default=64.0, help="request body limit (MB)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"pixels of one image (default {DEFAULT_MAX_IMAGE_PIXELS} = 4096x4096)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=DEFAULT_MAX_REQUEST_PIXELS,
        help=f"pixels of all images of one request, checked from the PNG headers before decoding "
        f"(about 15 bytes of memory each; default {DEFAULT_MAX_REQUEST_PIXELS} = 32 x 1024x1024)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of the images and of the reward's model: cpu, cuda, cuda:N, mps, ...",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV} if "
        "set, else no authentication); the environment variable keeps it out of `ps`",
    )
    return parser


def _takes_device(factory: Any) -> bool:
    try:
        return "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return False


def build_served_reward(name: str, kwargs: dict[str, Any], device: torch.device) -> Any:
    """``build_reward(name, **kwargs)`` for a server on ``device``: a constructor that takes
    ``device`` gets ``str(device)``; a model reward moves its networks to ``device`` now.

    ValueError if ``kwargs`` names another device than ``device`` (images and model would differ).
    """
    kwargs = dict(kwargs)
    if "device" in kwargs:
        if resolve_device(kwargs["device"], "--kwargs device") != device:
            raise ValueError(
                f"--kwargs sets device={kwargs['device']!r} but --device is {str(device)!r}: the "
                "images would be on another device than the reward; give the device once, as "
                "--device"
            )
    else:
        factory, constructed = reward_factory(name, kwargs)  # not: a function that is the reward
        if constructed and _takes_device(factory):
            kwargs["device"] = str(device)
    reward = build_reward(name, **kwargs)
    if isinstance(reward, ModelReward):
        reward.to(device)  # load onto the device at start: out of memory fails now, not later
    return reward


def server_from_argv(argv: list[str]) -> RewardHTTPServer:
    """Parse ``argv``, build the reward and bind the server (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        parser.error(f"--kwargs is not valid JSON: {exc}")
    if not isinstance(kwargs, dict):
        parser.error(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    if min(args.max_batch, args.max_image_pixels, args.max_request_pixels) < 1 or (
        args.max_request_mb <= 0
    ):
        parser.error(
            "--max-batch, --max-request-mb, --max-image-pixels and --max-request-pixels must be "
            "positive"
        )
    check_reward_name(args.name, kwargs)  # RewardSpecError (a ValueError): one line from serve_main
    device = resolve_device(args.device, "--device")  # ValueError: one line from serve_main
    token = token_from_env() if args.token is None else check_token(args.token, "--token")
    reward = build_served_reward(args.name, kwargs, device)
    return make_server(
        reward,
        args.host,
        args.port,
        max_batch=args.max_batch,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        device=device,
        token=token,
    )


def serve_main(argv: list[str]) -> int:
    """``diffloop serve-reward NAME [--kwargs JSON] [--host H] [--port P] ...``; serves until Ctrl-C."""
    try:
        server = server_from_argv(argv)
    # a bad reward name or kwargs, or the port in use
    except (ValueError, ImportError, TypeError, OSError) as exc:
        print(f"diffloop serve-reward: {exc}", file=sys.stderr)
        return 2
    auth = (
        f"; every request needs the bearer token (clients: set {TOKEN_ENV})"
        if server.requires_token
        else ""
    )
    print(
        f"serving reward {server.reward_name!r} on {server.url} with images on {server.device} "
        f"(POST /score, GET /health, GET /schema); train with reward.name=remote "
        f"reward.kwargs.url={server.url}{auth}",
        flush=True,
    )
    if not server.requires_token and server.server_address[0] not in ("127.0.0.1", "::1"):
        print(
            f"diffloop serve-reward: warning: listening on {server.server_address[0]} without a "
            f"token: anyone who can reach it can use the reward; set {TOKEN_ENV} or --token",
            file=sys.stderr,
            flush=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


__all__ = [
    "ALLOWED_METHODS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "MAX_JSON_DEPTH",
    "PROTOCOL",
    "PROTOCOL_SCHEMA",
    "BadRequest",
    "RequestTooLarge",
    "RewardHTTPServer",
    "build_parser",
    "build_served_reward",
    "json_depth",
    "json_scores",
    "make_server",
    "parse_request",
    "png_size",
    "resolve_device",
    "serve_main",
    "server_from_argv",
]
