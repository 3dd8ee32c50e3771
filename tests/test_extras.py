"""Extras and install hints: matplotlib is a dependency (the ``[report]`` extra stays as an alias; a
broken install gets one line naming the fix), and every hub hint names the current ``hf
download``."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from diffloop.config import LoraConfig, ModelConfig
from diffloop.policies.diffusers_policy import ModelLoadError
from diffloop.policies.families import load_policy
from diffloop.tools.report import report_main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffloop"
INSTALL_HINT = "pip install 'matplotlib>=3.7'"


def synthetic_run(root: Path) -> Path:
    """A run directory the report reads: a config and three epochs of metrics."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "train: {algorithm: loop}\nreward: {name: jpeg_compressibility}\n"
    )
    rows = [{"epoch": -1, "eval_reward_mean": 0.2}]
    rows += [{"epoch": e, "reward_mean": 0.1 * e, "eval_reward_mean": 0.3 + e} for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


# ----------------------------------------------------------------------------- matplotlib


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings ("matplotlib>=3.7" -> "matplotlib")."""
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in requirements}


def test_matplotlib_is_a_dependency_and_the_report_extra_stays() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "matplotlib>=3.7" in project["dependencies"]  # the report's plots out of the box
    assert "matplotlib" in _names(extras["report"])  # `pip install 'diffloop[report]'` still works
    assert "matplotlib" in _names(extras["test"])  # the suite renders the plots


def test_report_with_matplotlib_has_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.html"
    assert report_main([str(synthetic_run(tmp_path)), "--output", str(out)]) == 0
    assert (tmp_path / "report_plots" / "reward_mean.png").is_file()
    assert "No plots" not in out.read_text()
    assert capsys.readouterr().err == ""


def test_report_with_a_broken_matplotlib_is_one_line_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = synthetic_run(tmp_path)
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    out = tmp_path / "report.html"
    assert report_main([str(run), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("diffloop: error: report: matplotlib")
    assert INSTALL_HINT in err_lines[0] and captured.out == ""
    assert not out.exists()


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported by statements that run at import time (not inside a function body)."""
    names: list[str] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        todo.extend(ast.iter_child_nodes(node))
    return names


def test_no_module_imports_matplotlib_at_import_time() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        if any(
            n.split(".")[0] == "matplotlib"
            for n in _module_level_imports(ast.parse(path.read_text()))
        )
    ]
    assert offenders == [], f"import matplotlib inside the function that plots: {offenders}"


def test_the_import_scan_sees_module_level_imports() -> None:
    tree = ast.parse("import os\ntry:\n    import matplotlib.pyplot\n"
                     "except ImportError:\n    pass\n"
                     "def f():\n    import matplotlib\n")  # fmt: skip
    assert sorted(_module_level_imports(tree)) == ["matplotlib.pyplot", "os"]


# ----------------------------------------------------------------------------- hub hints


def test_no_text_names_the_old_huggingface_cli_download() -> None:
    texts = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.yaml"), ROOT / "README.md"]
    texts += sorted((ROOT / "docs").rglob("*.md"))
    stale = [str(p.relative_to(ROOT)) for p in texts if "huggingface-cli download" in p.read_text()]
    assert stale == [], f"use `hf download <repo> --local-dir DIR` in: {stale}"


def test_missing_model_error_names_hf_download(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_policy(
            ModelConfig(pretrained=str(tmp_path / "nope")), LoraConfig(), device=torch.device("cpu")
        )
    assert "`hf download <repo> --local-dir DIR`" in str(info.value)
