"""Serve any registry reward over HTTP: ``diffloop serve-reward NAME [options]``.

Protocol (JSON only: nothing is ever unpickled; images travel as PNG):

    POST /score   {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [{...}, ...]}
              ->  200 {"scores": [float | null, ...], "reward": NAME}   (one per image, in order;
                  null where the reward gave NaN or inf, which the client turns back into NaN)
    GET /health -> 200 {"status": "ok", "reward": NAME, "max_batch": B, "max_request_bytes": M}

    400 {"error": ...}  malformed JSON, wrong types, count mismatch, undecodable / non-RGB PNG,
                        images of different sizes, an image over ``max_image_pixels``
    411 / 413           no Content-Length / a body over ``max_request_bytes``: refused from the
                        header alone, before the body is read (it is then drained, unbuffered and
                        for at most ``DRAIN_SECONDS``, so the client reads the 413 instead of a reset)
    500 {"error": ...}  the reward raised or returned an unusable output (see registry.score)

Images are decoded to (N, 3, H, W) float32 = uint8 / 255, so a reward sees exactly the images the
client's PNG encoder quantised (``rewards.images.to_uint8``). A request larger than ``max_batch``
images is scored in chunks of ``max_batch``, results concatenated in order. Reward calls are
serialised by a lock (reward models are rarely thread-safe); the HTTP threads only parse and encode.
The server binds 127.0.0.1 unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import math
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

from diffloop.rewards.registry import RewardError, build_reward, reward_name, score

logger = logging.getLogger(__name__)

DRAIN_SECONDS = 2.0
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class BadRequest(ValueError):
    """The request is malformed; answered with 400 and this message."""


def decode_png(text: Any, index: int, max_pixels: int) -> np.ndarray:
    """base64 PNG -> (H, W, 3) uint8. Only RGB PNGs are accepted (no silent alpha or palette drop)."""
    if not isinstance(text, str):
        raise BadRequest(f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"images[{index}] is not valid base64: {exc}") from None
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.width * image.height > max_pixels:  # checked from the header, before decoding
            raise BadRequest(
                f"images[{index}] is {image.width}x{image.height}, over the server's limit of "
                f"{max_pixels} pixels"
            )
        image.load()
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for corrupt data)
        raise BadRequest(f"images[{index}] is not a decodable PNG: {exc}") from None
    if image.mode != "RGB":
        raise BadRequest(f"images[{index}] has mode {image.mode}; send 8-bit RGB PNGs")
    return np.asarray(image)


def parse_request(
    body: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """JSON body -> images (N, 3, H, W) float32 in [0, 1] (uint8 / 255), prompts [N], metadata [N].

    Raises BadRequest with a message for the client on anything malformed.
    """
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
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
    arrays = [decode_png(text, i, max_pixels) for i, text in enumerate(images)]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise BadRequest(f"all images of a request must have one size, got {sorted(sizes)}")
    stacked = torch.from_numpy(np.stack(arrays))  # (N, H, W, 3) uint8
    return stacked.permute(0, 3, 1, 2).float() / 255, prompts, metadata


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
        device: str | torch.device = "cpu",
        socket_timeout: float = 120.0,
    ) -> None:
        if max_batch < 1 or max_request_bytes < 1 or max_image_pixels < 1:
            raise ValueError("max_batch, max_request_bytes and max_image_pixels must be >= 1")
        self.reward = reward
        self.reward_name = reward_name(reward)
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.max_image_pixels = max_image_pixels
        self.device = torch.device(device)
        self.socket_timeout = socket_timeout
        self.reward_lock = threading.Lock()
        super().__init__(address, RewardRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

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


class RewardRequestHandler(BaseHTTPRequestHandler):
    """POST /score and GET /health; every answer is JSON."""

    server: RewardHTTPServer
    server_version = "diffloop-reward/1"

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # a stalled client cannot hold a thread forever
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        logger.warning("%s %s -> %d: %s", self.command, self.path, status, message)
        self.close_connection = True
        self._reply(status, {"error": message})

    def do_GET(self) -> None:
        if self.path != "/health":
            self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; use GET /health")
            return
        s = self.server
        self._reply(
            HTTPStatus.OK,
            {
                "status": "ok",
                "reward": s.reward_name,
                "max_batch": s.max_batch,
                "max_request_bytes": s.max_request_bytes,
            },
        )

    def do_POST(self) -> None:
        if self.path != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path!r}; use POST /score")
            return
        length = self._content_length()
        if length is None:
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self._error(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes")
            return
        try:
            images, prompts, metadata = parse_request(body, self.server.max_image_pixels)
        except BadRequest as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
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
    device: str | torch.device = "cpu",
) -> RewardHTTPServer:
    """A bound (not yet serving) server for ``reward``; port 0 picks a free port (see ``.url``).

    Serve with ``server.serve_forever()`` (e.g. in a thread); stop with ``server.shutdown()`` then
    ``server.server_close()``.
    """
    return RewardHTTPServer(
        (host, port),
        reward,
        max_batch=max_batch,
        max_request_bytes=max_request_bytes,
        max_image_pixels=max_image_pixels,
        device=device,
    )


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffloop serve-reward",
        description="Serve a reward over HTTP (POST /score, GET /health); use it in training with "
        "reward.name=remote reward.kwargs.url=http://HOST:PORT",
    )
    parser.add_argument("name", help="registry reward name or package.module:attr")
    parser.add_argument("--kwargs", default="{}", help="reward constructor kwargs as a JSON object")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0: all; no auth!)"
    )
    parser.add_argument("--port", type=_port, default=8765, help="port (0: any free port)")
    parser.add_argument("--max-batch", type=int, default=64, help="images per reward call")
    parser.add_argument(
        "--max-request-mb", type=float, default=64.0, help="request body limit (MB)"
    )
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="device of the images"
    )
    return parser


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
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.max_batch < 1 or args.max_request_mb <= 0:
        parser.error("--max-batch and --max-request-mb must be positive")
    reward = build_reward(args.name, **kwargs)
    return make_server(
        reward,
        args.host,
        args.port,
        max_batch=args.max_batch,
        max_request_bytes=int(args.max_request_mb * 2**20),
        device=args.device,
    )


def serve_main(argv: list[str]) -> int:
    """``diffloop serve-reward NAME [--kwargs JSON] [--host H] [--port P] ...``; serves until Ctrl-C."""
    try:
        server = server_from_argv(argv)
    # a bad reward name or kwargs, or the port in use
    except (ValueError, ImportError, TypeError, OSError) as exc:
        print(f"diffloop serve-reward: {exc}", file=sys.stderr)
        return 2
    print(
        f"serving reward {server.reward_name!r} on {server.url} (POST /score, GET /health); "
        f"train with reward.name=remote reward.kwargs.url={server.url}",
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
    "BadRequest",
    "RewardHTTPServer",
    "build_parser",
    "json_scores",
    "make_server",
    "parse_request",
    "serve_main",
    "server_from_argv",
]
