"""cpu_threads: auto = the available cores; parallel sweep jobs split the cores without
oversubscribing."""

from __future__ import annotations

import pytest
import torch

from diffloop.config import ConfigError, PerformanceConfig, load_config, resolve_cpu_threads
from diffloop.performance import set_backend_flags
from diffloop.tools import sweep


def test_default_is_auto_and_integers_and_null_load():
    assert load_config(None, []).cpu_threads == "auto"
    assert load_config(None, ["cpu_threads=3"]).cpu_threads == 3
    assert load_config(None, ["cpu_threads=null"]).cpu_threads is None


@pytest.mark.parametrize("bad", ["0", "-2", "autp", "1.5"])
def test_bad_cpu_threads_is_one_line_naming_the_field(bad):
    with pytest.raises(ConfigError, match=r"cpu_threads") as e:
        load_config(None, [f"cpu_threads={bad}"])
    assert "\n" not in str(e.value)


def test_auto_uses_the_cores_split_between_local_processes():
    assert resolve_cpu_threads("auto", environ={}, cores=8) == 8
    assert resolve_cpu_threads("auto", environ={"LOCAL_WORLD_SIZE": "2"}, cores=8) == 4
    assert resolve_cpu_threads("auto", environ={"LOCAL_WORLD_SIZE": "16"}, cores=8) == 1


def test_auto_honours_omp_num_threads_like_nproc():
    assert resolve_cpu_threads("auto", environ={"OMP_NUM_THREADS": "3"}, cores=8) == 3
    assert resolve_cpu_threads("auto", environ={"OMP_NUM_THREADS": "2,1"}, cores=8) == 2
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='x'.*cpu_threads=N"):
        resolve_cpu_threads("auto", environ={"OMP_NUM_THREADS": "x"}, cores=8)


def test_integers_and_null_pass_through():
    assert resolve_cpu_threads(5, environ={"OMP_NUM_THREADS": "1"}, cores=2) == 5
    assert resolve_cpu_threads(None, environ={}, cores=2) is None


def test_set_backend_flags_applies_the_resolved_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        assert set_backend_flags(PerformanceConfig(), torch.device("cpu"), "auto") == 2
        assert torch.get_num_threads() == 2
        assert set_backend_flags(PerformanceConfig(), torch.device("cpu"), None) is None
        assert torch.get_num_threads() == 2  # None leaves it alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cores", "jobs", "threads"),
    [(2, 1, 2), (2, 2, 1), (16, 4, 4), (16, 16, 1), (16, 3, 5), (4, 8, 1)],
)
def test_parallel_jobs_never_oversubscribe(cores, jobs, threads):
    assert sweep.threads_per_job(cores, jobs) == threads
    assert jobs * threads <= max(cores, jobs)  # only more jobs than cores can exceed the cores


def test_parallel_shard_commands_cover_every_shard_once(tmp_path):
    s = sweep.load_sweep("shapes_algorithms.yaml", tmp_path / "out")
    commands = [sweep.shard_command(s, i, 3, ["eval.num_prompts=2"]) for i in range(3)]
    shards = [c[c.index("--shard") + 1] for c in commands]
    assert shards == ["0/3", "1/3", "2/3"]
    assert all("--no-summary" in c and c[-1] == "eval.num_prompts=2" for c in commands)


def test_run_parallel_gives_each_child_its_share_and_reports_failures(tmp_path, monkeypatch):
    import sys

    s = sweep.load_sweep("shapes_algorithms.yaml", tmp_path / "out")
    monkeypatch.setattr("diffloop.config.available_cores", lambda: 4)

    def child(_sweep, index, jobs, overrides):  # stands in for `diffloop compare --shard`
        code = (
            f"import os, sys; print(os.environ['OMP_NUM_THREADS'], '{index}/{jobs}'); "
            f"sys.exit({index})"
        )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(sweep, "shard_command", child)
    logged: list[str] = []
    assert sweep.run_parallel(s, 2, [], log=logged.append) == 1  # shard 1 exits 1
    logs = sorted((tmp_path / "out" / "jobs").glob("shard_*.log"))
    assert [p.read_text().split() for p in logs] == [["2", "0/2"], ["2", "1/2"]]  # 4 cores / 2 jobs
    assert logged[0] == "2 parallel jobs x 2 thread(s) on 4 cores"
    assert any("shard 1/2 failed (exit 1)" in line for line in logged)
