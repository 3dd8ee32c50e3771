"""Reward kwargs are checked against the reward's constructor before any model loads: check-config
and train refuse the same config with the same one line, and build nothing to do it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diffloop.cli import main
from diffloop.rewards import registry
from diffloop.rewards.server import serve_main

SRC = str(Path(__file__).resolve().parents[1] / "src")

# (overrides, what the one-line error must say)
BAD_KWARGS = [
    (["reward.name=remote"], "reward.name=remote: reward 'remote': needs the kwarg url=http://HOST:PORT"),
    (["reward.name=remote", "reward.kwargs.url=localhost:8000"],
     "url='localhost:8000' must start with http:// or https:// and name a host; e.g. url=http://localhost:8000"),
    (["reward.name=remote", "reward.kwargs.url=http://127.0.0.1:8765", "reward.kwargs.retries=-1"],
     "need retries >= 0, got retries=-1"),
    (["reward.name=jpeg_compressibility", "reward.kwargs.foo=1"],
     ("reward 'jpeg_compressibility' takes no kwarg 'foo'. Its kwargs: quality; rename "
      "or remove 'foo'")),
    (["reward.name=pickscore", "reward.kwargs.foo=1"],
     ("reward.name=pickscore: reward 'pickscore' takes no kwarg 'foo'. Its kwargs: "
      "model, processor, "
      "dtype, batch_size")),
    (["reward.name=pickscore", "reward.kwargs.modle=x"], "no kwarg 'modle'. Did you mean 'model'?"),
    (["reward.name=remote", "reward.kwargs.url=http://127.0.0.1:8765", "reward.kwargs.ulr=x"],
     "no kwarg 'ulr'. Did you mean 'url'?"),
    (["reward=[{name: jpeg_compressibility, kwargs: {qualty: 80}}, {name: remote, kwargs: {url: 'http://h:1'}}]"],
     ("reward.components[0].name=jpeg_compressibility: reward 'jpeg_compressibility' "
      "takes no kwarg "
      "'qualty'. Did you mean 'quality'?")),
    (["reward=[{name: jpeg_compressibility}, {name: remote, kwargs: {url: 'h:1'}}]"],
     "reward.components[1].name=remote: reward 'remote': url='h:1' must start with http://"),
    (["eval.reward=remote", "eval.reward_kwargs.url=ftp://host/x"],
     "eval.reward=remote: reward 'remote': url='ftp://host/x' must start with http:// or https://"),
    (["eval.reward=clip_score", "eval.reward_kwargs.scael=2"],
     "no kwarg 'scael'. Did you mean 'scale'?"),
    # a user's class (tests/example_rewards.py): imported by the name check already, so checked too
    (["reward.name=example_rewards:Brightness", "reward.kwargs.scal=2"],
     ("reward 'example_rewards:Brightness' takes no kwarg 'scal'. Did you mean 'scale'? "
      "Its kwargs: scale")),
]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert err.startswith("diffloop: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and expected in err, err


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model (or any reward's weights) fails the test: the refusal must come first."""
    import diffloop.trainer
    from diffloop.rewards import model_loading

    def load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(diffloop.trainer, "load_policy", load)
    monkeypatch.setattr(model_loading, "load_pretrained", load)


@pytest.mark.parametrize(("overrides", "expected"), BAD_KWARGS, ids=lambda v: str(v)[:60])
def test_check_config_and_train_refuse_bad_reward_kwargs_with_one_line(
    overrides: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    no_model_loads: None,
) -> None:
    args = [*overrides, f"output_dir={tmp_path / 'run'}"]
    code, checked = run_cli(capsys, "check-config", *args)
    assert_one_line(code, checked, expected)
    code, trained = run_cli(capsys, "train", *args)
    assert_one_line(code, trained, expected)
    assert trained == checked  # the same check, the same line
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


def test_good_kwargs_pass_and_a_reward_taking_any_kwargs_accepts_anything(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def anything(**kwargs: Any) -> Any:
        return lambda images, prompts, metadata: [0.0] * len(prompts)

    monkeypatch.setitem(registry.REWARDS, "anything", anything)
    out = f"output_dir={tmp_path / 'run'}"
    for overrides in (
        ["reward.name=anything", "reward.kwargs.whatever=1", "reward.kwargs.other=x"],
        ["reward.name=remote", "reward.kwargs.url=https://rewards.example:443/",
         "reward.kwargs.timeout=5"],
        ["reward.name=pickscore", "reward.kwargs.batch_size=4"],
        ["reward.name=example_rewards:Brightness", "reward.kwargs.scale=2"],
        ["reward.name=jpeg_compressibility", "reward.kwargs.quality=80"],
    ):  # fmt: skip
        code, err = run_cli(capsys, "check-config", *overrides, out)
        assert code == 0, err


def test_the_check_reads_signatures_only(tmp_path: Path) -> None:
    """check-config of a model reward imports no model library (transformers) and loads nothing."""
    code = (
        "import sys; from diffloop.cli import main; "
        f"rc = main(['check-config', 'reward.name=pickscore', 'reward.kwargs.foo=1', "
        f"'output_dir={tmp_path / 'run'}']); "
        "heavy = [m for m in ('transformers', 'open_clip', 'diffusers') if m in sys.modules]; "
        "print(rc, heavy)"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120, check=False)  # fmt: skip
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr
    assert "takes no kwarg 'foo'" in result.stderr


class NeedsThreshold:
    """A reward class with a required constructor argument."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold


def test_a_required_kwarg_left_out_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.REWARDS, "needs_threshold", NeedsThreshold)
    with pytest.raises(
        registry.RewardSpecError, match=r"needs kwarg\(s\) threshold \(no default\)"
    ):
        registry.check_reward_name("needs_threshold", {})
    registry.check_reward_name("needs_threshold", {"threshold": 0.5})


def test_serve_reward_refuses_unknown_kwargs_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert serve_main(["jpeg_compressibility", "--kwargs", '{"qualty": 5}', "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes no kwarg 'qualty'. Did you mean 'quality'?" in err, err
