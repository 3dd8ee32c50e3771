"""Reward server and remote client, end to end on localhost, including every failure mode.

Servers bind 127.0.0.1 on an ephemeral port and run in a thread. Retry tests record the backoff
instead of sleeping, and use timeouts of a fraction of a second.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from diffloop.checkpoint import latest_checkpoint
from diffloop.rewards import RewardError, build_reward, registry, score
from diffloop.rewards import remote as remote_module
from diffloop.rewards import server as server_module
from diffloop.rewards import server_http as server_http_module
from diffloop.rewards.model_loading import ModelReward
from diffloop.rewards.remote import TOKEN_ENV, RemoteReward, check_servers, encode_png_base64
from diffloop.rewards.server import (
    PROTOCOL_SCHEMA,
    RewardHTTPServer,
    build_served_reward,
    json_scores,
    make_server,
    resolve_device,
    serve_main,
    server_from_argv,
)

# ----------------------------------------------------------------------------- helpers


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def reward_server(reward: Any, **kwargs: Any) -> Iterator[RewardHTTPServer]:
    port = kwargs.pop("port", 0)
    with serving(make_server(reward, "127.0.0.1", port, **kwargs)) as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's backoff sleeps, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(remote_module, "_sleep", recorded.append)
    return recorded


def quantised_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) = u / 255 for random uint8 u: exactly what the server decodes."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    return u8.permute(0, 3, 1, 2).float() / 255


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_response(
    server: RewardHTTPServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, Any]:
    """(status, headers, parsed JSON body) of one request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, json.loads(response.read())
    finally:
        conn.close()


