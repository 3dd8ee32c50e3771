"""``diffloop sample RUN``: the run's sampling settings are the defaults, flags override them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from diffloop.cli import main
from diffloop.config import SampleConfig
from diffloop.policies.diffusers_policy import DDIMPolicy
from diffloop.testing.runs import tiny_overrides
from diffloop.tools.sampling import SampleUsageError, sampling_settings

RUN_SAMPLE = {"sample.num_steps": 3, "sample.eta": 0.5, "sample.guidance_scale": 2.0,
              "sample.negative_prompt": "'blurry, dark'"}  # fmt: skip


def flags(**given) -> argparse.Namespace:
    values = {"steps": None, "eta": None, "guidance_scale": None, "negative_prompt": None}
    return argparse.Namespace(**{**values, **given})


def test_run_settings_are_defaults_and_flags_override():
    run = SampleConfig(num_steps=7, eta=0.3, guidance_scale=2.5, negative_prompt="ugly")
    assert sampling_settings(flags(), run) == run
    got = sampling_settings(flags(eta=0.0, negative_prompt=""), run)
    assert (got.num_steps, got.eta, got.guidance_scale, got.negative_prompt) == (7, 0.0, 2.5, "")
    assert sampling_settings(flags(), None) == SampleConfig()  # a model, not a run: the defaults
    with pytest.raises(SampleUsageError, match=r"--eta=-1.0 must be >= 0"):
        sampling_settings(flags(eta=-1.0), run)
    with pytest.raises(SampleUsageError, match=r"--steps=0 must be >= 1"):
        sampling_settings(flags(steps=0), run)


@pytest.fixture(scope="module")
def run_dir(tiny_sd, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    args = tiny_overrides(
        tiny_sd, out, num_epochs=1, **{**RUN_SAMPLE, "logging.tensorboard": "false"}
    )
    assert main(["train", *args]) == 0
    return out


@pytest.fixture
def sample_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every DDIMPolicy.sample call (the real method still runs)."""
    calls, real = [], DDIMPolicy.sample

    def recording(self, prompts, generators, **kwargs):
        calls.append(kwargs)
        return real(self, prompts, generators, **kwargs)

    monkeypatch.setattr(DDIMPolicy, "sample", recording)
    return calls


def test_sample_run_uses_the_runs_settings(run_dir, sample_calls, tmp_path, capsys):
    argv = ["sample", str(run_dir), "--prompt", "a cat", "--num-per-prompt", "2"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    assert sample_calls[-1] == {"num_steps": 3, "eta": 0.5, "guidance_scale": 2.0,
                                "negative_prompt": "blurry, dark"}  # fmt: skip
    assert (
        "3 steps, eta 0.5, guidance 2.0, negative prompt 'blurry, dark'" in capsys.readouterr().out
    )
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "0001.png").is_file()

    override = ["--steps", "2", "--eta", "0", "--guidance-scale", "1.5", "--negative-prompt", ""]
    assert main([*argv, *override, "--output", str(tmp_path / "b")]) == 0
    assert sample_calls[-1] == {"num_steps": 2, "eta": 0.0, "guidance_scale": 1.5,
                                "negative_prompt": ""}  # fmt: skip


def test_bad_flag_fails_before_loading_a_model(run_dir, sample_calls, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "sample",
                str(run_dir),
                "--prompt",
                "a cat",
                "--eta",
                "-0.5",
                "--output",
                str(tmp_path),
            ]
        )
    assert exc.value.code == 2
    assert "--eta=-0.5 must be >= 0" in capsys.readouterr().err and not sample_calls


def test_default_output_is_a_new_numbered_directory_under_the_run(run_dir, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory
    argv = ["sample", str(run_dir), "--prompt", "a cat", "--prompt", "a dog on a bench",
            "--num-per-prompt", "2"]  # fmt: skip
    assert main(argv) == 0
    first = run_dir / "samples" / "0001"
    assert {p.name for p in first.iterdir()} == {
        "grid.png",
        "samples.json",
        *(f"{i:04d}.png" for i in range(4)),
    }
    assert f"to {first.absolute()} (" in capsys.readouterr().out  # the place is printed
    assert main(argv) == 0  # a second call: a new directory, the first one kept
    second = run_dir / "samples" / "0002"
    assert (second / "grid.png").is_file() and (first / "grid.png").is_file()
    assert str(second.absolute()) in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    # the grid: a row per prompt, tiny images upscaled to >= 128 px, the prompt beside each row
    grid = np.asarray(Image.open(first / "grid.png").convert("RGB"))
    tile = Image.open(first / "0000.png").size[0]
    assert tile < 128 and grid.shape[0] >= 2 * 128 and grid.shape[1] >= 2 * 128 + 100
    label = grid[:, : grid.shape[1] - 2 * 132]  # left of the two images of each row
    text_rows = np.nonzero((label < 128).any(axis=(1, 2)))[0]
    assert text_rows.min() < 40 and text_rows.max() > grid.shape[0] // 2  # title, and both rows


def test_an_output_holding_samples_is_refused_before_loading(run_dir, sample_calls, tmp_path,
                                                             capsys):  # fmt: skip
    (tmp_path / "grid.png").write_bytes(b"")
    argv = ["sample", str(run_dir), "--prompt", "a cat", "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and not sample_calls
    assert "already holds samples (grid.png)" in capsys.readouterr().err


def test_a_base_model_goes_to_a_printed_numbered_directory(tmp_path, monkeypatch):
    from diffloop.tools.sampling import new_numbered_dir, sample_output

    monkeypatch.chdir(tmp_path)
    assert sample_output(None, Path("shapes"), is_run=False) == (Path("samples"), True)
    assert sample_output(None, tmp_path / "run", is_run=True) == (
        tmp_path / "run" / "samples",
        True,
    )
    assert sample_output(tmp_path / "x", Path("shapes"), is_run=False) == (tmp_path / "x", False)
    (tmp_path / "samples" / "0007").mkdir(parents=True)
    assert new_numbered_dir(Path("samples")) == Path("samples") / "0008"
    assert new_numbered_dir(Path("samples")) == Path("samples") / "0009"
