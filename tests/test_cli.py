"""The ``diffloop`` command: every user error is one line, help lists the config keys, help is
light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import diffloop
from diffloop.cli import COMMANDS, main
from diffloop.errors import DiffloopError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert err.startswith("diffloop: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert expected in err, err


# ----- help, version, unknown commands ------------------------------------------------------------


def test_train_help_lists_config_keys_with_their_docs(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    assert out.startswith("usage: diffloop train [CONFIG.yaml] [key.sub=value ...]")
    assert (
        "  sample.eta = 1.0   (in (0, 1])\n      The sampler's stochasticity, in (0, 1]: DDIM's eta"
        in out
    )
    assert (
        "  train.adv_clip_max = null   (>= 0)\n      Clip advantages to +-this. null: "
        "the algorithm's" in out
    )
    assert "  performance.compile = none   (one of none, sampling, training, all)\n" in out
    for key in (
        "seed",
        "train.learning_rate",
        "reward.kwargs",
        "eval.prompts",
        "lora.target_modules",
    ):
        assert f"  {key} = " in out, key


def test_check_config_help_is_the_same_key_list(capsys):
    code, out, _ = run_cli(capsys, "check-config", "-h")
    assert (
        code == 0
        and "  train.algorithm = loop   (one of loop, ppo, grpo, reinforce, reinforce_loo)\n" in out
    )


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["check-config", "--help"], ["--version"]]
)
def test_help_and_version_do_not_import_torch(argv):
    code = (
        "import sys; from diffloop.cli import main; "
        f"rc = main({argv!r}); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]; "
        "assert rc == 0 and not heavy, heavy"
    )
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"diffloop {diffloop.__version__}\n"


def test_unknown_command_suggests_the_closest(capsys):
    code, _, err = run_cli(capsys, "trian")
    assert_one_line_error(code, err, "unknown command 'trian'. Did you mean 'train'?")
    code, _, err = run_cli(capsys, "chek-config")
    assert_one_line_error(code, err, "Did you mean 'check-config'?")


def test_no_command_prints_usage_and_fails(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "diffloop train [CONFIG.yaml]" in out and "--version" in out


# ----- every user error is one line, never a traceback --------------------------------------------


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "nul.txt").write_bytes(b"\x00" * 16)
    (tmp / "bad.yaml").write_text("train: [1\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "sweep_no_budget.yaml").write_text("runs: [{name: a}]\n")
    (tmp / "sweep_bad_run.yaml").write_text(
        "base: shapes.yaml\nbudget: {prompts: 16}\n"
        "runs:\n  - {name: a, overrides: [reward.name=no_such_reward, eval.prompts=shapes/val]}\n"
    )
    (tmp / "afile").write_text("")
    missing = str(tmp / "missing")
    return [
        (["train", missing + ".yaml"], "does not exist"),
        (["train", str(tmp / "bad.yaml")], "is not valid YAML"),
        (["train", str(tmp / "list.yaml")], "must hold a mapping"),
        (["train", "train.lerning_rate=1e-4"], "Did you mean 'learning_rate'?"),
        (["train", "sample.eta=2"], "sample.eta=2.0 must be in (0, 1]"),
        (["train", "train.learning_rate=.inf"], "train.learning_rate=inf is not finite"),
        (["train", "seed=-1"], "seed=-1 must be in [0, "),
        (["train", "train.algorithm=lop"], "Did you mean 'loop'?"),
        (["train", "reward.name=no_such_reward"], "reward.name=no_such_reward: unknown reward"),
        (["train", "reward.name=no_such_pkg.mod:fn"], "could not import module 'no_such_pkg.mod'"),
        (["train", "reward.name=example_rewards:missing"], "has no attribute 'missing'"),
        (["train", "reward.name=multi"],
         "reward.components: reward components must be a non-empty list"),
        (["train", "reward.components=[{name: jpeg_compresibility}]", "reward.name=multi"],
         "reward.components[0].name=jpeg_compresibility: unknown reward"),
        (["train", "prompts.source=file", f"prompts.path={tmp / 'nul.txt'}"],
         "control character NUL"),
        (["train", "prompts.source=file", f"prompts.path={missing}.txt"], "does not exist"),
        (["train", "prompts.source=ddpo/simple_animal"], "Did you mean 'ddpo/simple_animals'?"),
        (["train", "eval.prompts=shapes/val_par"],
         "eval.prompts=shapes/val_par: unknown shapes split"),
        (["train", f"output_dir={tmp / 'afile' / 'run'}"], "is a file"),
        (["train", "output_dir=/proc/diffloop_run"], "is not writable"),
        (["check-config", "reward.name=no_such_reward"], "unknown reward"),
        (["check-config", "reward.name=multi", "reward.kwargs.a=1"], "not reward.kwargs"),
        (["check-config", "reward.name=jpeg_compressibility", "reward.components=[{name: a}]"],
         "use reward.name=multi"),
        (["check-config", "reward.name=example_rewards:prompt_length", "reward.kwargs.a=1"],
         "takes no kwargs"),
        (["check-config", str(tmp / "sweep_bad_run.yaml")],
         "run 'a' (seed 0): reward.name=no_such_reward"),
        (["compare", str(tmp / "sweep_bad_run.yaml")],
         "run 'a' (seed 0): reward.name=no_such_reward"),
        (["compare", str(tmp / "sweep_no_budget.yaml")], "needs 'budget'"),
        (["compare", missing + ".yaml"], "does not exist"),
        (["sample", missing, "--prompt", "a cat"], "no directory at"),
        (["sample", "shapes", "--prompt", "a cat", "--output", "/proc/diffloop_out"],
         "--output=/proc/diffloop_out"),
        (["bench", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["variance", "sample.eta=0"], "sample.eta=0.0 must be in (0, 1]"),
        (["variance", "--algorithms", "nope"], "unknown algorithm 'nope'"),
    ]  # fmt: skip


def test_every_bad_input_is_one_line_error(capsys, tmp_path):
    for argv, expected in _bad_inputs(tmp_path):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, expected)


def _argparse_style_error(capsys, argv: list[str]) -> str:
    """Commands built on argparse report bad input as the one line ``diffloop: error: <cmd>:
    ...``."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_argparse_commands_report_bad_input_without_tracebacks(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    cases = [
        (["report", str(tmp_path / "missing")], "diffloop: error: report: ",
         "is not a run directory"),
        (["report", str(run), "--output", "/proc/diffloop/report.html"],
         "diffloop: error: report: ",
         "No such file or directory"),
        (["eval", "shapes", "--prompts", "shapes/val", "--reward", "shapes_binding", "--output",
          "/proc/diffloop_eval"], "diffloop: error: eval: ",
         "--output=/proc/diffloop_eval cannot be created"),
        (["serve-reward", "jpeg_compressibility", "--port", "-5"],
         "diffloop: error: serve-reward: ",
         "-5 is not a TCP port"),
    ]  # fmt: skip
    for argv, prefix, expected in cases:
        line = _argparse_style_error(capsys, argv)
        assert line.startswith(prefix) and expected in line, line


