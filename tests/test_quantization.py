"""A quantized frozen base (``model.quantization``, QLoRA for diffusion), on CPU with torchao's
weight-only int8 (the backend that runs there).

- the config's refusals are one line each (unknown quant_type, LoRA off, a missing package, a
  CUDA-only backend without CUDA, component names the model does not have);
- the listed components load quantized through diffusers' / transformers' ``quantization_config``
  and peft wraps the quantized linear layers; the trainables are the fp32 LoRA weights only;
- sampling and the training recomputation see the same quantized weights: the on-policy ratio is 1
  (tiny SD and tiny FLUX.1);
- training changes only the adapter weights (the quantized ones are bit-identical after it);
- the exported LoRA loads with ``load_lora_weights`` into the unquantized pipeline (its output
  then differs from the trained model's by the quantization error) and, on a pipeline whose
  denoiser is quantized the same way, reproduces the trained model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from diffloop import loops
from diffloop.config import ConfigError, load_config
from diffloop.policies import quantization
from diffloop.preflight import check_before_loading
from diffloop.testing.runs import tiny_overrides, worst_onpolicy_logprob_error
from diffloop.trainer import Trainer

pytest.importorskip("torchao")

TORCHAO = {"model.quantization.backend": "torchao"}
STEPS = 3


def config(model: Path | str, out: Path, **extra):
    return load_config(None, tiny_overrides(model, out, **{"sample.num_steps": STEPS, **extra}))


def refusal(model: Path, out: Path, **extra) -> str:
    """The one-line ConfigError that check-config (and train) gives for the setting."""
    with pytest.raises(ConfigError) as e:
        check_before_loading(config(model, out, **extra))
    message = str(e.value)
    assert "\n" not in message
    return message


def plain(t: torch.Tensor) -> torch.Tensor:
    """A weight as plain numbers (a quantized one dequantized) for comparisons."""
    return t.dequantize() if quantization.is_quantized_tensor(t) else t.detach()


def quantized_linears(module: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and quantization.is_quantized_tensor(m.weight)
    ]


# ------------------------------------------------------------------------------------ config


def test_refuses_a_quant_type_of_another_backend(tiny_sd, tmp_path):
    message = refusal(tiny_sd, tmp_path, **TORCHAO, **{"model.quantization.quant_type": "nf4"})
    assert "model.quantization.quant_type='nf4' is not a torchao type" in message
    assert "int8_weight_only" in message


def test_refuses_torchao_int4_which_peft_cannot_adapt(tiny_sd, tmp_path):
    message = refusal(
        tiny_sd, tmp_path, **TORCHAO, **{"model.quantization.quant_type": "int4_weight_only"}
    )
    assert "int4_weight_only is not supported" in message and "int8_weight_only" in message


def test_refuses_full_fine_tuning_of_a_quantized_base(tiny_sd, tmp_path):
    message = refusal(tiny_sd, tmp_path, **TORCHAO, **{"lora.enabled": False})
    assert "needs lora.enabled=true" in message


def installed(monkeypatch, present: bool, module: str) -> None:
    """``module`` is found (``present``) or not by importlib, the rest as they are."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (find_spec("torch") if present else None) if name == module else find_spec(name, *a)
        ),
    )


def test_refuses_a_backend_that_is_not_installed(tiny_sd, tmp_path, monkeypatch):
    installed(monkeypatch, False, "optimum.quanto")
    message = refusal(tiny_sd, tmp_path, **{"model.quantization.backend": "quanto"})
    assert "needs the optimum.quanto package" in message
    assert "pip install optimum-quanto" in message