def raw_request(
    server: RewardHTTPServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    status, _, payload = raw_response(server, method, path, body, headers)
    return status, payload


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


class Recorder:
    """A reward that records the batch sizes it is called with and returns float(prompt)."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        self.calls.append(len(prompts))
        return torch.tensor([float(p) for p in prompts])


class FakeHandler(BaseHTTPRequestHandler):
    """Answers POSTs from the server's script: (status, body) pairs, or "slow" (no answer)."""

    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        with server.lock:
            server.attempts += 1
            server.bodies.append(body)
            step = server.script[min(server.attempts, len(server.script)) - 1]
        if step == "slow":
            server.release.wait(10)  # hold the connection past the client's timeout
            return
        status, body = step
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: list[Any]) -> None:
        self.script, self.attempts, self.bodies = script, 0, []
        self.lock, self.release = threading.Lock(), threading.Event()
        super().__init__(("127.0.0.1", 0), FakeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def fake_server(script: list[Any]) -> Iterator[FakeServer]:
    server = FakeServer(script)
    with serving(server):
        try:
            yield server
        finally:
            server.release.set()


def ok(scores: Any) -> tuple[int, bytes]:
    return 200, json.dumps({"scores": scores}).encode()


IMAGES2 = quantised_images(2)
PROMPTS2, META2 = ["a", "b"], [{}, {}]

# ----------------------------------------------------------------------------- end to end


def test_jpeg_remote_equals_local() -> None:
    # JPEG sees to_uint8(images) locally and the PNG-decoded uint8 / 255 remotely: the same bytes
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    local = build_reward("jpeg_compressibility")
    with reward_server(build_reward("jpeg_compressibility")) as server:
        remote = RemoteReward(server.url, batch_size=2, timeout=10)  # 3 requests: 2 + 2 + 1
        result = score(remote, images, list("abcde"), [{}] * 5)
    expected = local(images, list("abcde"), [{}] * 5)
    assert result.num_invalid == 0
    torch.testing.assert_close(result.scores, expected, rtol=0, atol=0)


def test_prompts_metadata_and_images_arrive_exactly() -> None:
    seen: dict[str, Any] = {}

    def echo(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        seen.update(images=images.clone(), prompts=prompts, metadata=metadata)
        return torch.tensor([len(p) + m["k"] for p, m in zip(prompts, metadata)])

    images = quantised_images(3, size=6)
    metadata = [{"k": 0.5, "objects": ["red circle"]}, {"k": 1}, {"k": -2}]
    with reward_server(echo) as server:
        scores = RemoteReward(server.url, timeout=10)(images, ["ab", "ü€", ""], metadata)
    assert scores.tolist() == [2.5, 3.0, -2.0]
    assert seen["prompts"] == ["ab", "ü€", ""] and seen["metadata"] == metadata
    assert seen["images"].dtype == torch.float32 and seen["images"].shape == (3, 3, 6, 6)
    assert torch.equal(seen["images"], images)  # u8 / 255 on both sides


def test_health() -> None:
    with reward_server(build_reward("jpeg_incompressibility"), max_batch=5) as server:
        assert RemoteReward(server.url + "/").health() == {
            "status": "ok",
            "reward": "jpeg_incompressibility",
            "max_batch": 5,
            "max_request_bytes": 64 * 2**20,
            "max_image_pixels": 4096 * 4096,
            "max_request_pixels": 32 * 1024 * 1024,
            "device": "cpu",
        }


def test_server_splits_requests_into_max_batch_chunks_in_order() -> None:
    recorder = Recorder()
    prompts = [str(i) for i in range(7)]
    with reward_server(recorder, max_batch=3) as server:
        scores = RemoteReward(server.url, batch_size=7)(quantised_images(7), prompts, [{}] * 7)
    assert recorder.calls == [3, 3, 1]
    assert scores.tolist() == [float(i) for i in range(7)]


def test_nulls_become_nan_and_count_as_invalid() -> None:
    images = quantised_images(4)
    metadata = [{"sample_index": i} for i in range(4)]
    with reward_server(build_reward("reward_fns:nan_on_odd")) as server:
        result = score(RemoteReward(server.url), images, ["p"] * 4, metadata)
    assert result.num_invalid == 2 and result.valid.tolist() == [True, False, True, False]
    expected = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(result.scores[::2], expected[::2], rtol=0, atol=0)
    assert json_scores(torch.tensor([1.5, math.nan, math.inf, -math.inf])) == [
        1.5,
        None,
        None,
        None,
    ]


def test_server_from_argv_builds_a_named_reward_with_kwargs() -> None:
    server = server_from_argv(
        [
            "example_rewards:Brightness",
            "--kwargs",
            '{"scale": 2}',
            "--port",
            "0",
            "--max-batch",
            "2",
            "--max-request-mb",
            "0.5",
        ]
    )
    assert server.max_batch == 2 and server.max_request_bytes == 2**19
    with serving(server):
        remote = RemoteReward(server.url)
        assert remote.health()["reward"] == "brightness"
        images = quantised_images(3)
        scores = remote(images, ["a", "b", "c"], [{}] * 3)
    torch.testing.assert_close(scores, 2 * images.mean(dim=(1, 2, 3)), rtol=0, atol=0)


def test_serve_main_reports_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["no_such_reward_xyz", "--port", "0"]) == 2
    assert "unknown reward 'no_such_reward_xyz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        serve_main(["jpeg_compressibility", "--kwargs", "[1, 2]"])
    assert info.value.code == 2
    assert "--kwargs must be a JSON object" in capsys.readouterr().err


# ----------------------------------------------------------------------------- server refusals


def test_oversized_request_is_refused_from_the_header() -> None:
    recorder = Recorder()
    with reward_server(recorder, max_request_bytes=1000) as server:
        t0 = time.perf_counter()
        # headers only: the server must answer without waiting for a gigabyte of body
        status, payload = raw_request(
            server, "POST", "/score", headers={"Content-Length": str(10**9)}
        )
        assert time.perf_counter() - t0 < 1.0
        assert status == 413 and "over the server's limit of 1000 bytes" in payload["error"]
        # the client gets the 413 (not a reset), is told what to change, and does not retry
        remote = RemoteReward(server.url, retries=3, backoff=0.0)
        with pytest.raises(RewardError, match="HTTP 413.*--max-request-mb"):
            remote(quantised_images(4, size=16), ["0"] * 4, [{}] * 4)
    assert recorder.calls == []


def _request(**fields: Any) -> bytes:
    body = {"images": [png_b64(Image.new("RGB", (4, 4)))], "prompts": ["a"], "metadata": [{}]}
    body.update(fields)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (_request(images=[]), "'images' must be a non-empty list"),
        (_request(images="abc"), "'images' must be a non-empty list"),
        (_request(prompts=["a", "b"]), "1 images but 2 prompts and 1 metadata"),
        (_request(prompts=[3]), "'prompts' must be a list of strings"),
        (_request(metadata=[[]]), "'metadata' must be a list of objects"),
        (_request(images=[7]), r"images\[0\] must be a base64 string"),
        (_request(images=["@@not base64@@"]), r"images\[0\] is not valid base64"),
        (_request(images=[base64.b64encode(b"GIF89a...").decode()]), "not a decodable PNG"),
        (_request(images=[png_b64(Image.new("RGB", (4, 4)), "JPEG")]), "not a decodable PNG"),
        (_request(images=[png_b64(Image.new("RGBA", (4, 4)))]), "mode RGBA; send 8-bit RGB"),
        (
            _request(
                images=[png_b64(Image.new("RGB", (4, 4))), png_b64(Image.new("RGB", (5, 4)))],
                prompts=["a", "b"],
                metadata=[{}, {}],
            ),
            "one size",
        ),
        (
            _request(images=[png_b64(Image.new("RGB", (30, 30)))]),
            "over the server's limit of 500 pixels",
        ),
    ],
)
def test_malformed_requests_get_400_with_a_message(body: bytes, message: str) -> None:
    recorder = Recorder()
    with reward_server(recorder, max_image_pixels=500) as server:
        status, payload = raw_request(server, "POST", "/score", body)
    assert status == 400
    assert re.search(message, payload["error"]), payload["error"]
    assert recorder.calls == []


def test_other_refusals() -> None:
    with reward_server(Recorder()) as server:
        assert raw_request(server, "GET", "/nope")[0] == 404
        assert raw_request(server, "POST", "/health", b"{}")[0] == 404
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
        conn.putrequest("POST", "/score")  # no Content-Length header
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
        conn.close()
        assert raw_request(server, "POST", "/score", b"", {"Content-Length": "-3"})[0] == 400


