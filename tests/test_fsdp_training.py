"""Sharded training (fsdp.enabled, FSDP2 ``fully_shard`` over gloo on CPU): two processes, and two
"nodes" of one process meeting through torchrun's rendezvous on 127.0.0.1, end with the parameters
of the single unsharded process; gradients are reduced once per optimizer step.

Tolerance of "equal": the sharded run reduce-scatters (sums, then divides by 2) each rank's
accumulated gradient, the single process sums every backward into one buffer: the same terms added
in another order, so the gradients agree to float32 rounding (~1e-7 relative), which Adam's
per-element normalisation turns into up to ~1e-6 of parameter movement per step for elements whose
gradient is near 0. A missed or doubled reduction, or a rank training on its own gradient, moves
parameters by ~lr (1e-2 / 1e-3 here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffloop.config import ConfigError, load_config
from diffloop.run_dir import read_metrics
from diffloop.testing.processes import free_port, launch, launch_nodes
from diffloop.testing.runs import RANK_PARAMETERS, tiny_overrides
from diffloop.trainer import Trainer

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
RUN_SEPARATOR = "---"  # fsdp_worker.RUN_SEPARATOR

# 2 prompts x 2 samples; each process samples its 2 in one batch, as the single process samples
# each of its 2 batches (same batch mates, so the same floats); minibatches of 1, every stored
# step trained: an optimizer step is 2 minibatches x S backwards per process (one reduction).
COMMON = {
    "num_epochs": 2,
    "sample.prompts_per_epoch": 2,
    "sample.samples_per_prompt": 2,
    "sample.batch_size": 2,
    "train.batch_size": 1,
    "train.gradient_checkpointing": True,
}
PER_PROCESS_ACCUMULATION = 2
# bf16: the first step is bit-equal (same bf16 roundings on both sides); after it the fp32
# masters differ by float32 noise, which can flip a weight's bf16 rounding (one bf16 step is 0.4%
# relative), so the second step differs by more: 9.4e-5 measured, against ~lr = 1e-2 for a wrong
# reduction.
BF16_ATOL = 5e-4

SD_LORA = {
    **COMMON,
    "train.log_kl_to_base": True,  # the reference (adapters off) runs through the sharded model
    "eval.prompts": "ddpo/simple_animals",  # so does the held-out evaluation, split over ranks
    "eval.num_prompts": 2,
    "eval.samples_per_prompt": 1,
    "eval.batch_size": 1,
    "eval.every_n_epochs": 1,
    "train.ema_decay": 0.9,  # an EMA of the shards, swapped into the sharded model to evaluate
}
# keeping the gathered blocks from the forward to the backward (fewer all-gathers) changes nothing
SD_FULL = {**COMMON, "lora.enabled": False, "train.learning_rate": 1e-3,
           "fsdp.reshard_after_forward": False}  # fmt: skip
SD3_FULL = {**COMMON, "lora.enabled": False, "train.learning_rate": 1e-3, "sample.num_steps": 3}
# bf16: FSDP computes in bf16, reduces in fp32, keeps fp32 trainables; each process trains its 2
# samples as one minibatch, the batch they were sampled in (bf16 rounding depends on the batch).
SD3_LORA_BF16 = {**COMMON, "sample.num_steps": 3, "train.mixed_precision": "bf16",
                 "train.batch_size": 2}  # fmt: skip


def sharded_overrides(
    model: Path, out: Path, settings: dict, accumulation: int = PER_PROCESS_ACCUMULATION
) -> list[str]:
    return tiny_overrides(
        model, out, **settings, **{"fsdp.enabled": True,
                                   "train.gradient_accumulation_steps": accumulation},
    )  # fmt: skip


def one_unsharded_process(
    model: Path, out: Path, settings: dict, per_process: int = PER_PROCESS_ACCUMULATION
) -> dict[str, torch.Tensor]:
    """The single-process, unsharded run (in this process), accumulating both ranks' minibatches
    (``per_process`` each) into a step; its trainable parameters."""
    accumulation = 2 * per_process
    config = load_config(
        None, tiny_overrides(model, out, **settings, **{"train.gradient_accumulation_steps":
                                                       accumulation})
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    return trainer.policy.trainable_state_dict()


def check_sharded_equals_one(
    out: Path,
    one: dict[str, torch.Tensor],
    steps: int,
    backwards_per_step: int,
    atol: float,
) -> list[dict]:
    """Both ranks hold the single process's parameters (within ``atol``), reduced exactly once
    per optimizer step, on its last backward, and half of the denoiser each; on-policy ratio 1;
    grad_norm of the whole gradient."""
    ranks = [load_file(str(out / RANK_PARAMETERS.format(rank=r))) for r in (0, 1)]
    assert ranks[0].keys() == one.keys() and len(one) > 0
    for name, expected in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks diverged on {name}"
        torch.testing.assert_close(ranks[0][name], expected, rtol=0, atol=atol, msg=name)
    for r in (0, 1):
        record = json.loads((out / f"reductions_rank{r}.json").read_text())
        # every optimizer step follows 2 minibatches x the trained timesteps backwards...
        assert record["steps_after"] == [backwards_per_step * (i + 1) for i in range(steps)]
        # ... and gradients were reduce-scattered in those backwards only (one reduce-scatter per
        # sharded unit holding trainable parameters), never in the others.
        assert sorted(set(record["reduced_in"])) == record["steps_after"], record
        # each process holds half of the denoiser (+ the padding of odd first dimensions), the
        # frozen base of a LoRA included
        assert 0.45 < record["held_fraction"] < 0.55 and record["frozen_sharded"], record
    # the training epochs' rows (an evaluation of the base model logs a row of epoch -1)
    sharded, single = (
        [r for r in read_metrics(run / "metrics.jsonl") if r["epoch"] >= 0]
        for run in (out, out.parent / "one")
    )
    assert len(sharded) == steps  # one optimizer step per epoch
    for a, b in zip(sharded, single, strict=True):
        assert a["onpolicy_logprob_err"] < 1e-4  # the sampler and training agree: ratio 1
        if "grad_norm" in a:  # the norm of the whole averaged gradient, not of one shard
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    return sharded


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tiny_sd, tmp_path):
    """tiny SD: LoRA (frozen base sharded too) with KL-to-base logging and a held-out evaluation,
    then full fine-tuning of the UNet (blocks not resharded after the forward); gradient
    checkpointing on; one torchrun launch."""
    runs = {"lora": SD_LORA, "full": SD_FULL}
    overrides: list[str] = []
    for name, settings in runs.items():
        if overrides:
            overrides.append(RUN_SEPARATOR)
        overrides += sharded_overrides(tiny_sd, tmp_path / name / "two", settings)
    launch(WORKER, 2, overrides)
    for name, settings in runs.items():
        one = one_unsharded_process(tiny_sd, tmp_path / name / "one", settings)
        # 2 minibatches x 4 trained timesteps (4 DDIM steps) per optimizer step
        rows = check_sharded_equals_one(tmp_path / name / "two", one, 2, 8, atol=2e-5)
        if name == "lora":  # the EMA weights, evaluated sharded, score as the single process's
            single = read_metrics(tmp_path / name / "one" / "metrics.jsonl")
            assert all("kl_to_base" in r and "eval_reward_mean" in r for r in rows)
            evals = [r["eval_reward_mean"] for r in single if "eval_reward_mean" in r]
            sharded = [r["eval_reward_mean"] for r in read_metrics(
                tmp_path / name / "two" / "metrics.jsonl") if "eval_reward_mean" in r]  # fmt: skip
            assert len(evals) == 3 and sharded == pytest.approx(evals, rel=1e-5)
    # LoRA: a frozen base, so the trainables are only the adapter's
    assert all("lora_" in n for n in load_file(str(tmp_path / "lora" / "two" /
                                                   RANK_PARAMETERS.format(rank=0))))  # fmt: skip


@pytest.mark.slow
def test_fsdp_two_nodes_match_one_process(tiny_sd3, tmp_path):
    """Two "nodes" x 1 process (torchrun --nnodes=2, c10d rendezvous on 127.0.0.1), gradient
    checkpointing on: full fine-tuning of a flow transformer (SD3), then LoRA in bf16; each ends
    with the single process's parameters."""
    full, bf16 = tmp_path / "full" / "two", tmp_path / "bf16" / "two"
    overrides = [*sharded_overrides(tiny_sd3, full, SD3_FULL), RUN_SEPARATOR,
                 *sharded_overrides(tiny_sd3, bf16, SD3_LORA_BF16, accumulation=1)]  # fmt: skip
    launch_nodes(WORKER, 2, overrides, port=free_port())
    one = one_unsharded_process(tiny_sd3, tmp_path / "full" / "one", SD3_FULL)
    # 2 minibatches x 2 trained timesteps (3 flow steps store 2) per optimizer step
    check_sharded_equals_one(full, one, 2, 4, atol=2e-5)
    one = one_unsharded_process(tiny_sd3, tmp_path / "bf16" / "one", SD3_LORA_BF16, per_process=1)
    # 1 minibatch x 2 trained timesteps per optimizer step
    check_sharded_equals_one(bf16, one, 2, 2, atol=BF16_ATOL)
    trained = load_file(str(bf16 / RANK_PARAMETERS.format(rank=0)))
    assert all(v.dtype == torch.float32 for v in trained.values())  # fp32 masters


