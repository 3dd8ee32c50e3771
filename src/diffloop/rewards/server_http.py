"""The reward server over HTTP: ``RewardHTTPServer`` (one reward, its limits, its device), its
request handler (the routes, every answer JSON) and ``make_server``.

A request larger than ``max_batch`` images is scored in chunks of ``max_batch``, results
concatenated in order. Reward calls are serialised by a lock (reward models are rarely
thread-safe); the HTTP threads only parse and encode. The protocol, its status codes and the
command line are described in :mod:`diffloop.rewards.server`.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from diffloop.rewards.registry import RewardError, reward_name, score
from diffloop.rewards.remote import TOKEN_ENV, check_token
from diffloop.rewards.server_device import resolve_device
from diffloop.rewards.server_protocol import (
    PROTOCOL,
    PROTOCOL_SCHEMA,
    error_response,
    score_response,
)
from diffloop.rewards.server_requests import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    BadRequest,
    parse_request,
)

# The server's one log name (that of `diffloop serve-reward`), which a user filters on.
logger = logging.getLogger("diffloop.rewards.server")

DRAIN_SECONDS = 2.0


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
        traceback); the handler answers its own errors
        (``RewardRequestHandler.handle_one_request``)."""
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
    server_version = PROTOCOL
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
                    error_response(
                        f"internal server error ({_one_line(exc)}); see the server's log"
                    ),
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
        """405 for PUT, DELETE, PATCH, HEAD, OPTIONS, TRACE and CONNECT, naming the allowed
        method."""
        allowed = ALLOWED_METHODS.get(self.path, "GET, POST")
        self._error(
            HTTPStatus.METHOD_NOT_ALLOWED,
            f"method {self.command} is not allowed on {self.path!r}; use "
            + " or ".join(f"{m} {p}" for p, m in ALLOWED_METHODS.items()),
            {"Allow": allowed},
        )
        self._drain_refused_body()

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
        self._reply(status, error_response(message), headers)

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
        self._drain_refused_body()
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
        self._reply(HTTPStatus.OK, score_response(scores, self.server.reward_name))

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

    def _drain_refused_body(self) -> None:
        """After refusing a request from its headers: drain the body its Content-Length announces
        (if any), so that a client still sending reads the answer, not a reset."""
        raw = self.headers.get("Content-Length", "")
        if raw.isdigit():
            self._drain(int(raw))

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
    together (both read from the PNG headers before decoding; see
    :mod:`diffloop.rewards.server_requests`).
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


__all__ = [
    "ALLOWED_METHODS",
    "DRAIN_SECONDS",
    "RewardHTTPServer",
    "RewardRequestHandler",
    "make_server",
]
