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
                        for at most ``DRAIN_SECONDS``, so the client reads the 413 instead of a
                        reset)
    413 {"error": ...}  the images of a request hold more than ``max_request_pixels`` pixels in
                        all: refused from the PNG headers, before any image is decoded
    500 {"error": ...}  the reward raised or returned an unusable output (see registry.score); as a
                        last resort, anything else a handler raised (logged in one line)

Memory: a request is bounded twice before it is decoded, its body by ``max_request_bytes`` (from
Content-Length) and its pixels by ``max_request_pixels`` (from the PNG headers), about 0.5 GB per
request at the defaults (see :mod:`diffloop.rewards.server_requests`).

Authentication: none unless a token is given (``--token``, else ``DIFFLOOP_REWARD_TOKEN``; never
printed or logged); the server binds 127.0.0.1 unless told otherwise. Over plain http the token is
readable on the network: beyond a trusted network put an https proxy in front.

This module is the command line and the public face of the server; the rest lives in:

- :mod:`diffloop.rewards.server_http`: ``RewardHTTPServer``, its request handler, ``make_server``;
- :mod:`diffloop.rewards.server_requests`: request limits and decoding (``parse_request``);
- :mod:`diffloop.rewards.server_protocol`: the wire format (``PROTOCOL_SCHEMA``, the answers);
- :mod:`diffloop.rewards.server_device`: ``--device`` and the served reward built for it.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffloop.errors import CommandParser
from diffloop.rewards.registry import check_reward_name
from diffloop.rewards.remote import TOKEN_ENV, check_token, token_from_env
from diffloop.rewards.server_device import build_served_reward, resolve_device
from diffloop.rewards.server_http import (
    ALLOWED_METHODS,
    DRAIN_SECONDS,
    RewardHTTPServer,
    RewardRequestHandler,
    make_server,
)
from diffloop.rewards.server_protocol import PROTOCOL, PROTOCOL_SCHEMA, json_scores
from diffloop.rewards.server_requests import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    MAX_JSON_DEPTH,
    BadRequest,
    RequestTooLarge,
    json_depth,
    parse_request,
    png_size,
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
        epilog='POST /score takes {"images": [base64 PNG, ...], "prompts": [...], "metadata": '
        '[{...}, ...]} and answers {"scores": [...]}, one per image; GET /schema gives the '
        "protocol as JSON Schema. The server binds 127.0.0.1 unless --host says otherwise; over "
        "plain http a token is readable on the network: beyond a trusted network, put an https "
        "proxy in front.",
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
    """``diffloop serve-reward NAME [--kwargs JSON] [--host H] [--port P] ...``; serves until
    Ctrl-C."""
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
    "DRAIN_SECONDS",
    "MAX_JSON_DEPTH",
    "PROTOCOL",
    "PROTOCOL_SCHEMA",
    "BadRequest",
    "RequestTooLarge",
    "RewardHTTPServer",
    "RewardRequestHandler",
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