def test_reward_that_raises_gives_500_and_a_clear_client_error(sleeps: list[float]) -> None:
    def broken(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise ValueError("model exploded")

    def wrong_shape(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return torch.zeros(len(prompts), 2)

    with reward_server(broken) as server:
        status, payload = raw_request(server, "POST", "/score", _request())
        assert status == 500 and "'broken' raised ValueError: model exploded" in payload["error"]
        with pytest.raises(RewardError, match="after 2 attempts.*HTTP 500.*model exploded"):
            RemoteReward(server.url, retries=1, backoff=0.5)(IMAGES2, PROMPTS2, META2)
    assert sleeps == [0.5]
    with reward_server(wrong_shape) as server:
        status, payload = raw_request(server, "POST", "/score", _request())
        assert status == 500 and "expected (1,)" in payload["error"]


# ----------------------------------------------------------------------------- client failures


def test_server_down_raises_after_retries_with_backoff(sleeps: list[float]) -> None:
    port = free_port()
    remote = RemoteReward(f"http://127.0.0.1:{port}", retries=3, backoff=0.01)
    with pytest.raises(RewardError) as info:
        score(remote, IMAGES2, PROMPTS2, META2)
    message = str(info.value)
    assert f"reward server at http://127.0.0.1:{port} unreachable after 4 attempts" in message
    assert "ConnectionRefusedError" in message
    assert f"diffloop serve-reward NAME --port {port}" in message and "resume=true" in message
    assert sleeps == [0.01, 0.02, 0.04]  # backoff * 2**k before retry k
    with pytest.raises(RewardError, match="unreachable after 1 attempts"):
        RemoteReward(f"http://127.0.0.1:{port}", retries=0).health()


def test_slow_server_times_out_and_is_retried(sleeps: list[float]) -> None:
    with fake_server(["slow"]) as server:
        t0 = time.perf_counter()
        with pytest.raises(RewardError, match="unreachable after 3 attempts.*timed out"):
            RemoteReward(server.url, timeout=0.2, retries=2, backoff=0.0)(IMAGES2, PROMPTS2, META2)
        assert time.perf_counter() - t0 < 3.0
        assert server.attempts == 3 and sleeps == [0.0, 0.0]


@pytest.mark.parametrize("failure", ["slow", (503, b"busy"), (502, b'{"error": "gateway"}')])
def test_transient_failures_are_retried_then_succeed(failure: Any, sleeps: list[float]) -> None:
    with fake_server([failure, ok([1.0, 2.5])]) as server:
        scores = RemoteReward(server.url, timeout=0.3, retries=1, backoff=0.25)(
            IMAGES2, PROMPTS2, META2
        )
        assert scores.tolist() == [1.0, 2.5] and server.attempts == 2
    assert sleeps == [0.25]


@pytest.mark.parametrize(
    ("response", "message", "attempts"),
    [
        (ok([1.0]), "returned 1 scores for 2 images", 1),
        (ok([1.0, 2.0, 3.0]), "returned 3 scores for 2 images", 1),
        (ok([1.0, "2.0"]), "non-numeric score '2.0' at index 1", 1),
        (ok([True, 1.0]), "non-numeric score True at index 0", 1),
        (ok([[1.0], [2.0]]), r"non-numeric score \[1.0\] at index 0", 1),
        (ok({"a": 1}), "returned dict scores for 2 images", 1),
        ((200, b'{"score": [1, 2]}'), "without a 'scores' list", 1),
        ((200, b"[1, 2]"), "without a 'scores' list", 1),
        ((200, b"<html>oops</html>"), "invalid JSON", 1),
        (
            (500, b'{"error": "CUDA out of memory"}'),
            "after 3 attempts.*HTTP 500: CUDA out of memory",
            3,
        ),
        ((500, b"plain text crash"), "HTTP 500: plain text crash", 3),
        ((400, b'{"error": "bad images"}'), "refused the request with HTTP 400: bad images", 1),
        ((404, b""), "HTTP 404", 1),
    ],
)
def test_garbage_responses_raise_never_zero(
    response: tuple[int, bytes], message: str, attempts: int, sleeps: list[float]
) -> None:
    with fake_server([response]) as server:
        remote = RemoteReward(server.url, timeout=5, retries=2, backoff=0.0)
        with pytest.raises(RewardError, match=message):
            score(remote, IMAGES2, PROMPTS2, META2)
        assert server.attempts == attempts


def test_null_scores_from_the_wire_are_nan() -> None:
    with fake_server([(200, b'{"scores": [null, 0.5]}')]) as server:
        result = score(RemoteReward(server.url), IMAGES2, PROMPTS2, META2)
    assert (
        math.isnan(result.scores[0]) and result.scores[1].item() == 0.5 and result.num_invalid == 1
    )


def test_client_argument_checks() -> None:
    with pytest.raises(ValueError, match="http"):
        RemoteReward("file:///etc/passwd")
    with pytest.raises(ValueError, match="retries >= 0"):
        RemoteReward("http://127.0.0.1:1", retries=-1)
    with pytest.raises(RewardError, match="not JSON-serialisable"):
        RemoteReward("http://127.0.0.1:1")(IMAGES2, PROMPTS2, [{"x": object()}, {}])
    assert isinstance(build_reward("remote", url="http://127.0.0.1:1", timeout=3), RemoteReward)


def test_png_encoding_is_lossless_after_uint8_rounding() -> None:
    images = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    decoded = [Image.open(io.BytesIO(base64.b64decode(t))) for t in encode_png_base64(images)]
    assert [im.mode for im in decoded] == ["RGB", "RGB"] and decoded[0].size == (7, 5)
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert all(torch.equal(torch.from_numpy(np.array(im)), u) for im, u in zip(decoded, u8))


# ----------------------------------------------------------------------------- training


def test_run_keeps_checkpoint_when_server_goes_down_and_resumes(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffloop.cli import main
    from diffloop.testing.runs import tiny_overrides

    out = tmp_path / "run"
    port = free_port()
    args = tiny_overrides(
        tiny_sd,
        out,
        **{
            "reward.name": "remote",
            "reward.kwargs": (
                f"{{url: 'http://127.0.0.1:{port}', retries: 1, backoff: 0.01, timeout: 10}}"
            ),
        },
    )
    brightness = build_reward("reward_fns:brightness")
    with reward_server(brightness, port=port):
        assert main(["train", *args, "num_epochs=1"]) == 0
    assert latest_checkpoint(out).name == "epoch_000001"
    # the server is down: epoch 2 fails loudly, the checkpoint of epoch 1 stays
    assert main(["train", *args, "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "unreachable after 2 attempts" in err and "resume=true" in err
    assert latest_checkpoint(out).name == "epoch_000001"
    with reward_server(brightness, port=port):
        assert main(["train", *args, "resume=true"]) == 0
    assert latest_checkpoint(out).name == "epoch_000002"


# ----------------------------------------------------------------------------- set-up check, 5xx


def test_http_500_after_retries_reports_the_status_and_message_not_unreachable(
    sleeps: list[float],
) -> None:
    with (
        fake_server([(500, b'{"error": "CUDA out of memory"}')]) as server,
        pytest.raises(RewardError) as info,
    ):
        RemoteReward(server.url, retries=2, backoff=0.0)(IMAGES2, PROMPTS2, META2)
    message = str(info.value)
    assert "failed after 3 attempts" in message and "HTTP 500: CUDA out of memory" in message
    assert "unreachable" not in message and "serve-reward" not in message


def test_check_servers_asks_health_of_remote_rewards_and_components(sleeps: list[float]) -> None:
    from diffloop.rewards.composite import CompositeReward
    from diffloop.rewards.remote import check_servers

    check_servers(build_reward("jpeg_compressibility"))  # not remote: nothing to ask
    with reward_server(build_reward("jpeg_compressibility")) as server:
        check_servers(RemoteReward(server.url))
    down = f"http://127.0.0.1:{free_port()}"
    composite = CompositeReward(
        [
            {"name": "jpeg_compressibility"},
            {"name": "remote", "kwargs": {"url": down, "retries": 0}},
        ]
    )
    with pytest.raises(RewardError, match=r"unreachable after 1 attempts \(GET /health\)"):
        check_servers(composite)


def test_server_down_fails_the_run_at_setup_and_leaves_its_record_untouched(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffloop.cli import main
    from diffloop.testing.runs import tiny_overrides

    out = tmp_path / "run"
    port = free_port()
    kwargs = f"{{url: 'http://127.0.0.1:{port}', retries: 1, backoff: 0.01, timeout: 10}}"
    args = tiny_overrides(tiny_sd, out, **{"reward.name": "remote", "reward.kwargs": kwargs})
    # A fresh run: refused before anything is sampled or written.
    assert main(["train", *args]) == 2
    assert "GET /health" in capsys.readouterr().err
    assert not out.exists()
    with reward_server(build_reward("reward_fns:brightness"), port=port):
        assert main(["train", *args, "num_epochs=1"]) == 0
    record = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(record) >= {"config.yaml", "run_info.json", "sessions.jsonl", "metrics.jsonl"}
    # A resume while the server is down: set-up fails, the record is byte for byte unchanged.
    assert main(["train", *args, "resume=true"]) == 2
    assert "GET /health" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == record


# ---------------------------------------------------------------------------- JSON Schema (/schema)

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "x-endpoints",
               "contentEncoding", "contentMediaType"}  # fmt: skip
JSON_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """Errors of ``value`` against ``schema``: the JSON Schema subset PROTOCOL_SCHEMA uses ($ref to
    #/$defs, type, const, required, properties, additionalProperties: false, items, minItems,
    minimum). Any other keyword raises, so the schema cannot outgrow what this checks."""
    unknown = set(schema) - ANNOTATIONS - {"$ref", "type", "const", "required", "properties",
                                           "additionalProperties", "items", "minItems",
                                           "minimum"}  # fmt: skip
    if unknown:
        raise NotImplementedError(f"validator lacks keywords {sorted(unknown)} (at {at})")
    if "$ref" in schema:
        prefix = "#/$defs/"
        assert schema["$ref"].startswith(prefix), schema["$ref"]
        return validate(value, root["$defs"][schema["$ref"][len(prefix) :]], root, at)
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(JSON_TYPES[t](value) for t in types):
            return [f"{at}: {value!r} is not of type {types}"]
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: {value!r} != {schema['const']!r}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{at}: {value!r} < {schema['minimum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{at}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties", True) is False:
            errors += [f"{at}: unexpected {k!r}" for k in value if k not in properties]
        for key, sub in properties.items():
            if key in value:
                errors += validate(value[key], sub, root, f"{at}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{at}: {len(value)} items < minItems {schema['minItems']}")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), root, f"{at}[{i}]")
    return errors


def conforms(value: Any, definition: str) -> list[str]:
    return validate(value, {"$ref": f"#/$defs/{definition}"}, PROTOCOL_SCHEMA)


def test_schema_is_served_and_uses_only_what_the_validator_checks() -> None:
    with reward_server(Recorder()) as server:
        status, schema = raw_request(server, "GET", "/schema")
    assert status == 200 and schema == json.loads(json.dumps(PROTOCOL_SCHEMA))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["$defs"]) == {"ScoreRequest", "ScoreResponse", "HealthResponse",
                                    "ErrorResponse"}  # fmt: skip

    def walk(node: Any) -> None:  # every sub-schema passes through validate's keyword check
        if isinstance(node, dict):
            validate(None, {k: v for k, v in node.items() if k != "$ref"}, PROTOCOL_SCHEMA)
            for key in ("properties", "$defs"):
                for sub in node.get(key, {}).values():
                    walk(sub)
            if "items" in node:
                walk(node["items"])

    walk(schema)


def test_real_requests_and_answers_conform_to_the_schema() -> None:
    # requests: what the client really sends, recorded by a fake server
    with fake_server([ok([1.0, 2.0])]) as fake:
        metadata = [{"objects": ["cat"], "sample_index": 0}, {"sample_index": 1}]
        RemoteReward(fake.url, timeout=5)(IMAGES2, PROMPTS2, metadata)
    (body,) = fake.bodies
    request = json.loads(body)
    assert conforms(request, "ScoreRequest") == []
    # answers: what the real server sends, for every status it uses
    answers: list[tuple[int, Any, str]] = []
    with reward_server(build_reward("reward_fns:nan_on_odd"), max_request_bytes=len(body)) as srv:
        status, payload = raw_request(srv, "POST", "/score", body)
        assert payload["scores"][1] is None  # a null score, as the schema allows
        answers.append((status, payload, "ScoreResponse"))
        answers.append((*raw_request(srv, "GET", "/health"), "HealthResponse"))
        answers.append((*raw_request(srv, "POST", "/score", b"{bad"), "ErrorResponse"))
        answers.append((*raw_request(srv, "GET", "/nope"), "ErrorResponse"))
        too_big = {"Content-Length": str(len(body) + 1)}
        answers.append((*raw_request(srv, "POST", "/score", b"", too_big), "ErrorResponse"))
    with reward_server(Recorder(), token="s3cret") as srv:
        answers.append((*raw_request(srv, "GET", "/health"), "ErrorResponse"))
    with reward_server(lambda i, p, m: 1 / 0) as srv:
        answers.append((*raw_request(srv, "POST", "/score", body), "ErrorResponse"))
    assert [a[0] for a in answers] == [200, 200, 400, 404, 413, 401, 500]
    for status, payload, definition in answers:
        assert conforms(payload, definition) == [], (status, payload)


@pytest.mark.parametrize(
    ("value", "definition", "error"),
    [
        ({"scores": [1.0, "2"], "reward": "r"}, "ScoreResponse", r"\$.scores\[1\]: '2' is not"),
        ({"scores": [True], "reward": "r"}, "ScoreResponse", "True is not of type"),
        ({"scores": [1.0]}, "ScoreResponse", "missing 'reward'"),
        ({"scores": [], "reward": "r", "x": 1}, "ScoreResponse", "unexpected 'x'"),
        ({"images": [], "prompts": []}, "ScoreRequest", "0 items < minItems 1"),
        ({"images": ["a"], "prompts": [3]}, "ScoreRequest", r"prompts\[0\]: 3 is not"),
        ({"images": ["a"], "prompts": ["p"], "metadata": [[]]}, "ScoreRequest", "not of type"),
        ({"status": "ok", "reward": "r", "max_batch": 0, "max_request_bytes": 1, "device": "cpu"},
         "HealthResponse", "0 < 1"),
        ({"status": "down", "reward": "r", "max_batch": 1, "max_request_bytes": 1,
          "device": "cpu"}, "HealthResponse", "'down' != 'ok'"),
        ({"error": 5}, "ErrorResponse", "5 is not of type"),
    ],
)  # fmt: skip
def test_the_schema_rejects_what_the_protocol_forbids(value: Any, definition: str, error: str):
    errors = conforms(value, definition)
    assert errors and re.search(error, errors[0]), errors


def test_what_the_server_refuses_by_type_the_schema_refuses_too() -> None:
    refused = [_request(images=[]), _request(images="abc"), _request(prompts=[3]),
               _request(metadata=[[]]), _request(images=[7])]  # fmt: skip
    with reward_server(Recorder()) as server:
        for body in refused:
            assert raw_request(server, "POST", "/score", body)[0] == 400
            assert conforms(json.loads(body), "ScoreRequest") != [], body


# ----------------------------------------------------------------------------- bearer token

TOKEN = "s3cret-Token_123"


def test_a_server_with_a_token_refuses_requests_without_it_on_every_path() -> None:
    recorder = Recorder()
    with reward_server(recorder, token=TOKEN) as server:
        for method, path, body in [("GET", "/health", None), ("GET", "/schema", None),
                                   ("POST", "/score", _request(prompts=["1"]))]:  # fmt: skip
            for headers, sent in [({}, "no"), ({"Authorization": "Bearer wrong"}, "a wrong"),
                                  ({"Authorization": f"Basic {TOKEN}"}, "a wrong")]:  # fmt: skip
                status, reply_headers, payload = raw_response(server, method, path, body, headers)
                assert status == 401 and f"carried {sent} token" in payload["error"], path
                assert TOKEN_ENV in payload["error"] and TOKEN not in payload["error"]
                assert reply_headers["WWW-Authenticate"].startswith("Bearer")
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert raw_request(server, method, path, body, good)[0] == 200, path
    assert recorder.calls == [1]  # only the authorised POST reached the reward


def test_the_client_sends_the_token_from_kwargs_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = quantised_images(2)
    with reward_server(Recorder(), token=TOKEN) as server:
        assert RemoteReward(server.url, token=TOKEN)(images, ["1", "2"], [{}, {}]).tolist() == [
            1.0,
            2.0,
        ]
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        remote = RemoteReward(server.url)
        assert remote.health()["status"] == "ok" and remote(images, ["3", "4"], [{}, {}]).tolist()
        assert TOKEN not in repr(remote)


def test_a_missing_or_wrong_token_is_one_clear_error_at_once(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with reward_server(Recorder(), token=TOKEN) as server:
        with pytest.raises(RewardError, match="HTTP 401.*no token was sent") as info:
            check_servers(RemoteReward(server.url, retries=3))  # the trainer's set-up check
        assert f"set {TOKEN_ENV} (or reward.kwargs.token)" in str(info.value)
        with pytest.raises(RewardError, match="rejected the token from reward.kwargs.token") as e:
            RemoteReward(server.url, token="wrong-one")(IMAGES2, PROMPTS2, META2)
        assert "wrong-one" not in str(e.value)
        monkeypatch.setenv(TOKEN_ENV, "also-wrong")
        with pytest.raises(RewardError, match=f"rejected the token from {TOKEN_ENV}") as e:
            RemoteReward(server.url).health()
        assert "also-wrong" not in str(e.value)
    assert sleeps == []  # a 401 is not retried


def test_tokens_that_cannot_travel_in_a_header_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for bad in ["", "two words", "tab\there", "ünïcode"]:
        with pytest.raises(ValueError, match="reward.kwargs.token: the bearer token must be"):
            RemoteReward("http://127.0.0.1:1", token=bad)
    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(ValueError, match=f"environment variable {TOKEN_ENV}"):
        RemoteReward("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="token: the bearer token must be"):
        make_server(Recorder(), port=0, token="a b")


def test_serve_reward_takes_the_token_from_the_flag_or_environment_and_never_prints_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert not server_from_argv(["jpeg_compressibility", "--port", "0"]).requires_token
    flagged = server_from_argv(["jpeg_compressibility", "--port", "0", "--token", TOKEN])
    assert flagged.authorised(f"Bearer {TOKEN}") and not flagged.authorised("Bearer x")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    from_env = server_from_argv(["jpeg_compressibility", "--port", "0"])
    assert from_env.authorised(f"Bearer {TOKEN}") and not from_env.authorised(None)
    for server in (flagged, from_env):
        server.server_close()
    # the start-up message: says a token is needed, never shows it
    monkeypatch.setattr(server_module.RewardHTTPServer, "serve_forever", lambda self: None)
    assert serve_main(["jpeg_compressibility", "--port", "0"]) == 0
    out = capsys.readouterr()
    assert "needs the bearer token" in out.out and TOKEN not in out.out + out.err
    assert serve_main(["jpeg_compressibility", "--port", "0", "--token", "a b"]) == 2
    assert "--token: the bearer token must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --device


class DeviceProbe:
    """A reward whose constructor takes ``device``; records it and the images' device."""

    name = "device_probe"

    def __init__(self, device: str = "never given", scale: float = 1.0) -> None:
        self.device, self.scale, self.seen = device, scale, []

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        self.seen.append(images.device)
        return self.scale * images.mean(dim=(1, 2, 3))


class TinyModelReward(ModelReward):
    """A ModelReward recording where it is moved."""

    name = "tiny_model"

    def __init__(self) -> None:
        super().__init__()
        self._set_modules(torch.nn.Linear(3, 1))
        self.moves: list[torch.device] = []

    def to(self, device: str | torch.device) -> ModelReward:
        self.moves.append(torch.device(device))
        return super().to(device)

    def score_batch(self, images, prompts, metadata) -> torch.Tensor:
        return self._modules[0](images.mean(dim=(2, 3)))[:, 0]


def test_the_device_reaches_a_constructor_that_takes_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.REWARDS, "device_probe", DeviceProbe)
    monkeypatch.setitem(registry.REWARDS, "tiny_model", TinyModelReward)
    server = server_from_argv(["device_probe", "--device", "cpu", "--port", "0",
                               "--kwargs", '{"scale": 2}'])  # fmt: skip
    probe = server.reward
    assert isinstance(probe, DeviceProbe) and probe.device == "cpu" and probe.scale == 2
    with serving(server):
        assert RemoteReward(server.url).health()["device"] == "cpu"
        RemoteReward(server.url)(IMAGES2, PROMPTS2, META2)
    assert probe.seen == [torch.device("cpu")]
    # kwargs naming the same device are fine; another device is refused (images would differ)
    assert (
        build_served_reward("device_probe", {"device": "cpu"}, torch.device("cpu")).device == "cpu"
    )
    assert build_served_reward("device_probe", {"device": "cpu:0"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="--kwargs device meta: the meta device holds no data"):
        build_served_reward("device_probe", {"device": "meta"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="--kwargs sets device='cpu' but --device is 'meta'"):
        build_served_reward("device_probe", {"device": "cpu"}, torch.device("meta"))
    # a reward without a device argument gets none; a model reward is moved at start
    assert build_served_reward("reward_fns:brightness", {}, torch.device("cpu")) is not None
    model = build_served_reward("tiny_model", {}, torch.device("cpu"))
    assert model.moves == [torch.device("cpu")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_an_unavailable_cuda_device_is_one_clear_error(capsys: pytest.CaptureFixture[str]):
    assert serve_main(["jpeg_compressibility", "--port", "0", "--device", "cuda:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = "--device cuda:0: no CUDA device is available here; use --device cpu"
    assert err == [f"diffloop serve-reward: {expected}"]
    with pytest.raises(ValueError, match="device cuda: no CUDA device"):
        make_server(Recorder(), port=0, device="cuda")


@pytest.mark.parametrize(
    ("text", "message"),
    [("gpu", "'gpu' is not a torch device"), ("cuda:x", "is not a torch device"),
     ("meta", "holds no data")],
)  # fmt: skip
def test_device_strings_are_checked(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--device.*{message}"):
        resolve_device(text, "--device")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_server_scores_on_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}", "--device")
    monkeypatch.setitem(registry.REWARDS, "device_probe", DeviceProbe)
    server = server_from_argv(["device_probe", "--device", "cuda:0", "--port", "0"])
    with serving(server):
        scores = RemoteReward(server.url)(IMAGES2, PROMPTS2, META2)
    assert server.reward.device == "cuda:0" and server.reward.seen == [torch.device("cuda:0")]
    torch.testing.assert_close(scores, IMAGES2.mean(dim=(1, 2, 3)))


# ----------------------------------------------------------------------------- hostile requests


def flat_png(width: int, height: int) -> bytes:
    """A black 8-bit RGB PNG, compressed row by row: a 4096x4096 one is ~50 kB and is built
    without ever holding its 48 MB of pixels (what a hostile client sends)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" * (1 + 3 * width)  # filter type 0, then width RGB pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, colour type 2: RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _pngs(*pngs: bytes) -> bytes:
    n = len(pngs)
    images = [base64.b64encode(p).decode() for p in pngs]
    return json.dumps({"images": images, "prompts": ["1"] * n, "metadata": [{}] * n}).encode()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the images Pillow decodes; decoding raises, so a test that expects a refusal
    never allocates the pixels even where the server would have decoded them."""
    calls: list[tuple[int, int]] = []

    def load(image: Any) -> None:
        calls.append(image.size)
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_a_request_over_the_pixel_budget_is_refused_from_the_headers(
    monkeypatch: pytest.MonkeyPatch, decoded: list[tuple[int, int]]
) -> None:
    big = flat_png(4096, 4096)  # each at the default per-image limit: the budget is what refuses
    assert len(big) < 100_000
    body = _pngs(*[big] * 6)  # ~0.4 MB of body, 100 million pixels (gigabytes decoded)
    recorder = Recorder()
    # a library that disables Pillow's decompression-bomb check must not disable the budget
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with reward_server(recorder) as server:
        status, payload = raw_request(server, "POST", "/score", body)
    assert status == 413, payload
    assert "6 images hold 100663296 pixels" in payload["error"]
    assert "budget of 33554432 pixels per request (--max-request-pixels)" in payload["error"]
    assert "send at most 2 images of 4096x4096" in payload["error"]
    assert decoded == [] and recorder.calls == []


def test_the_pixel_budget_is_a_server_option_and_the_client_is_told_at_once(
    sleeps: list[float],
) -> None:
    recorder = Recorder()
    with reward_server(recorder, max_request_pixels=100) as server:
        assert (
            server.max_request_pixels == 100
            and RemoteReward(server.url).health()["max_request_pixels"] == 100
        )
        remote = RemoteReward(server.url, retries=3)
        assert remote(quantised_images(1), ["1"], [{}]).tolist() == [1.0]  # 64 pixels: fits
        with pytest.raises(RewardError, match=r"HTTP 413.*128 pixels.*budget of 100 pixels"):
            remote(quantised_images(2), ["1", "2"], [{}, {}])  # 2 x 8x8 = 128 pixels
    assert sleeps == [] and recorder.calls == [1]  # refused at once, never scored
    server = server_from_argv(["jpeg_compressibility", "--port", "0", "--max-request-pixels",
                               "1000", "--max-image-pixels", "500"])  # fmt: skip
    server.server_close()
    assert (server.max_request_pixels, server.max_image_pixels) == (1000, 500)


def test_pillows_decompression_bomb_limit_answers_413_not_a_decoding_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow refuses over 2 x 10 pixels
    with reward_server(Recorder()) as server:
        status, payload = raw_request(server, "POST", "/score", _pngs(flat_png(5, 5)))
    assert status == 413 and "Pillow's decompression-bomb limit" in payload["error"], payload


def test_a_deeply_nested_body_is_refused_before_json_parses_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[tuple[list[str], list[dict]]] = []

    def record(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        seen.append((prompts, metadata))
        return torch.zeros(len(prompts))

    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with reward_server(record) as server:
        status, payload = raw_request(server, "POST", "/score", deep)
        assert status == 400 and "more than 64 levels deep" in payload["error"], payload
        # brackets inside strings are text, and metadata may nest up to the limit
        nested: dict[str, Any] = {}
        for _ in range(30):  # 60 levels, 63 with the request's own
            nested = {"a": [nested]}
        prompt = "[" * 5000 + '"{'
        status, payload = raw_request(
            server, "POST", "/score", _request(prompts=[prompt], metadata=[nested])
        )
    assert status == 200, payload
    assert seen == [([prompt], [nested])]
    assert "Traceback" not in capsys.readouterr().err


def test_json_depth_counts_brackets_outside_strings_in_linear_time() -> None:
    depth = server_module.json_depth
    assert depth(b"{}") == 1 and depth(b'[{"a": [1, {"b": []}]}]') == 5 and depth(b"1") == 0
    assert depth(b'["]]]\\"[[[", "\\\\", [[]]]') == 3  # escaped quote and backslash
    assert depth(b"[" * 10_000, limit=64) > 64
    t0 = time.perf_counter()
    assert depth(b'["' + b'\\"' * 2_000_000) == 1  # unterminated string of escaped quotes
    assert depth(b'"\\' * 1_000_000) == 0
    assert time.perf_counter() - t0 < 2.0


def test_an_unexpected_error_in_a_handler_is_a_json_500_logged_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(*args: Any) -> None:
        raise ValueError("a bug\nover two lines")

    monkeypatch.setattr(server_http_module, "parse_request", broken)  # where do_POST calls it
    monkeypatch.setattr(server_module.RewardRequestHandler, "_health", broken)
    with (
        caplog.at_level("INFO", logger="diffloop.rewards.server"),
        reward_server(Recorder()) as server,
    ):
        for method, path, body in [("POST", "/score", _request()), ("GET", "/health", None)]:
            status, payload = raw_request(server, method, path, body)
            assert status == 500, payload
            assert "internal server error (ValueError: a bug); see" in payload["error"]
        assert raw_request(server, "GET", "/schema")[0] == 200  # the server still serves
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == [
        "POST /score -> 500: unhandled ValueError: a bug",
        "GET /health -> 500: unhandled ValueError: a bug",
    ]
    assert all(r.exc_info is None for r in errors)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("PUT", "/score", "POST"), ("DELETE", "/score", "POST"), ("PATCH", "/score", "POST"),
     ("OPTIONS", "/health", "GET"), ("PUT", "/elsewhere", "GET, POST")],
)  # fmt: skip
def test_other_methods_answer_json_405_with_allow(method: str, path: str, allowed: str) -> None:
    recorder = Recorder()
    with reward_server(recorder) as server:
        status, headers, payload = raw_response(server, method, path, _request())
    assert status == 405 and headers["Allow"] == allowed
    assert headers["Content-Type"] == "application/json"
    assert (
        f"method {method} is not allowed" in payload["error"] and "POST /score" in payload["error"]
    )
    assert recorder.calls == []


def test_head_answers_405_without_a_body_and_unknown_methods_json_501() -> None:
    with reward_server(Recorder()) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
        conn.request("HEAD", "/health")
        response = conn.getresponse()
        assert (response.status, response.headers["Allow"], response.read()) == (405, "GET", b"")
        conn.close()
        status, headers, payload = raw_response(server, "BREW", "/score")
    assert status == 501 and headers["Content-Type"] == "application/json"
    assert "BREW" in payload["error"]
