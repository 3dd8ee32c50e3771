"""Sharded (FSDP2) checkpoints: kill-and-resume equals the uninterrupted run, a checkpoint written
on N processes resumes on M (sharded or not), a damaged or incomplete sharded checkpoint falls back
to the previous one, ``diffloop sample`` / ``eval`` read sharded checkpoints without a process
group, and the export of a sharded run reloads in diffusers.

Three torchrun launches (tests/fsdp_checkpoint_worker.py, gloo on CPU; a launch costs tens of
seconds, so each holds several runs) on the tiny SD pipeline, LoRA with an EMA. The algorithm is
reinforce_loo (one optimizer step per epoch on any number of processes), so the same run on 1 and
on 2 processes takes the same steps on the same samples.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffloop import checkpoint
from diffloop.testing.processes import launch
from diffloop.testing.runs import tiny_overrides

WORKER = Path(__file__).resolve().parent / "fsdp_checkpoint_worker.py"
sys.path.insert(0, str(WORKER.parent))
from fsdp_checkpoint_worker import FINAL_PARAMETERS, STARTED

SHARDED = {
    "fsdp.enabled": "true",
    "train.algorithm": "reinforce_loo",
    "train.ema_decay": 0.5,
    "num_epochs": 2,
}
# 1 process against 2: FSDP reduce-scatters the two ranks' gradient sums where one process
# accumulates them in another order; Adam normalises each element, so float-order noise in
# near-zero gradient elements shows at ~1e-6, while a wrong restore (weights, moments, step count,
# learning rate) moves parameters by ~lr = 1e-2.
ACROSS_PROCESS_COUNTS = 2e-5
LORA = "lora/pytorch_lora_weights.safetensors"  # the export (the EMA's LoRA)


def _launch(nproc: int, runs: list[list[str]]) -> None:
    args: list[str] = []
    for i, run in enumerate(runs):
        args += (["---"] if i else []) + run
    launch(WORKER, nproc, args)


def _final(run_dir: Path, started_at: int = 0) -> dict[str, torch.Tensor]:
    """The run's final parameters; its last session must have started at epoch ``started_at`` (a
    resumed one at 1: a run that restarted from scratch would end with the same weights)."""
    assert (run_dir / STARTED).read_text() == str(started_at), f"{run_dir.name} did not resume"
    return load_file(str(run_dir / FINAL_PARAMETERS))


def _assert_params(got: dict, want: dict, atol: float, what: str) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=f"{what}: {name}")


def _damage_newest(run_dir: Path) -> None:
    """epoch 2's shard of rank 1 gets a flipped byte (its sha256 no longer matches); a copy of it
    without COMPLETE poses as an epoch-3 save that did not finish, and so does a .tmp- directory."""
    root = checkpoint.checkpoint_root(run_dir)
    shard = root / "epoch_000002" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    shutil.copytree(root / "epoch_000002", root / "epoch_000003")
    (root / "epoch_000003" / checkpoint.COMPLETE).unlink()
    (root / ".tmp-epoch_000004" / "dcp").mkdir(parents=True)


@pytest.fixture(scope="module")
def runs(tiny_sd, tmp_path_factory) -> Path:
    """Run directories, all the same 2-epoch run (SHARDED) unless named otherwise:
    u2   uninterrupted on 2 processes;
    k2   killed when epoch 2 starts and resumed, on 2 processes (k2_b: its copy after the kill);
    fb   u2's directory with its newest checkpoint damaged (:func:`_damage_newest`), resumed on 1;
    k2_b resumed on 1 process unsharded (fsdp.enabled=false);
    s1   epoch 1 on 1 process sharded, killed, resumed on 2;
    n1   epoch 1 on 1 process unsharded, killed, resumed on 2 sharded;
    full full fine-tuning, on 2 processes."""
    out = tmp_path_factory.mktemp("fsdp_checkpoint")

    def over(name: str, **extra) -> list[str]:
        return tiny_overrides(tiny_sd, out / name, **{**SHARDED, **extra})

    _launch(2, [
        over("u2"),
        over("full", **{"lora.enabled": "false"}),
        over("k2") + ["@kill=1", f"@copy={out / 'k2_b'}"],
        over("k2", resume="true"),
    ])  # fmt: skip
    shutil.copytree(out / "u2", out / "fb")
    (out / "fb" / FINAL_PARAMETERS).unlink()
    (out / "fb" / STARTED).unlink()
    _damage_newest(out / "fb")
    # What `diffloop sample` / `eval` read: here, before the resume below rewrites epoch 2.
    path, weights, name = checkpoint.load_newest_valid_weights(out / "fb", ema=False)
    (out / "fb_offline.txt").write_text(f"{path.name} {name}")
    torch.save(weights, out / "fb_offline.pt")
    _launch(1, [
        over("fb", resume="true"),
        over("k2_b", resume="true", **{"fsdp.enabled": "false"}),
        over("s1") + ["@kill=1"],
        over("n1", **{"fsdp.enabled": "false"}) + ["@kill=1"],
    ])  # fmt: skip
    _launch(2, [over("s1", resume="true"), over("n1", resume="true")])
    return out


@pytest.mark.slow
def test_sharded_kill_and_resume_equals_the_uninterrupted_run(runs):
    u2, k2 = _final(runs / "u2"), _final(runs / "k2", started_at=1)
    _assert_params(k2, u2, atol=0, what="2 processes, killed and resumed")
    # ... and its export (the EMA's LoRA, gathered from the shards) is the same file's tensors.
    a, b = load_file(str(runs / "u2" / LORA)), load_file(str(runs / "k2" / LORA))
    _assert_params(b, a, atol=0, what="export after the resume")
    # The checkpoint is sharded (each process's shards, DCP) and training moved the weights.
    newest = checkpoint.latest_checkpoint(runs / "k2")
    assert checkpoint.is_sharded(newest) and not (newest / checkpoint.WEIGHTS).exists()
    assert {p.name for p in (newest / "dcp").iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    }
    first, _ = checkpoint.load_weights(runs / "k2" / "checkpoints" / "epoch_000001", ema=False)
    assert max((first[n] - u2[n]).abs().max().item() for n in u2) > 1e-3


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_other_process_counts_sharded_or_not(runs):
    u2, u2_export = _final(runs / "u2"), load_file(str(runs / "u2" / LORA))
    for name, what in (
        ("fb", "2 -> 1 sharded (after falling back from a damaged checkpoint)"),
        ("k2_b", "2 sharded -> 1 unsharded"),
        ("s1", "1 -> 2 sharded"),
        ("n1", "1 unsharded -> 2 sharded"),
    ):
        resumed = _final(runs / name, started_at=1)
        _assert_params(resumed, u2, atol=ACROSS_PROCESS_COUNTS, what=what)
        # The EMA was restored too: the export holds it.
        exported = load_file(str(runs / name / LORA))
        _assert_params(exported, u2_export, atol=ACROSS_PROCESS_COUNTS, what=f"{what}, export")


@pytest.mark.slow
def test_damaged_or_incomplete_sharded_checkpoints_fall_back(runs, caplog, tmp_path):
    # Offline (no process group), as `diffloop sample` / `eval` read it: epoch 3 is incomplete,
    # epoch 2's shard is corrupt, epoch 1 is read, its shards gathered into whole tensors.
    assert (runs / "fb_offline.txt").read_text() == "epoch_000001 dcp (model)"
    offline = torch.load(runs / "fb_offline.pt")
    online, _ = checkpoint.load_weights(runs / "k2" / "checkpoints" / "epoch_000001", ema=False)
    _assert_params(offline, online, atol=0, what="offline read of epoch 1")
    # The resume on 1 process fell back the same way, then wrote a fresh epoch 2.
    with caplog.at_level(logging.WARNING):
        path, weights, name = checkpoint.load_newest_valid_weights(runs / "fb")
    assert path.name == "epoch_000002"
    assert name == "dcp (ema)" and weights.keys() == offline.keys()
    assert any("incomplete" in r.getMessage() for r in caplog.records)
    # A checkpoint whose save found non-finite values (recorded over all processes' shards in its
    # manifest) is not loaded either.
    shutil.copytree(runs / "k2", tmp_path / "nan", ignore=shutil.ignore_patterns("lora"))
    manifest = checkpoint.checkpoint_root(tmp_path / "nan") / "epoch_000002" / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"finite": true', '"finite": false'))
    path, _, _ = checkpoint.load_newest_valid_weights(tmp_path / "nan")
    assert path.name == "epoch_000001"


@pytest.mark.slow
def test_sharded_export_reloads_and_reproduces_the_trained_unet(runs, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from diffloop.config import load_config
    from diffloop.testing.runs import assert_same_unet
    from diffloop.trainer import load_training_policy

    # The run exports its EMA: the weights the offline read of its last checkpoint gives.
    _, ema, name = checkpoint.load_newest_valid_weights(runs / "u2")
    assert name == "dcp (ema)"
    config = load_config(None, tiny_overrides(tiny_sd, runs / "reload", **SHARDED))
    policy = load_training_policy(config, torch.device("cpu"))
    policy.load_trainable_state_dict(ema)
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(runs / "u2" / "lora"))
    assert_same_unet(policy, pipe.unet)


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch`` (a pickle may call anything it names)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_reading_a_sharded_checkpoints_weights_unpickles_nothing_but_metadata(tmp_path):
    # `diffloop sample` / `eval` open no pickle of a checkpoint somebody sent; DCP's .metadata is
    # one, read by an unpickler that builds only DCP's metadata classes.
    import pickle

    path = checkpoint.checkpoint_root(tmp_path) / "epoch_000001"
    (path / "dcp").mkdir(parents=True)
    marker = tmp_path / "code_ran"
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    checkpoint.seal(path, finite=True, sharded={"processes": 2})
    with pytest.raises(checkpoint.CheckpointError, match=r"unreadable \(UnpicklingError"):
        checkpoint.load_weights(path)
    assert not marker.exists()


@pytest.mark.slow
def test_sharded_full_fine_tune_exports_the_whole_pipeline(runs, tiny_sd):
    from diffusers import StableDiffusionPipeline

    def unet(path: Path) -> dict[str, torch.Tensor]:
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
        return StableDiffusionPipeline.from_pretrained(path, **kwargs).unet.state_dict()

    # The main process wrote the pipeline with the UNet gathered from the shards: its EMA, which
    # the offline read of the last checkpoint gives too.
    _, ema, name = checkpoint.load_newest_valid_weights(runs / "full")
    exported, base = unet(runs / "full" / "model"), unet(tiny_sd)
    assert name == "dcp (ema)" and exported.keys() == ema.keys() == base.keys()
    _assert_params(exported, ema, atol=0, what="exported UNet")
    assert max((exported[n] - base[n]).abs().max().item() for n in base) > 1e-3
