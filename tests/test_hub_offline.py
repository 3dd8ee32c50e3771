"""A hub id without the hub: an offline or unreachable hub fails at once, in one line naming the
cause and the fix; a cached hub id loads from the cache without asking the hub.

Nothing here touches the internet: the hub is a closed local port (refuses at once), a listening
socket that never answers (a timeout), or a local HTTP server answering as the hub does (gated,
missing repository, missing file, 503). HF_HUB_OFFLINE is unset and the cache is an empty tmp
HF_HOME, in the environment and in huggingface_hub.constants (read at import).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from diffloop.cli import main
from diffloop.config import LoraConfig, ModelConfig, SampleConfig
from diffloop.policies.families import load_policy
from diffloop.policies.loading import ModelLoadError
from diffloop.rewards.model_loading import MissingWeightsError, load_pretrained, resolve_file

SRC = str(Path(__file__).resolve().parents[1] / "src")
CPU = torch.device("cpu")
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"  # sdxl_compressibility.yaml's model
ENV_OFF = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_CACHE")


# ---------------------------------------------------------------------------------- helpers


def closed_port() -> int:
    """A local port nothing listens on: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # hf_hub_url formats this template, made from HF_ENDPOINT at import
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def hub_cache(monkeypatch, tmp_path) -> Path:
    """Offline mode off, an empty hub cache under tmp_path, HF_ENDPOINT a closed local port."""
    from huggingface_hub import constants

    for name in ENV_OFF:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    use_endpoint(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    return home / "hub"


def put_in_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """``source`` as the snapshot of ``repo_id`` at ``revision`` in a hub cache (the layout
    ``hf download`` writes: refs/<revision> holds the commit, snapshots/<commit>/ the files)."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    if source.is_dir():
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        shutil.copy(source, snapshot / source.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def cli_in_subprocess(tmp_path: Path, env: dict[str, str], *argv: str) -> tuple[int, float, str]:
    """``diffloop <argv>`` in a fresh process with ``env``: (exit code, seconds the command took
    after the libraries were imported, stderr). The real stderr: every third-party line shows."""
    code = (
        "import sys, time, torch, diffusers, transformers, diffloop.trainer\n"
        "from diffloop.cli import main\n"
        "start = time.monotonic()\n"
        f"rc = main({list(argv)!r})\n"
        "print(f'ELAPSED {time.monotonic() - start:.2f}')\n"
        "sys.exit(rc)\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in (*ENV_OFF, "HF_ENDPOINT")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**base, "PYTHONPATH": SRC, "HF_HOME": str(tmp_path / "hf"), **env},
    )
    elapsed = float(done.stdout.split("ELAPSED ")[-1]) if "ELAPSED " in done.stdout else -1.0
    return done.returncode, elapsed, done.stderr


# ---------------------------------------------------------------- diffloop train, end to end


@pytest.mark.parametrize("case", ["refused", "silent", "offline"])
def test_train_without_the_hub_is_one_line_within_seconds(tmp_path, case):
    with socket.socket() as listener:
        if case == "silent":  # accepts, never answers: the probe's timeout ends it
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        else:
            endpoint = f"http://127.0.0.1:{closed_port()}"
        env = {"HF_ENDPOINT": endpoint}
        env |= {"HF_HUB_OFFLINE": "1"} if case == "offline" else {}
        env |= {"HF_HUB_ETAG_TIMEOUT": "2"} if case == "silent" else {}
        rc, elapsed, err = cli_in_subprocess(
            tmp_path, env, "train", "sdxl_compressibility.yaml", f"output_dir={tmp_path / 'run'}"
        )
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert 0 <= elapsed < 10, (elapsed, err)
    line = lines[0]
    assert line.startswith(f"diffloop: error: model.pretrained='{SDXL}' is not in the Hugging")
    assert f"`hf download {SDXL} --local-dir DIR`" in line and "model.pretrained=DIR" in line
    if case == "offline":
        assert "offline mode is on (HF_HUB_OFFLINE=1)" in line and "HF_HUB_OFFLINE=0" in line
    else:
        assert f"cannot reach {endpoint}" in line
        cause = "no answer within 2 s" if case == "silent" else "Connection refused"
        assert cause in line, line
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())


def test_unreachable_hub_is_one_clear_error_without_retries(hub_cache, tmp_path, caplog):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_policy(ModelConfig(pretrained="someone/not-cached"), LoraConfig(), device=CPU)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message and "cannot reach http://127.0.0.1:" in message
    assert f"not in the Hugging Face cache ({hub_cache})" in message
    assert "`hf download someone/not-cached --local-dir DIR`" in message
    assert not [r for r in caplog.records if r.name.split(".")[0] == "huggingface_hub"]


def test_cli_exit_code_and_one_line(hub_cache, tmp_path, capsys):
    start = time.monotonic()
    code = main(["train", "model.pretrained=someone/not-cached", f"output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 10
    assert err.count("\n") == 1 and "cannot reach" in err and "Retrying" not in err, err


def test_probe_timeout_is_short_by_default(monkeypatch):
    from diffloop.policies.loading import PROBE_TIMEOUT_S, probe_timeout

    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    assert probe_timeout() == PROBE_TIMEOUT_S <= 5
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "30")
    assert probe_timeout() == 30


def test_silent_hub_times_out_once(hub_cache, monkeypatch, silent_server):
    from diffloop.policies.loading import ask_hub

    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    use_endpoint(monkeypatch, f"http://127.0.0.1:{silent_server}")
    start = time.monotonic()
    problem = ask_hub("someone/model", "model_index.json")
    assert problem is not None and problem.kind == "unreachable"
    assert "no answer within 1 s" in problem.message
    assert time.monotonic() - start < 4  # one request, no retries


def test_check_config_does_not_look_up_a_hub_id(hub_cache, monkeypatch, silent_server):
    use_endpoint(monkeypatch, f"http://127.0.0.1:{silent_server}")
    start = time.monotonic()
    assert main(["check-config", "model.pretrained=some-org/some-model"]) == 0
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------- the hub's refusals


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers HEAD /<org>/<name>/resolve/<rev>/<file> as the hub does, per repository."""

    answers: ClassVar[dict[str, tuple[int, dict[str, str]]]] = {
        "org/gated": (401, {"X-Error-Code": "GatedRepo"}),
        "org/gated-logged-in": (403, {"X-Error-Code": "GatedRepo"}),
        "org/missing": (401, {"X-Error-Code": "RepoNotFound"}),
        "org/missing-404": (404, {"X-Error-Code": "RepoNotFound"}),
        "org/no-revision": (404, {"X-Error-Code": "RevisionNotFound"}),
        "org/a-text-model": (404, {"X-Error-Code": "EntryNotFound"}),
        "org/busy": (503, {}),
        "org/present": (200, {"X-Repo-Commit": "a" * 40, "ETag": '"abc"', "Content-Length": "2"}),
    }
    requests: ClassVar[list[str]] = []

    def do_HEAD(self) -> None:
        FakeHub.requests.append(self.path)
        repo = "/".join(self.path.strip("/").split("/")[:2])
        status, headers = self.answers.get(repo, (404, {"X-Error-Code": "RepoNotFound"}))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub(hub_cache, monkeypatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.requests.clear()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    use_endpoint(monkeypatch, endpoint)
    yield endpoint
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("repo", "revision", "expected"),
    [
        ("org/gated", None, ["is a gated repository", "accept its license at", "hf auth login"]),
        ("org/gated-logged-in", None, ["is a gated repository", "HF_TOKEN"]),
        ("org/missing", None, ["has no repository 'org/missing'", "not logged in"]),
        ("org/missing-404", None, ["has no repository 'org/missing-404'", "no local directory"]),
        ("org/no-revision", "v9", ["has no revision 'v9'", "branches, tags or commits"]),
        ("org/a-text-model", None, ["has no model_index.json", "not a diffusers pipeline"]),
        ("org/busy", None, ["answered HTTP 503", "try again later"]),
    ],
)
def test_the_hubs_refusal_is_named(fake_hub, repo, revision, expected):
    with pytest.raises(ModelLoadError) as err:
        load_policy(ModelConfig(pretrained=repo, revision=revision), LoraConfig(), device=CPU)
    message = str(err.value)
    assert "\n" not in message and f"model.pretrained='{repo}'" in message
    for part in expected:
        assert part in message, message
    assert len(FakeHub.requests) == 1  # one request, no retries (not even for the 503)


def test_a_repository_the_hub_has_is_left_to_the_loaders(fake_hub):
    from diffloop.policies.loading import ask_hub, locate_model

    assert ask_hub("org/present", "model_index.json") is None
    assert locate_model("org/present") == "org/present"


def test_cli_names_a_gated_repository(fake_hub, tmp_path, capsys):
    code = main(["train", "model.pretrained=org/gated", f"output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "gated repository" in err, err


# -------------------------------------------------------------- a cached hub id still loads


@pytest.mark.parametrize("family", ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_cached_hub_id_loads_without_the_hub(hub_cache, request, family):
    put_in_cache(hub_cache, f"someone/{family}", request.getfixturevalue(family))
    policy = load_policy(
        ModelConfig(pretrained=f"someone/{family}"), LoraConfig(), device=CPU, sample=SampleConfig()
    )
    assert policy.trainable_parameters()


def test_cached_revision_and_offline_mode_load_from_the_cache(hub_cache, tiny_sd, monkeypatch):
    from huggingface_hub import constants

    put_in_cache(hub_cache, "someone/sd", tiny_sd, revision="v1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = ModelConfig(pretrained="someone/sd", revision="v1")
    assert load_policy(model, LoraConfig(), device=CPU).trainable_parameters()
    with pytest.raises(ModelLoadError, match="offline mode is on"):  # main is not cached
        load_policy(ModelConfig(pretrained="someone/sd"), LoraConfig(), device=CPU)


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "offline"])
def test_partly_cached_hub_id_names_what_the_cache_lacks(hub_cache, tiny_sd, monkeypatch, offline):
    from huggingface_hub import constants

    snapshot = put_in_cache(hub_cache, "someone/partial", tiny_sd)
    shutil.rmtree(snapshot / "unet")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(ModelLoadError) as err:
        load_policy(ModelConfig(pretrained="someone/partial"), LoraConfig(), device=CPU)
    message = str(err.value)
    assert "is only partly in the Hugging Face cache" in message and "lacks unet/" in message
    assert ("offline mode is on" if offline else "cannot reach") in message


def test_sdxl_vae_hub_id_is_looked_up_the_same_way(hub_cache, tiny_sdxl):
    from diffloop.config import SDXLConfig

    snapshot = put_in_cache(hub_cache, "someone/sdxl", tiny_sdxl)
    put_in_cache(hub_cache, "someone/vae", snapshot / "vae")
    shutil.rmtree(snapshot / "vae")  # model.sdxl.vae replaces it: the cached snapshot is complete
    model = ModelConfig(pretrained="someone/sdxl", sdxl=SDXLConfig(vae="someone/vae"))
    assert load_policy(model, LoraConfig(), device=CPU).vae is not None
    model = ModelConfig(pretrained="someone/sdxl", sdxl=SDXLConfig(vae="someone/other-vae"))
    with pytest.raises(ModelLoadError) as err:
        load_policy(model, LoraConfig(), device=CPU)
    message = str(err.value)
    assert message.startswith("model.sdxl.vae='someone/other-vae' is not in the Hugging Face cache")
    assert "cannot reach" in message and "then model.sdxl.vae=DIR" in message


# ------------------------------------------------------------------------ reward weights


def test_reward_weights_from_an_unreachable_hub_fail_at_once(hub_cache):
    from transformers import CLIPModel

    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as err:
        load_pretrained(CLIPModel, "someone/clip", reward="clip_score", kwarg="model")
    with pytest.raises(MissingWeightsError) as err_file:
        resolve_file("someone/heads/head.pth", reward="aesthetic", kwarg="head_path")
    assert time.monotonic() - start < 10
    for e in (err, err_file):
        message = str(e.value)
        assert "\n" not in message and "cannot reach http://127.0.0.1:" in message
        assert "not in the Hugging Face cache" in message and "/path/to/it" in message


def test_cached_reward_weights_load_without_the_hub(hub_cache, tmp_path):
    from transformers import CLIPModel

    from diffloop.testing.tiny_reward_models import make_tiny_clip, save_aesthetic_head

    put_in_cache(hub_cache, "someone/clip", make_tiny_clip(tmp_path / "clip"))
    head = save_aesthetic_head(tmp_path / "head.pth", input_size=16)
    put_in_cache(hub_cache, "someone/heads", head)
    model = load_pretrained(CLIPModel, "someone/clip", reward="clip_score", kwarg="model")
    assert isinstance(model, CLIPModel)
    path = resolve_file("someone/heads/head.pth", reward="aesthetic", kwarg="head_path")
    assert path.read_bytes() == head.read_bytes()