def test_train_command_frees_the_sharded_model_and_leaves_the_process_group(
    tiny_sd, tmp_path, monkeypatch
):
    """After a successful ``diffloop train`` the sharded denoiser is already freed and the process
    group destroyed: left to interpreter shutdown, gloo's worker threads release tensors while
    Python tears down and the process aborts ("terminate called without an active exception"),
    failing a launch whose training had finished."""
    import gc
    import weakref

    import torch.distributed as dist

    from diffloop.cli import main
    from diffloop.distributed import Distributed

    sharded = []
    shard_policy = Distributed.shard_policy

    def remembered(self, policy, *args, **kwargs):
        shard_policy(self, policy, *args, **kwargs)
        sharded.append(weakref.ref(policy.denoiser))

    monkeypatch.setattr(Distributed, "shard_policy", remembered)
    gc.disable()  # the command must collect the trainer's reference cycles itself
    try:
        status = main(["train", *tiny_overrides(tiny_sd, tmp_path / "run", **{"fsdp.enabled": True,
                                                "num_epochs": 1})])  # fmt: skip
        assert status == 0 and len(sharded) == 1
        assert sharded[0]() is None, "the sharded denoiser outlived the train command"
        assert not dist.is_initialized()
    finally:
        gc.enable()


# ------------------------------------------------------------------ without a process group


