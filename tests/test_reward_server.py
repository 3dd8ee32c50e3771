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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffloop.checkpoint import latest_checkpoint
from diffloop.rewards import RewardError, build_reward, score
from diffloop.rewards import remote as remote_module
from diffloop.rewards.remote import RemoteReward, encode_png_base64
from diffloop.rewards.server import (
    RewardHTTPServer,
    json_scores,
    make_server,
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


def raw_request(
    server: RewardHTTPServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


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
        self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        with server.lock:
            server.attempts += 1
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
        self.script, self.attempts = script, 0
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
    from test_trainer import tiny_overrides

    from diffloop.cli import main

    out = tmp_path / "run"
    port = free_port()
    args = tiny_overrides(
        tiny_sd,
        out,
        **{
            "reward.name": "remote",
            "reward.kwargs": f"{{url: 'http://127.0.0.1:{port}', retries: 1, backoff: 0.01, timeout: 10}}",
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
        [{"name": "jpeg_compressibility"}, {"name": "remote", "kwargs": {"url": down, "retries": 0}}]
    )
    with pytest.raises(RewardError, match=r"unreachable after 1 attempts \(GET /health\)"):
        check_servers(composite)


def test_server_down_fails_the_run_at_setup_and_leaves_its_record_untouched(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_trainer import tiny_overrides

    from diffloop.cli import main

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
