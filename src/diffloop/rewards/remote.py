"""A reward computed by a ``diffloop serve-reward`` server (see :mod:`diffloop.rewards.server`).

    reward.name: remote
    reward.kwargs: {url: "http://127.0.0.1:8765", timeout: 60, retries: 3, backoff: 1.0}

A server started with a token (``--token`` or ``DIFFLOOP_REWARD_TOKEN``) wants it on every request
as ``Authorization: Bearer TOKEN``. The client sends ``reward.kwargs.token``, else the
``DIFFLOOP_REWARD_TOKEN`` environment variable; prefer the variable, since reward kwargs are written
to the run's config.yaml. The token is never logged or shown in errors or ``repr``. Over plain
http it travels in clear text: beyond a trusted network, put the server behind https.

Images (N, 3, H, W) in [0, 1] are sent as base64 PNGs of ``to_uint8(images)`` (lossless after the
same uint8 rounding every local reward applies), ``batch_size`` images per POST, with prompts and
metadata as JSON (metadata must be JSON-serialisable). Nothing is pickled.

Failure policy (never a silent zero):
- Connection refused / reset, a timeout, or an HTTP 5xx: retried ``retries`` times after the first
  attempt, sleeping ``backoff * 2**k`` seconds before retry k (k = 0, 1, ...: 1, 2, 4 s by default).
  Still failing, a :class:`~diffloop.rewards.registry.RewardError` says either that the server is
  unreachable and how to start it, or, when it did answer (5xx), its HTTP status and its message
  (the reward failed on the server: see its log); and that the run keeps its last checkpoint and
  resumes with ``resume=true``.
- HTTP 4xx (a malformed or oversized request): RewardError at once, with the server's message; a
  retry would get the same answer. HTTP 401 says whether a token was sent and where to set it.
- A 200 answer that is not JSON, lacks ``scores``, has the wrong number of them, or holds anything
  but numbers and nulls: RewardError at once.
- ``null`` scores (the server's reward gave NaN or inf) become NaN, which ``score()`` counts as
  invalid and the trainer leaves out.

The trainer asks every remote reward's ``GET /health`` at set-up (:func:`check_servers`), so a
server that is down fails the run before the first sampling, not after it.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import torch

from diffloop.rewards.images import to_pil_images
from diffloop.rewards.registry import RewardError

_sleep = time.sleep  # module-level so tests can record the backoff without waiting

TOKEN_ENV = "DIFFLOOP_REWARD_TOKEN"  # the bearer token, for the server and the client alike


def check_token(token: str, where: str) -> str:
    """``token`` if it can travel in an ``Authorization: Bearer`` header (non-empty, printable
    ASCII, no spaces); ValueError naming ``where`` (never the token itself) otherwise."""
    if not token or not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{where}: the bearer token must be non-empty printable ASCII without spaces"
        )
    return token


def token_from_env() -> str | None:
    """The token in ``DIFFLOOP_REWARD_TOKEN``, checked; None when the variable is unset."""
    token = os.environ.get(TOKEN_ENV)
    return None if token is None else check_token(token, f"environment variable {TOKEN_ENV}")


# kwarg -> (lower bound, whether the bound itself is allowed)
_NUMBER_KWARGS = {"timeout": (0, False), "retries": (0, True), "backoff": (0, True),
                  "batch_size": (1, True)}  # fmt: skip


def check_remote_kwargs(kwargs: dict[str, Any]) -> None:
    """ValueError (one line, naming the kwarg and the fix) unless ``kwargs`` can build a
    :class:`RemoteReward`: ``url`` an http(s)://HOST[:PORT] string, ``timeout`` > 0,
    ``retries`` >= 0, ``backoff`` >= 0, ``batch_size`` >= 1, a token that fits a header. Values only
    (unknown kwargs are the registry's check, ``check_reward_kwargs``); contacts nothing."""
    if "url" not in kwargs:
        raise ValueError(
            "needs the kwarg url=http://HOST:PORT, the address of a `diffloop serve-reward` "
            "server (e.g. url=http://127.0.0.1:8765)"
        )
    url = kwargs["url"]
    parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        fix = f"http://{url}" if isinstance(url, str) and "://" not in url else "http://HOST:PORT"
        raise ValueError(
            f"url={url!r} must start with http:// or https:// and name a host; e.g. url={fix}"
        )
    for key, (low, inclusive) in _NUMBER_KWARGS.items():
        value = kwargs.get(key, low + 1)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or value < low or (value == low and not inclusive):
            raise ValueError(f"need {key} {'>=' if inclusive else '>'} {low}, got {key}={value!r}")
    token = kwargs.get("token")
    if token is not None:
        check_token(token if isinstance(token, str) else "", "token")


class _Retryable(Exception):
    """A failure worth retrying (connection, timeout, 5xx); the message says what happened.

    ``status``: the HTTP status when the server answered (5xx), None when it could not be reached.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def encode_png_base64(images: torch.Tensor) -> list[str]:
    """(N, 3, H, W) in [0, 1] -> N base64 ASCII strings of RGB PNGs of ``to_uint8(images)``."""
    out = []
    for image in to_pil_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # lossless at any level; 1 is fastest
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def parse_scores(payload: bytes, n: int, url: str) -> torch.Tensor:
    """A 200 answer -> (n,) float32, null -> NaN; RewardError if it is not exactly n
    numbers/nulls."""
    try:
        response = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RewardError(f"reward server at {url} answered with invalid JSON ({exc})") from None
    if not isinstance(response, dict) or "scores" not in response:
        raise RewardError(
            f"reward server at {url} answered without a 'scores' list: {str(response)[:200]}"
        )
    scores = response["scores"]
    if not isinstance(scores, list) or len(scores) != n:
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise RewardError(
            f"reward server at {url} returned {got} scores for {n} images; expected ({n},)"
        )
    values = []
    for i, v in enumerate(scores):
        if v is None:
            values.append(math.nan)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            values.append(float(v))
        else:
            raise RewardError(
                f"reward server at {url} returned a non-numeric score {v!r} at index {i}"
            )
    return torch.tensor(values, dtype=torch.float32)


class RemoteReward:
    """Scores images on a reward server (``diffloop serve-reward NAME --port P``).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8765`` (POSTs go to ``url/score``).
        timeout: seconds per HTTP request (connect and each read).
        retries: extra attempts after the first on connection errors, timeouts and 5xx answers.
        backoff: seconds before the first retry; doubled before each further one.
        batch_size: images per request (keep requests under the server's --max-request-mb).
        proxy_from_env: honour ``http_proxy``-style environment variables (off by default: reward
            servers are on the local network, and a proxy would see every image).
        name: name in logs (default ``remote``).
        token: bearer token of a server started with one; default: ``DIFFLOOP_REWARD_TOKEN``
            from the environment (preferred: kwargs are recorded in the run's config.yaml).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 32,
        proxy_from_env: bool = False,
        name: str = "remote",
        token: str | None = None,
    ) -> None:
        values = {"url": url, "timeout": timeout, "retries": retries, "backoff": backoff}
        try:
            self.check_kwargs({**values, "batch_size": batch_size})
        except ValueError as exc:
            raise ValueError(f"remote reward: {exc}") from None
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.batch_size = int(batch_size)
        self.name = name
        # the token is kept private and named in messages only by where it came from
        self._token_source = TOKEN_ENV if token is None else "reward.kwargs.token"
        self._token = token_from_env() if token is None else check_token(token, self._token_source)
        handlers = [] if proxy_from_env else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    # what a config check calls before anything is built (diffloop.rewards.registry)
    check_kwargs = staticmethod(check_remote_kwargs)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) float32 (NaN where the server sent null)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out.append(self._score_chunk(images[chunk], prompts[chunk], metadata[chunk]))
        return torch.cat(out) if out else torch.zeros(0)

    def health(self) -> dict[str, Any]:
        """GET /health -> the server's JSON ({"status": "ok", "reward": NAME, ...}); with
        retries."""
        payload = self._with_retries(lambda: self._request("/health", None), what="GET /health")
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RewardError(f"reward server at {self.url}: /health is not JSON ({exc})") from None

    def _score_chunk(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        try:
            body = json.dumps(
                {"images": encode_png_base64(images), "prompts": prompts, "metadata": metadata},
                allow_nan=False,
            ).encode()
        except (TypeError, ValueError) as exc:
            raise RewardError(
                f"remote reward: prompts/metadata are not JSON-serialisable ({exc})"
            ) from exc
        payload = self._with_retries(
            lambda: self._request("/score", body), what=f"POST /score ({len(body) / 2**20:.1f} MB)"
        )
        return parse_scores(payload, len(prompts), self.url)

    def _request(self, path: str, body: bytes | None) -> bytes:
        """One HTTP request -> the 200 body. _Retryable on connection errors/timeouts/5xx."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(
            self.url + path,
            data=body,
            headers=headers,
            method="POST" if body is not None else "GET",
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            message = _server_message(exc)
            if exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {message}", status=exc.code) from exc
            if exc.code == 401:
                raise RewardError(self._unauthorised(message)) from exc
            raise RewardError(
                f"reward server at {self.url} refused the request with HTTP {exc.code}: {message}"
            ) from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            # URLError wraps refused/unresolvable; OSError covers timeouts and resets mid-read
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"{type(reason).__name__}: {reason}") from exc

    def _unauthorised(self, message: str) -> str:
        """The 401 explanation: which token was sent (by its source, never its value), the fix."""
        if self._token is None:
            sent = f"no token was sent (neither reward.kwargs.token nor {TOKEN_ENV} is set)"
        else:
            sent = f"it rejected the token from {self._token_source}"
        return (
            f"reward server at {self.url} requires a bearer token (HTTP 401: "
            f"{message}) and {sent}; "
            f"set {TOKEN_ENV} (or reward.kwargs.token) to the token the server was started with"
        )

    def _with_retries(self, attempt: Any, what: str) -> bytes:
        """Call ``attempt`` up to 1 + retries times, sleeping backoff * 2**k before retry k."""
        attempts = 1 + self.retries
        last: _Retryable | None = None
        for k in range(attempts):
            try:
                return attempt()
            except _Retryable as exc:
                last = exc
                if k + 1 < attempts:
                    _sleep(self.backoff * 2**k)
        resume = "The run keeps its last checkpoint; resume with resume=true."
        if last is not None and last.status is not None:  # it answered: not a reachability problem
            raise RewardError(
                f"reward server at {self.url} failed after {attempts} attempts ({what}) with "
                f"{last}: the reward raised on the server (see its log). {resume}"
            ) from last
        port = urllib.parse.urlsplit(self.url).port or 8765
        raise RewardError(
            f"reward server at {self.url} unreachable after {attempts} attempts ({what}); last "
            f"error: {last}. Start it with `diffloop serve-reward NAME --port {port}` (a reset "
            f"connection can also mean a request over the server's --max-request-mb: lower "
            f"reward.kwargs.batch_size). {resume}"
        ) from last

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, timeout={self.timeout}, retries={self.retries})"


def check_servers(reward: Any) -> None:
    """GET /health of ``reward`` if it is a RemoteReward, or of each remote component of a
    composite.

    RewardError (with the retries' message) if a server does not answer or answers anything but
    ``{"status": "ok", ...}``.
    """
    for r in [reward, *getattr(reward, "rewards", [])]:
        if not isinstance(r, RemoteReward):
            continue
        answer = r.health()
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            raise RewardError(
                f"reward server at {r.url}: GET /health answered {str(answer)[:200]}, not status ok"
            )


def _server_message(exc: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} text, else the start of its body, else the HTTP reason."""
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        return str(exc.reason)
    try:
        return str(json.loads(text)["error"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return text[:200] or str(exc.reason)


__all__ = [
    "TOKEN_ENV",
    "RemoteReward",
    "check_remote_kwargs",
    "check_servers",
    "check_token",
    "encode_png_base64",
    "parse_scores",
    "token_from_env",
]