def test_accelerate_fsdp_launch_needs_fsdp_enabled_and_deepspeed_is_refused():
    from diffloop.distributed import ShardingNotSupported, refuse_sharding

    fsdp = {"ACCELERATE_USE_FSDP": "true"}
    with pytest.raises(ShardingNotSupported, match=r"set fsdp.enabled=true") as e:
        refuse_sharding(fsdp)
    assert "\n" not in str(e.value)
    refuse_sharding(fsdp, fsdp_enabled=True)  # diffloop shards itself: accepted
    refuse_sharding({}, fsdp_enabled=True)
    with pytest.raises(ShardingNotSupported, match="DeepSpeed"):
        refuse_sharding({"ACCELERATE_USE_DEEPSPEED": "true"}, fsdp_enabled=True)


def test_accelerator_never_sees_accelerate_fsdp_variables(monkeypatch):
    """accelerate's own FSDP plugin would wrap the model a second time: its variables are hidden
    while the Accelerator is built, and restored afterwards."""
    import os

    from diffloop import distributed

    seen = {}

    class Recording:
        def __init__(self, cpu: bool = False) -> None:
            seen["fsdp"] = os.environ.get("ACCELERATE_USE_FSDP")
            self.device, self.process_index, self.num_processes = torch.device("cpu"), 0, 1
            self.is_main_process = True

    monkeypatch.setattr(distributed, "Accelerator", Recording)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    d = distributed.Distributed(fsdp_enabled=True)
    assert seen == {"fsdp": None} and os.environ["ACCELERATE_USE_FSDP"] == "true"
    assert not d.sharded


