"""``diffloop bench``'s command line: arguments, thread counts, variants, tables, the JSON."""

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from diffloop.errors import CommandParser
from diffloop.tools.bench.measure import BenchRun, Deadline, PeakMemory, matmul_flops_per_s
from diffloop.tools.bench.models import (
    DTYPES,
    REFERENCE_SD15_H200,
    SHAPE_DEFAULTS,
    SHAPES,
    VARIANTS,
    shapes_defaults,
)
from diffloop.tools.bench.plan import format_plan
from diffloop.tools.bench.policy_bench import bench_sd


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = CommandParser(
        prog="diffloop bench",
        description="Measure sampling, training and end-to-end throughput on models with random "
        "weights and a real model's shapes (nothing is downloaded), with the code training "
        "uses, and compare it with the hardware's floor (the speed of one large matmul). Reports "
        "medians over --repeats after --warmup untimed runs, and peak memory.",
    )
    p.add_argument(
        "--shape",
        choices=SHAPES,
        default="tiny",
        help="the model's shapes: sd15, sdxl, sd35, flux, flux2, flux2_klein, qwen_image, zimage "
        "(real sizes), shapes "
        "(the shapes-world model), or a tiny test model (default: %(default)s)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="compute dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--sample-batch", type=int, default=None, help="images sampled at once (default: per shape)"
    )
    p.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="samples per gradient pass (default: per shape)",
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps T (default: per shape)")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: 5; shapes: shapes.yaml's)",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="torch CPU thread counts to run the whole bench at, one after another, each "
        "with its own "
        "matmul floor: comma-separated (1,2,4) or 'all' (1 .. the available cores); "
        "default: as set",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs of each item (default: per shape)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default: per shape)"
    )
    p.add_argument(
        "--matmul-n", type=int, default=None, help="side of the square matmul for the floor"
    )
    p.add_argument(
        "--perf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a performance.* option of the trainer (repeatable), e.g. --perf compile=all "
        "--perf channels_last=true",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet activations in backward",
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated named settings run one after another, the first as the baseline of "
        f"the speed-ups (each adds to --perf): {', '.join(VARIANTS)}",
    )
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=None,
        help="skip the remaining items (each keeps what it timed) once exceeded",
    )
    args = p.parse_args(argv)
    defaults = {
        **(shapes_defaults() if args.shape == "shapes" else {}),
        **SHAPE_DEFAULTS[args.shape],
    }
    if args.guidance_scale is None:
        args.guidance_scale = defaults.pop("guidance_scale", 5.0)
    defaults.pop("guidance_scale", None)
    try:
        args.threads = parse_threads(args.threads)
    except ValueError as e:
        p.error(str(e))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    for key in ("sample_batch", "train_batch", "steps", "repeats", "matmul_n"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown or not args.variants:
            p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        args.perf = performance_options(args.perf, args.dtype)
    except ValueError as e:  # ConfigError names the field and the fix
        p.error(str(e))
    return args


def parse_threads(text: str | None, cores: int | None = None) -> list[int] | None:
    """``--threads``: "1,2,4" -> [1, 2, 4]; "all" -> [1, ..., available cores]; None -> None."""
    from diffloop.config import available_cores

    if text is None:
        return None
    if text.strip() == "all":
        return list(range(1, (cores or available_cores()) + 1))
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(
            f"--threads must be 'all' or comma-separated counts >= 1 (e.g. 1,2), got {text!r}"
        )
    return list(dict.fromkeys(counts))  # each count once, in the order given


def performance_options(items: list[str], dtype: str) -> dict[str, Any]:
    """``["compile=all", ...]`` -> validated PerformanceConfig fields (as the trainer checks
    them)."""
    from diffloop.config import load_config

    precision = {"fp32": "no"}.get(dtype, dtype)
    overrides = [f"train.mixed_precision={precision}", *(f"performance.{kv}" for kv in items)]
    return asdict(load_config(None, overrides).performance)


def variant_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """``args`` with variant ``name``'s settings on top (its perf options added to --perf)."""
    spec = VARIANTS[name]
    merged = argparse.Namespace(**vars(args))
    merged.perf = performance_options(
        [f"{k}={v}" for k, v in {**args.perf, **spec.get("perf", {})}.items()], args.dtype
    )
    for key in ("gradient_checkpointing", "sample_batch", "train_batch"):
        if key in spec:
            setattr(merged, key, spec[key])
    return merged


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def format_table(result: dict[str, Any]) -> str:
    """The results as a fixed-width text table (one row per timed item)."""
    head = (
        f"{'item':<16}{'median s':>10}{'s/sample':>10}{'samples/s':>11}{'UNet ev/s':>11}"
        f"{'TFLOP/s':>9}{'of matmul':>10}{'peak MiB':>10}"
    )
    lines = [
        (
            f"diffloop bench: shape={result['settings']['shape']} device={result['device_name']} "
            f"dtype={result['settings']['dtype']} torch={result['torch']} "
            f"diffusers={result['diffusers']}"
        ),
        (
            f"floor: matmul {result['floor']['matmul_tflops_per_s']:.3g} TFLOP/s "
            f"(n={result['settings']['matmul_n']}, {result['torch_threads']} thread(s) "
            "unless per thread count below), "
            f"UNet {result['floor'].get('unet_flop_per_eval', 0) / 1e9:.4g} GFLOP per "
            "eval (batch 1)"
        ),
        head,
        "-" * len(head),
    ]
    for name, it in result["items"].items():
        evals = "-" if it["unet_evals_per_s"] is None else f"{it['unet_evals_per_s']:.4g}"
        mem = "n/a" if it["peak_memory_mib"] is None else f"{it['peak_memory_mib']:.0f}"
        lines.append(
            f"{name:<16}{it['median_s']:>10.4g}{it['per_sample_s']:>10.4g}{it['samples_per_s']:>11.4g}"
            f"{evals:>11}{it['tflops_per_s']:>9.3g}{it['fraction_of_matmul']:>10.2%}{mem:>10}"
        )
    for name, it in result["items"].items():
        lines.append(f"  {name}: {it['what']}")
    lines += [f"note: {n}" for n in result["notes"]]
    lines += [f"skipped: {s}" for s in result["skipped"]]
    speedups = result.get("vs_reference_sd15_h200")
    if speedups:
        parts = [f"{k.removesuffix('_speedup')} {v:.2f}x" for k, v in speedups.items()]
        lines.append(
            f"speed-up over DDPO on one H200: {', '.join(parts)} "
            f"(reference: {REFERENCE_SD15_H200['settings']})"
        )
    return "\n".join(lines)


def run_variants(run: BenchRun) -> None:
    """Each variant on a fresh policy, results under ``out["variants"][name]``; the first variant's
    items are also the top-level ``items``, and each variant gets its speed-ups over it."""
    import gc

    args, device, out = run.args, run.device, run.out
    out["variants"] = {}
    for name in args.variants:
        sub: dict[str, Any] = {"floor": {}, "items": {}, "skipped": [], "notes": []}
        try:
            bench_sd(replace(run, args=variant_args(args, name), out=sub))
        except Exception as e:  # noqa: BLE001 - a failed variant must not lose the others' numbers
            sub["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out["variants"][name] = sub
        out["skipped"] += [f"{name}/{s}" for s in sub["skipped"]]
        gc.collect()
        torch._dynamo.reset()  # compiled graphs of this variant's modules
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = out["variants"][args.variants[0]]
    out["items"] = first["items"]
    out["floor"].update(first["floor"])
    if "memory_plan" in first:
        out["memory_plan"] = first["memory_plan"]
    for sub in out["variants"].values():
        sub["speedup_vs_first"] = {
            k: first["items"][k]["median_s"]
            / it["median_s"]
            * (it["samples"] / first["items"][k]["samples"])
            for k, it in sub["items"].items()
            if k in first["items"]
        }


def format_variants(result: dict[str, Any]) -> str:
    """One row per variant: per-sample cost of each item, speed-up over the first, peak memory
    (measured, and the memory plan's), ratio check."""
    items = ("sample", "train", "end_to_end")
    head = f"{'variant':<18}" + "".join(f"{i + ' s/sample':>20}{'x':>7}" for i in items)
    head += f"{'peak MiB':>10}{'plan MiB':>10}{'logp err':>10}{'compile s':>10}"
    lines = ["", "variants (s/sample and speed-up over the first row):", head, "-" * len(head)]
    for name, sub in result["variants"].items():
        row = f"{name:<18}"
        for i in items:
            it = sub["items"].get(i)
            row += (
                f"{it['per_sample_s']:>20.4g}{sub['speedup_vs_first'][i]:>6.2f}x"
                if it
                else f"{'-':>20}{'-':>7}"
            )
        peaks = [
            it["peak_memory_mib"]
            for it in sub["items"].values()
            if it["peak_memory_mib"] is not None
        ]
        row += f"{max(peaks):>10.0f}" if peaks else f"{'-':>10}"
        planned = sub.get("memory_plan", {}).get("phases", {}).get("peak", {}).get("planned_mib")
        row += f"{planned:>10.0f}" if planned is not None else f"{'-':>10}"  # the plan's peak
        err = sub.get("onpolicy_logprob_err")
        row += f"{err:>10.2g}" if err is not None else f"{'-':>10}"
        compile_s = [it["extra"].get("compile_s", 0.0) for it in sub["items"].values()]
        row += (
            f"{sum(compile_s):>10.3g}" if compile_s else f"{'-':>10}"
        )  # first calls minus steady ones
        lines.append(row + (f"  error: {sub['error']}" if "error" in sub else ""))
    return "\n".join(lines)


def compare_to_reference(items: dict[str, Any]) -> dict[str, float]:
    """Speed-ups over DDPO's H200 numbers (> 1 = faster than the reference), for the items timed."""
    ref = REFERENCE_SD15_H200
    out: dict[str, float] = {}
    if "sample" in items:
        out["sample_speedup"] = items["sample"]["samples_per_s"] / ref["sample_images_per_s"]
    if "train" in items:
        out["train_speedup"] = ref["train_s_per_sample"] / items["train"]["per_sample_s"]
    return out


def _device(name: str) -> torch.device:
    """``--device`` as a torch.device that exists here, else a one-line DiffloopError."""
    from diffloop.errors import DiffloopError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffloopError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffloopError(
            f"--device {name}: no CUDA device here (torch.cuda.is_available() is False)"
        )
    return device


def run_shape(run: BenchRun) -> None:
    """The items of ``args.shape`` (and its ``--variants``) into ``run.out``, at the current thread
    count."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        (run_variants if run.args.variants else bench_sd)(run)


def run_thread_counts(
    args: argparse.Namespace,
    device: torch.device,
    matmul_dtype: torch.dtype,
    deadline: Deadline,
    out: dict[str, Any],
) -> None:
    """The whole bench at each ``--threads`` count, into ``out["threads"][str(n)]``, each with its
    own matmul floor at that count (so each fraction is of the same threads' matmul rate); the first
    count's results are also the top-level ones."""
    out["threads"] = {}
    for n in args.threads:
        torch.set_num_threads(n)
        rate = matmul_flops_per_s(device, matmul_dtype, args.matmul_n)
        sub: dict[str, Any] = {
            "floor": {"matmul_tflops_per_s": rate / 1e12},
            "items": {},
            "skipped": [],
            "notes": [],
        }
        run_shape(BenchRun(args, device, rate, deadline, sub))
        out["threads"][str(n)] = sub
        out["skipped"] += [f"threads={n}/{s}" for s in sub["skipped"]]
    first = out["threads"][str(args.threads[0])]
    out["items"] = first["items"]
    out["floor"].update(first["floor"])
    out["notes"] += first["notes"]
    if "memory_plan" in first:
        out["memory_plan"] = first["memory_plan"]
    if "variants" in first:
        out["variants"] = first["variants"]


def format_threads(result: dict[str, Any]) -> str:
    """One row per thread count: the matmul floor, sampling and training throughput, each as a
    fraction of that floor, and the end-to-end speed-up over the first count."""
    head = (f"{'threads':>7}{'matmul GFLOP/s':>16}{'sample img/s':>14}{'UNet ev/s':>11}"
            f"{'of matmul':>10}{'train smp/s':>13}{'of matmul':>10}{'e2e smp/s':>11}{'e2e x':>7}"
            f"{'logp err':>10}")  # fmt: skip
    lines = [
        "",
        "per thread count (each fraction is of that thread count's own matmul rate):",
        head,
        "-" * len(head),
    ]
    first_e2e = None
    for n, sub in result["threads"].items():
        it = sub["items"]
        row = f"{n:>7}{sub['floor']['matmul_tflops_per_s'] * 1e3:>16.4g}"
        for name, width in (("sample", 14), ("train", 13)):
            if name not in it:
                row += f"{'-':>{width}}" + (f"{'-':>11}" if name == "sample" else "") + f"{'-':>10}"
                continue
            row += f"{it[name]['samples_per_s']:>{width}.4g}"
            if name == "sample":
                row += f"{it[name]['unet_evals_per_s']:>11.4g}"
            row += f"{it[name]['fraction_of_matmul']:>10.2%}"
        e2e = it.get("end_to_end", {}).get("samples_per_s")
        first_e2e = first_e2e or e2e
        row += f"{e2e:>11.4g}{e2e / first_e2e:>6.2f}x" if e2e else f"{'-':>11}{'-':>7}"
        err = sub.get("onpolicy_logprob_err")  # with --variants: each variant's, in its own table
        lines.append(row + (f"{err:>10.2g}" if err is not None else f"{'-':>10}"))
    return "\n".join(lines)


def bench_main(argv: list[str] | None = None) -> int:
    """``diffloop bench``: run the benchmark, print the table, optionally write JSON. Returns 0."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import diffusers

    device = _device(args.device)
    deadline = Deadline(args.time_limit_s)
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict[str, Any] = {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "settings": vars(args).copy(),
        "floor": {"matmul_dtype": str(matmul_dtype)},
        "memory_kind": PeakMemory(device).kind,
        "items": {},
        "notes": [],
        "skipped": [],
    }
    if args.shape == "sd15":
        result["reference_sd15_h200"] = REFERENCE_SD15_H200
    before = torch.get_num_threads()
    try:
        if args.threads:
            run_thread_counts(args, device, matmul_dtype, deadline, result)
        else:
            result["floor"]["matmul_tflops_per_s"] = (
                matmul_flops_per_s(device, matmul_dtype, args.matmul_n) / 1e12
            )
            rate = result["floor"]["matmul_tflops_per_s"] * 1e12
            run_shape(BenchRun(args, device, rate, deadline, result))
    finally:
        torch.set_num_threads(before)
    result["wall_s"] = time.perf_counter() - deadline.start
    if args.shape == "sd15":
        result["vs_reference_sd15_h200"] = compare_to_reference(result["items"])
    print(format_table(result))
    if "memory_plan" in result:
        print(format_plan(result["memory_plan"]))
    if args.threads:
        print(format_threads(result))
        if args.variants:
            for n, sub in result["threads"].items():
                print(f"\nthreads={n}:" + format_variants(sub))
    elif args.variants:
        print(format_variants(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
