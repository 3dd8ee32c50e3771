"""`diffloop bench` on tiny CPU shapes: FLOP counting, the timed items, the table, the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffloop.tools.bench import (
    BenchRun,
    Deadline,
    bench_main,
    build_components,
    count_flops,
    parse_args,
    run_item,
)

torch.set_num_threads(1)


def test_count_flops_linear_forward_and_backward() -> None:
    # (3, 8) @ (8, 5): 2 * 3 * 8 * 5 = 240 FLOPs; backward adds grad_input and grad_weight, 240
    # each.
    layer = torch.nn.Linear(8, 5)
    x = torch.randn(3, 8, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 240
    assert count_flops(lambda: layer(x).sum().backward()) == 720


def test_count_flops_includes_cpu_attention() -> None:
    # torch's counter has no formula for the CPU SDPA kernel; ours must add Q K^T and A V:
    # 2 * b h s_q d s_k + 2 * b h s_q s_k d_v = 2*2*6*4*5 + 2*2*6*5*3 = 480 + 360 = 840.
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 840


def _manual_unet_flops() -> int:
    """torch's own FlopCounterMode on one batch-1 forward of the bench's tiny policy UNet (same
    seed, same LoRA), with the classic bmm attention processor, which torch counts natively."""
    from diffusers.models.attention_processor import AttnProcessor

    from diffloop.config import LoraConfig
    from diffloop.policies.diffusers_policy import DDIMPolicy

    device = torch.device("cpu")
    policy = DDIMPolicy(
        build_components("tiny", device), LoraConfig(rank=4, alpha=4.0), device=device
    )  # what bench builds
    policy.unet.set_attn_processor(AttnProcessor())
    embeds = policy.encode_prompts(["a photo of a cat"])
    x = torch.zeros(1, *policy.latent_shape())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        policy.unet(x, torch.tensor([500]), encoder_hidden_states=embeds)
    return int(counter.get_total_flops())


def _finite_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_tiny_cpu_writes_json_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--sample-batch",
        "2",
        "--train-batch",
        "1",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--output",
        str(out),
    ]
    assert bench_main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert set(result["items"]) == {"sample", "decode", "train", "end_to_end"}
    assert result["skipped"] == []
    for name, item in result["items"].items():
        for key in (
            "median_s",
            "per_sample_s",
            "samples_per_s",
            "flops",
            "tflops_per_s",
            "fraction_of_matmul",
        ):
            assert _finite_positive(item[key]), (name, key, item[key])
        assert len(item["times_s"]) == 2
        assert item["median_s"] == pytest.approx(sum(item["times_s"]) / 2, rel=1e-12)  # median of 2
        assert item["peak_memory_mib"] >= 0
        assert name in table
    # Sampling: 2 images x 2 steps x 2 (CFG) = 8 UNet evaluations per timed call.
    sample = result["items"]["sample"]
    assert sample["unet_evals_per_s"] == pytest.approx(8 / sample["median_s"], rel=1e-12)
    # The counted sampling FLOPs are the 8 UNet evaluations plus text encoding and VAE decoding.
    unet_flops = 8 * result["floor"]["unet_flop_per_eval"]
    decode_flops = result["items"]["decode"]["flops"]
    assert unet_flops + decode_flops < sample["flops"] < 1.05 * (unet_flops + decode_flops)
    # Training on 1 sample: 2 steps x 2 (CFG) UNet evaluations, forward and backward. Frozen base
    # weights need only input gradients (about one more forward; LoRA's weight grads are tiny), so
    # ~2x.
    train, e2e = result["items"]["train"], result["items"]["end_to_end"]
    assert 1.8 < train["flops"] / (4 * result["floor"]["unet_flop_per_eval"]) < 2.2
    # End to end = sampling 2 + training 2 samples (training FLOPs per sample are
    # batch-independent).
    assert e2e["flops"] == pytest.approx(sample["flops"] + 2 * train["flops"], rel=1e-12)
    assert _finite_positive(result["floor"]["matmul_tflops_per_s"])
    assert result["settings"]["steps"] == 2 and result["settings"]["train_batch"] == 1
    assert result["torch"] == torch.__version__ and result["device_name"]
    assert result["floor"]["unet_flop_per_eval"] == _manual_unet_flops()
    assert "median s" in table and "of matmul" in table


def test_bench_tiny_xl_runs_the_sdxl_policy(tmp_path: Path) -> None:
    """--shape sdxl / tiny_xl time the whole SDXL policy (sampling, training, end to end), with the
    UNet FLOPs counted with its added conditioning and the on-policy check of the trained steps."""
    out = tmp_path / "bench_xl.json"
    argv = ["--shape", "tiny_xl", "--device", "cpu", "--steps", "2", "--sample-batch", "1",
            "--train-batch", "1", "--repeats", "1", "--warmup", "0", "--output",
            str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["items"]) == {"sample", "decode", "train", "end_to_end"}
    sample = result["items"]["sample"]
    # 1 image x 2 steps x 2 (CFG) UNet evaluations per timed call.
    assert sample["unet_evals_per_s"] == pytest.approx(4 / sample["median_s"], rel=1e-12)
    assert _finite_positive(result["floor"]["unet_flop_per_eval"])
    # Forward + backward of 2 steps x 2 (CFG): 2x a forward for input gradients, up to 3x here
    # because the tiny SDXL's rank-4 LoRA is as wide as its 2- and 4-channel layers.
    assert (
        1.8 < result["items"]["train"]["flops"] / (4 * result["floor"]["unet_flop_per_eval"]) < 3.2
    )


def test_bench_tiny_flux_counts_one_evaluation_per_step(tmp_path: Path) -> None:
    """FLUX.1-dev is guidance-distilled: the guidance is a model input, so the bench counts one
    transformer evaluation per sample and step (``policy.evaluations_per_step``), not CFG's two."""
    out = tmp_path / "bench_flux.json"
    argv = ["--shape", "tiny_flux", "--device", "cpu", "--steps", "2", "--sample-batch", "1",
            "--train-batch", "1", "--repeats", "1", "--warmup", "0", "--guidance-scale", "3.5",
            "--output", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    sample = json.loads(out.read_text())["items"]["sample"]
    assert sample["unet_evals_per_s"] == pytest.approx(1 * 2 * 1 / sample["median_s"], rel=1e-12)


def test_bench_time_limit_skips_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert (
        bench_main(
            ["--shape", "tiny", "--device", "cpu", "--time-limit-s", "0", "--output", str(out)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["items"] == {}
    assert [s.split(":")[0] for s in result["skipped"]] == [
        "sample",
        "decode",
        "train",
        "end_to_end",
    ]
    assert "skipped: sample" in capsys.readouterr().out


def test_bench_rejects_bad_settings() -> None:
    with pytest.raises(SystemExit):
        bench_main(["--shape", "tiny", "--steps", "0"])


def test_run_item_records_out_of_memory_and_goes_on() -> None:
    args = parse_args(["--shape", "tiny", "--device", "cpu", "--repeats", "3"])
    out: dict = {"items": {}, "skipped": []}
    run = BenchRun(args, torch.device("cpu"), 1e9, Deadline(None), out)

    def oom() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run_item(run, "big", oom, 4, lambda: 1.0, None, "too big") is None
    done = run_item(run, "small", lambda: None, 4, lambda: 2e6, 8, "fits")
    assert out["skipped"] == ["big: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"]
    assert list(out["items"]) == ["small"] and len(done.times_s) == 3
    assert done.per_sample_s == pytest.approx(done.median_s / 4, rel=1e-12)
    assert done.fraction_of_matmul == pytest.approx(2e6 / done.median_s / 1e9, rel=1e-12)


def test_bench_variants_run_the_trainer_options_and_check_the_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "variants.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--variants", "eager,channels_last,low_memory",
            "--perf", "attention=eager", "--output", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert list(variants) == ["eager", "channels_last", "low_memory"]
    # --perf applies to every variant; each variant adds its own options on top.
    assert all(v["options"]["performance"]["attention"] == "eager" for v in variants.values())
    assert variants["channels_last"]["options"]["performance"]["channels_last"] is True
    low = variants["low_memory"]["options"]
    assert (low["train_batch"], low["sample_batch"], low["gradient_checkpointing"]) == (1, 4, True)
    assert low["performance"]["decode_batch_size"] == 1
    # The baseline's items are the top-level items; its speed-ups over itself are 1.
    assert result["items"] == variants["eager"]["items"]
    assert variants["eager"]["speedup_vs_first"] == {k: 1.0 for k in variants["eager"]["items"]}
    # Per-sample speed-up: the low-memory variant samples 4 per call where the baseline samples 2.
    s0, s2 = variants["eager"]["items"]["sample"], variants["low_memory"]["items"]["sample"]
    assert variants["low_memory"]["speedup_vs_first"]["sample"] == pytest.approx(
        s0["per_sample_s"] / s2["per_sample_s"], rel=1e-9
    )
    # The correctness check ran for every variant, on the training path: ratio 1.
    assert all(v["onpolicy_logprob_err"] < 1e-5 for v in variants.values())
    table = capsys.readouterr().out
    assert "low_memory" in table and "logp err" in table


def test_bench_rejects_bad_performance_options() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--shape", "tiny", "--perf", "compile=everything"])
    with pytest.raises(SystemExit):  # merged LoRA is refused in bf16, as the trainer refuses it
        parse_args(["--shape", "tiny", "--dtype", "bf16", "--perf", "merge_lora_for_sampling=true"])
    with pytest.raises(SystemExit):
        parse_args(["--shape", "tiny", "--variants", "eager,warp_speed"])
    assert parse_args(
        ["--shape", "tiny", "--dtype", "fp32", "--perf", "merge_lora_for_sampling=true"]
    ).perf["merge_lora_for_sampling"]


def test_bench_shapes_per_thread_count_through_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`diffloop bench --shape shapes`: the shipped model through the real policy and loops, at
    each --threads count with that count's own matmul floor; the defaults are shapes.yaml's."""
    from diffloop.config import DEFAULT_CONFIG, load_config, packaged_config
    from diffloop.tools.bench import shapes_defaults

    c = load_config(packaged_config(DEFAULT_CONFIG))
    args = parse_args(["--shape", "shapes"])
    assert (args.sample_batch, args.train_batch, args.steps, args.guidance_scale) == (
        c.sample.batch_size,
        c.train.batch_size,
        c.sample.num_steps,
        c.sample.guidance_scale,
    )
    assert shapes_defaults()["steps"] == c.sample.num_steps
    out = tmp_path / "shapes.json"
    argv = [
        "--shape",
        "shapes",
        "--device",
        "cpu",
        "--threads",
        "1,1",
        "--steps",
        "2",
        "--sample-batch",
        "2",
        "--train-batch",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--matmul-n",
        "128",
        "--output",
        str(out),
    ]
    before = torch.get_num_threads()
    assert bench_main(argv) == 0
    assert torch.get_num_threads() == before  # the bench restores the process's thread count
    result = json.loads(out.read_text())
    assert list(result["threads"]) == ["1"]  # each count once
    sub = result["threads"]["1"]
    assert set(sub["items"]) == {"sample", "train", "end_to_end"}  # pixel space: no decode
    assert result["items"] == sub["items"]
    # FLOPs per evaluation: the shapes UNet (about 0.2 GFLOP), counted on the policy's own UNet
    assert 5e7 < result["floor"]["unet_flop_per_eval"] < 1e9
    sample = sub["items"]["sample"]
    assert sample["unet_evals_per_s"] == pytest.approx(2 * 2 * 2 / sample["median_s"], rel=1e-12)
    rate = sub["floor"]["matmul_tflops_per_s"] * 1e12
    assert sample["fraction_of_matmul"] == pytest.approx(
        sample["flops"] / sample["median_s"] / rate, rel=1e-9
    )
    assert sub["onpolicy_logprob_err"] < 1e-5  # the ratio check ran on the shapes policy
    table = capsys.readouterr().out
    assert "per thread count" in table and "GFLOP per eval" in table


def test_parse_threads() -> None:
    from diffloop.tools.bench import parse_threads

    assert parse_threads(None) is None
    assert parse_threads("1,2, 4") == [1, 2, 4]
    assert parse_threads("2,1,2") == [2, 1]
    assert parse_threads("all", cores=3) == [1, 2, 3]
    for bad in ("0", "two", ""):
        with pytest.raises(ValueError, match="--threads"):
            parse_threads(bad)
    with pytest.raises(SystemExit):
        parse_args(["--shape", "shapes", "--threads", "0"])


def test_bench_records_the_memory_plan_of_its_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each phase's planned peak is diffloop.memory's plan of the equivalent training config (the
    bench's own tiny model saved as a pipeline directory, the run's overrides); on CPU nothing is
    measured in max_memory_allocated's units, so measured and the ratio are null."""
    from diffloop.config import load_config
    from diffloop.memory import memory_plan
    from diffloop.testing.tiny import PROMPT_WORDS, make_tiny_sd, make_word_tokenizer

    out = tmp_path / "plan.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--steps", "2", "--sample-batch", "2",
            "--train-batch", "1", "--repeats", "1", "--warmup", "0", "--gradient-checkpointing",
            "--output", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    section = json.loads(out.read_text())["memory_plan"]
    model = make_tiny_sd(tmp_path / "model", tokenizer=make_word_tokenizer(PROMPT_WORDS))
    overrides = [f"model.pretrained={model}", *section["config_overrides"]]
    plan = memory_plan(load_config(None, overrides))
    s = plan.settings  # the overrides carry the run's own setting
    assert (s.sample_batch, s.train_batch, s.lora_rank, s.mixed_precision) == (2, 1, 4, "no")
    assert s.gradient_checkpointing and s.guidance_scale == 5.0 and s.resolution == 32
    expected = {
        "sampling": plan.resident + plan.phase_bytes("sampling"),
        "training": plan.resident + plan.phase_bytes("training"),
        "peak": plan.peak,
    }
    assert not plan.unknown and section["unknown"] == []
    for phase, planned in expected.items():
        row = section["phases"][phase]
        assert planned > 0 and row["planned_mib"] == pytest.approx(planned / 2**20, rel=1e-12)
        assert row["measured_mib"] is None and row["measured_over_planned"] is None
    assert [(t["name"], t["bytes"], t["phase"]) for t in section["terms"]] == [
        (t.name, t.bytes, t.phase) for t in plan.terms
    ]
    table = capsys.readouterr().out
    assert "memory plan vs measured" in table and "reward model" in table


def test_plan_vs_measured_ratio_on_cuda_items() -> None:
    """With CUDA peaks, measured is the item's max_memory_allocated and the ratio measured /
    planned; an item that did not run (skipped) leaves its phase unmeasured."""
    from types import SimpleNamespace

    from diffloop.tools.bench.plan import plan_vs_measured
    from diffloop.tools.bench.policy_bench import policy_parts

    args = parse_args(["--shape", "tiny", "--device", "cpu", "--sample-batch", "2"])
    policy = SimpleNamespace(image_size=lambda: 32)
    items = {"sample": {"peak_memory_mib": 30.0}, "train": {"peak_memory_mib": 45.0}}
    section = plan_vs_measured(args, policy, items, torch.device("cuda"), policy_parts)
    for phase, measured in (("sampling", 30.0), ("training", 45.0)):
        row = section["phases"][phase]
        assert row["measured_mib"] == measured
        assert row["measured_over_planned"] == pytest.approx(measured / row["planned_mib"])
    assert section["phases"]["peak"]["measured_mib"] is None  # end_to_end did not run
    assert section["phases"]["peak"]["planned_mib"] == max(
        section["phases"][p]["planned_mib"] for p in ("sampling", "training")
    )