def test_denoiser_blocks_are_the_outermost_no_split_modules(tiny_sd, tiny_sd3):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from diffloop.distributed import denoiser_blocks
    from diffloop.policies.lora import add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    blocks = denoiser_blocks(unet)
    names = set(unet._no_split_modules)
    assert blocks and all(type(b).__name__ in names for b in blocks)
    for b in blocks:  # none inside another: nested units would be sharded twice
        assert not any(b is not o and any(m is b for m in o.modules()) for o in blocks)
    # every module of a listed class is in some block
    covered = {id(m) for b in blocks for m in b.modules()}
    assert all(id(m) in covered for m in unet.modules() if type(m).__name__ in names)
    from diffloop.config import LoraConfig

    add_lora(unet, LoraConfig(rank=2))
    lora = {id(p) for n, p in unet.named_parameters() if "lora_" in n}
    in_blocks = {id(p) for b in denoiser_blocks(unet) for p in b.parameters()}
    assert lora and lora <= in_blocks  # peft's layers sit inside the blocks they adapt
    sd3 = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer")
    assert denoiser_blocks(sd3) == list(sd3.transformer_blocks)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.mixed_precision=fp16", "train.mixed_precision"),
        ("performance.merge_lora_for_sampling=true", "performance.merge_lora_for_sampling"),
        ("performance.compile=sampling", "performance.compile"),
        ("eval.num_prompts=3", "eval.num_prompts"),
    ],
)
def test_fsdp_refuses_what_does_not_compose(override, field):
    from diffloop.config import validate

    base = ["fsdp.enabled=true", "eval.samples_per_prompt=1", "sample.prompts_per_epoch=2",
            "sample.samples_per_prompt=4", "train.batch_size=2"]  # fmt: skip
    validate(load_config(None, base), num_processes=2)  # the base composes
    with pytest.raises(ConfigError, match=field) as e:
        validate(load_config(None, [*base, override]), num_processes=2)
    assert "fsdp.enabled" in str(e.value) and "\n" not in str(e.value)


def test_fsdp_refuses_the_8bit_optimizer(monkeypatch):
    from diffloop.config import validation

    monkeypatch.setattr(validation, "_validate_optimizer", lambda config: None)  # no bnb/CUDA here
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit"):
        load_config(None, ["fsdp.enabled=true", "train.optimizer=adamw_8bit"])


def test_gradient_sync_only_on_the_last_backward_of_a_step():
    """minibatch_backward tells the sync switch, before each backward, whether it ends the step."""
    from diffloop import loops

    calls: list[bool] = []

    class Policy:
        logprob_reduction = "mean"

    def fake_step_loss(policy, batch, adv, step, sampler, loss, *, on_policy):
        return torch.zeros((), requires_grad=True), {}

    original = loops.step_loss
    loops.step_loss = fake_step_loss
    try:
        for ends_step in (False, True):
            list(loops.minibatch_backward(
                Policy(), None, None, torch.zeros(2, 3, dtype=torch.long), None, None, scale=1.0,
                on_policy=True, backward=lambda loss: None, gradient_sync=calls.append,
                ends_step=ends_step,
            ))  # fmt: skip
    finally:
        loops.step_loss = original
    assert calls == [False, False, False, False, False, True]


def test_clip_grad_norm_equals_torch_on_plain_tensors():
    from diffloop.optimization import clip_grad_norm

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    b[1].grad = None  # a parameter without a gradient is skipped by both
    a[1].grad = None
    norm = clip_grad_norm(a, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert torch.equal(norm, expected)
    for p, q in zip(a, b):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