def test_train_fails_before_building_the_trainer(capsys, monkeypatch):
    import diffloop.trainer

    def no_trainer(*args, **kwargs):
        raise AssertionError("the trainer must not be built for a config check-config refuses")

    monkeypatch.setattr(diffloop.trainer, "Trainer", no_trainer)
    code, _, err = run_cli(capsys, "train", "reward.name=no_such_reward")
    assert_one_line_error(code, err, "unknown reward")


def test_train_and_check_config_run_the_same_checks(capsys, monkeypatch):
    import diffloop.preflight
    import diffloop.trainer

    seen = []
    monkeypatch.setattr(
        diffloop.preflight, "check_before_loading", lambda config: seen.append(config.seed)
    )
    monkeypatch.setattr(
        diffloop.trainer, "Trainer", lambda *a, **k: pytest.fail("stop before training")
    )
    run_cli(capsys, "check-config", "seed=11")
    with pytest.raises(pytest.fail.Exception):
        main(["train", "seed=12"])
    assert seen == [11, 12]


def test_check_config_checks_every_run_of_a_sweep(capsys):
    code, out, _ = run_cli(capsys, "check-config", "shapes_algorithms.yaml")
    assert code == 0 and "OK (48 runs:" in out


def test_user_errors_share_one_base_class():
    from diffloop.checkpoint import CheckpointError
    from diffloop.config import ConfigError
    from diffloop.policies.diffusers_policy import ModelLoadError
    from diffloop.prompts import PromptError
    from diffloop.rewards import RewardError
    from diffloop.rewards.model_loading import MissingWeightsError
    from diffloop.rewards.registry import RewardSpecError
    from diffloop.tools.sweep import SweepError

    for cls in (CheckpointError, ConfigError, ModelLoadError, PromptError, RewardError,
                MissingWeightsError, RewardSpecError, SweepError):  # fmt: skip
        assert issubclass(cls, DiffloopError), cls


def test_every_command_has_help_without_error(capsys):
    for name in COMMANDS:
        try:
            code = main([name, "--help"])
        except SystemExit as e:  # argparse's --help
            code = e.code
        assert code == 0, name
        capsys.readouterr()