def test_refuses_bitsandbytes_without_cuda(tiny_sd, tmp_path, monkeypatch):
    installed(monkeypatch, True, "bitsandbytes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = refusal(tiny_sd, tmp_path, **{"model.quantization.backend": "bitsandbytes"})
    assert "bitsandbytes needs a CUDA device" in message and "backend=torchao" in message


def test_refuses_component_names_the_model_does_not_have(tiny_sd, tmp_path):
    for name in ("vae", "text_encoder_2"):
        extra = {**TORCHAO, "model.quantization.components": f"[{name}]"}
        message = refusal(tiny_sd, tmp_path, **extra)
        assert f"'{name}' is not a quantizable component of a Stable Diffusion" in message
        assert "text encoders: unet, text_encoder" in message
    extra = {**TORCHAO, "model.quantization.components": "[unet, unet]"}
    assert "names a component twice" in refusal(tiny_sd, tmp_path, **extra)


def test_refuses_settings_without_a_backend_and_a_merged_lora(tiny_sd, tmp_path):
    message = refusal(tiny_sd, tmp_path, **{"model.quantization.quant_type": "int8_weight_only"})
    assert "backend=none quantizes nothing" in message
    message = refusal(tiny_sd, tmp_path, **TORCHAO, **{"performance.merge_lora_for_sampling": True})
    assert "merge_lora_for_sampling=true with model.quantization.backend=torchao" in message


def test_check_config_prints_one_line(tiny_sd, tmp_path, capsys):
    from diffloop.cli import main

    overrides = tiny_overrides(tiny_sd, tmp_path, **TORCHAO, **{"lora.enabled": False})
    assert main(["check-config", *overrides]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "lora.enabled=true" in err[0]


def test_bits_per_weight_counts_the_scales():
    bits = quantization.bits_per_weight
    assert bits("torchao") == bits("torchao", "int8_weight_only") == 8 + 40 / 3072
    assert bits("torchao", in_features=64) == 8 + 40 / 64  # an fp32 scale + int8 zero per row
    assert bits("bitsandbytes") == pytest.approx(4.0 + 8 / 64 + 32 / (64 * 256))  # nf4, double q.
    with pytest.raises(ValueError):
        bits("none")


def test_torchao_int8_storage_is_what_bits_per_weight_says():
    """The measured bytes of a torchao int8 weight (values, scales, zero points) against the
    arithmetic of ``bits_per_weight``."""
    from torchao import quantize_
    from torchao.quantization import Int8WeightOnlyConfig

    rows, cols = 64, quantization.ROW_LENGTH
    linear = torch.nn.Linear(cols, rows, bias=False)
    quantize_(linear, Int8WeightOnlyConfig())
    w = linear.weight
    stored = sum(getattr(w, name).nbytes for name in w.__tensor_flatten__()[0])
    bits = quantization.bits_per_weight("torchao", "int8_weight_only", cols)
    assert stored * 8 == pytest.approx(bits * rows * cols)


# ------------------------------------------------------------------------------- the policy


def test_loads_the_listed_components_quantized_and_trains_only_fp32_lora(tiny_sd, tmp_path):
    extra = {**TORCHAO, "model.quantization.components": "[unet, text_encoder]"}
    policy = Trainer(config(tiny_sd, tmp_path, **extra)).policy
    unet_linears = quantized_linears(policy.unet)
    assert unet_linears and quantized_linears(policy.text_encoder)
    assert not quantized_linears(policy.vae)  # never quantized
    adapted = {type(m).__name__ for m in policy.unet.modules() if hasattr(m, "lora_A")}
    assert adapted == {"TorchaoLoraLinear"}  # peft's LoRA layer for torchao weights
    trainables = policy.named_trainable_parameters()
    assert trainables and all("lora_" in n for n in trainables)
    assert all(p.dtype == torch.float32 for p in trainables.values())


def test_the_quantized_base_is_not_the_full_precision_one(tiny_sd, tmp_path):
    """The quantization took effect: the denoiser's output moved, by a quantization-sized
    amount."""
    quantized = Trainer(config(tiny_sd, tmp_path / "q", **TORCHAO)).policy
    full = Trainer(config(tiny_sd, tmp_path / "f")).policy
    x = torch.randn(2, *full.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = full.unet_conditioning(["a cat", "a red ball"])
    with torch.no_grad():
        a = quantized.unet(x, torch.tensor([500, 20]), **cond).sample
        b = full.unet(x, torch.tensor([500, 20]), **cond).sample
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_flux"])
def test_ratio_is_exactly_one_on_policy(model, request, tmp_path):
    components = "[unet]" if model == "tiny_sd" else "[transformer, text_encoder_2]"
    extra = {**TORCHAO, "model.quantization.components": components}
    t = Trainer(config(request.getfixturevalue(model), tmp_path, **extra))
    assert quantized_linears(t.policy.denoiser)
    if model == "tiny_flux":
        assert quantized_linears(t.policy.text_encoder_2)  # T5
    traj = next(
        loops.sample_batches(
            t.policy, ["a cat", "a dog on a bench"] * 2, [0, 1, 2, 3], t.sampler, 4
        )
    )[1]
    assert worst_onpolicy_logprob_error(t, traj, minibatch=2) <= 1e-5


def test_training_changes_only_adapter_weights_and_exports_for_the_full_precision_base(
    tiny_sd, tmp_path, capsys
):
    from diffusers import StableDiffusionPipeline, TorchAoConfig, UNet2DConditionModel
    from safetensors.torch import load_file
    from torchao.quantization import Int8WeightOnlyConfig

    out = tmp_path / "run"
    t = Trainer(config(tiny_sd, out, num_epochs=1, **TORCHAO, **{"train.learning_rate": 0.1}))
    policy = t.policy
    modules = {"unet": policy.unet, "text_encoder": policy.text_encoder, "vae": policy.vae}
    before = {
        (m, n): plain(p).clone() for m, mod in modules.items() for n, p in mod.named_parameters()
    }
    rows = t.train()
    assert t.optimizer_steps >= 1 and all("reward_mean" in r for r in rows)
    header = "frozen base quantized:         torchao int8_weight_only on the denoiser"
    assert header in capsys.readouterr().out
    changed = {
        (m, n)
        for m, mod in modules.items()
        for n, p in mod.named_parameters()
        if not torch.equal(plain(p), before[m, n])
    }
    assert changed and all(m == "unet" and "lora_" in n for m, n in changed), sorted(changed)[:3]

    lora = out / "lora"
    weights = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())  # fp32 deltas
    assert (lora / f"{out.name}.safetensors").is_file()  # the kohya copy
    assert "quantized base" in (lora / "README.md").read_text()

    policy.train(False)
    x = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = policy.unet_conditioning(["a cat", "a red ball"])
    ts = torch.tensor([500, 20])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)  # the unquantized pipeline
    pipe.load_lora_weights(str(lora))
    quantized_unet = UNet2DConditionModel.from_pretrained(
        tiny_sd,
        subfolder="unet",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        torch_dtype=torch.float32,
    )
    on_quantized = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=quantized_unet)
    on_quantized.load_lora_weights(str(lora))
    with torch.no_grad():
        trained = policy.unet(x, ts, **cond).sample
        with policy.reference():
            base = policy.unet(x, ts, **cond).sample
        full = pipe.unet(x, ts, **cond).sample
        same_base = on_quantized.unet(x, ts, **cond).sample
    assert (trained - base).abs().max() > 1e-4, "training did not move the model"
    torch.testing.assert_close(same_base, trained, rtol=1e-4, atol=1e-5)
    # On the full-precision base the LoRA is applied exactly; the output differs from the
    # trained (quantized) model's only by the quantization error.
    assert 0 < (full - trained).abs().max() < 0.05 * trained.abs().max()
