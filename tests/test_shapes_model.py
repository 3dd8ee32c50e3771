"""The shapes-world model: tokenizer, save/load, pretraining loss, shipped weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffloop.shapes import model as sm
from diffloop.shapes import pretrain, world

TINY = sm.ShapesModelConfig(
    block_out_channels=(8, 16),
    norm_num_groups=4,
    attention_head_dim=8,
    text_hidden_size=16,
    text_layers=1,
    text_heads=2,
    text_intermediate_size=32,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: these models are so small that per-op overhead dominates, and a second thread
    only adds contention on a shared 2-core machine (measured 3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> dict:
    torch.manual_seed(0)
    return sm.build_components(TINY)


def test_tokenizer_ids_and_autotokenizer_load(tiny: dict, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    sm.save_components(tiny, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    vocab = tok.get_vocab()
    assert [vocab[t] for t in sm.SPECIAL_TOKENS] == [0, 1, 2, 3]
    expected = [2, vocab["a"], vocab["red"], vocab["circle"], 3] + [0] * 11
    assert sm.tokenize(tok, ["a red circle"]).tolist() == [expected]
    assert sm.tokenize(tok, [""]).tolist() == [[2, 3] + [0] * 14]
    assert tok.model_max_length == 16
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4 too


def test_every_caption_fits_without_unknown_words(tiny: dict) -> None:
    splits = world.prompt_splits()
    prompts = sorted({p for v in splits.values() for p in v})
    ids = sm.tokenize(tiny["tokenizer"], prompts)
    longest = max(len(p.split()) for p in prompts)
    assert longest + 2 <= TINY.max_length  # [BOS] words [EOS]: never truncated
    assert not (ids == 1).any()  # no [UNK]
    assert ((ids == 3).sum(dim=1) == 1).all()  # exactly one [EOS] each


def test_save_load_round_trip_is_exact(tiny: dict, tmp_path: Path) -> None:
    sm.save_components(tiny, tmp_path, extra_info={"note": "x"})
    info = json.loads((tmp_path / sm.MODEL_INFO_FILE).read_text())
    assert info["family"] == "shapes" and info["pixel_space"] is True
    assert info["image_size"] == 32 and info["max_length"] == 16 and info["note"] == "x"
    assert not (tmp_path / "vae").exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "text_encoder" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)  # loads in transformers 4 too
    loaded = sm.load_components(tmp_path)
    assert loaded["scheduler"].config.steps_offset == 1
    assert loaded["scheduler"].config.clip_sample is False
    assert loaded["scheduler"].config.set_alpha_to_one is False
    prompts = ["a red circle and a striped blue square", "a cross"]
    images = [
        sm.generate(
            c,
            prompts,
            num_steps=3,
            guidance_scale=3.0,
            eta=1.0,
            generator=torch.Generator().manual_seed(7),
        )
        for c in (tiny, loaded)
    ]
    assert images[0].shape == (2, 3, 32, 32)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)


def test_guidance_with_the_prompt_as_negative_equals_no_guidance(tiny: dict) -> None:
    # eps_u + w (eps_c - eps_u) = eps_c when the negative prompt is the prompt, for any w.
    prompt = "a striped red circle and a blue cross"

    def sample(**kw: object) -> torch.Tensor:
        return sm.generate(
            tiny, [prompt], num_steps=3, eta=1.0, generator=torch.Generator().manual_seed(3), **kw
        )

    guided = sample(guidance_scale=5.0, negative_prompt=prompt)
    torch.testing.assert_close(guided, sample(guidance_scale=1.0), rtol=0, atol=1e-5)
    assert (guided - sample(guidance_scale=5.0)).abs().max() > 1e-3  # the empty negative differs


def test_diffusion_targets_match_diffusers(tiny: dict) -> None:
    sched = tiny["scheduler"]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t, target = pretrain.diffusion_targets(x0, eps, t, sched.alphas_cumprod, "epsilon")
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t), rtol=1e-6, atol=1e-6)
    assert target is eps
    _, v = pretrain.diffusion_targets(x0, eps, t, sched.alphas_cumprod, "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t), rtol=1e-6, atol=1e-6)
    # Hand value: a_bar = 0.25 -> x_t = 0.5 x0 + sqrt(0.75) eps, v = 0.5 eps - sqrt(0.75) x0.
    one = torch.ones(1, 1, 1, 1)
    x_t, v = pretrain.diffusion_targets(
        one, 2 * one, torch.tensor([0]), torch.tensor([0.25]), "v_prediction"
    )
    assert math.isclose(float(x_t), 0.5 + 2 * math.sqrt(0.75), rel_tol=1e-6)
    assert math.isclose(float(v), 1.0 - math.sqrt(0.75), rel_tol=1e-6)


def test_learning_rate_schedule_values() -> None:
    f = pretrain.learning_rate_factor
    assert f(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert f(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert f(60, 10, 110, "cosine") == pytest.approx(0.55)  # halfway: 0.1 + 0.9 / 2
    assert f(110, 10, 110, "cosine") == pytest.approx(0.1)
    assert f(10_000, 10, 110, "cosine") == pytest.approx(0.1)
    assert f(10_000, 10, 110, "constant") == 1.0


def test_ema_update_hand_value() -> None:
    ema, live = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ema.weight.fill_(1.0), live.weight.fill_(3.0)
    pretrain.ema_update(ema, live, decay=0.75)
    assert float(ema.weight.detach()) == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)
    assert pretrain.ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert pretrain.ema_decay_at(10**6, 0.999) == 0.999


def test_rendered_batches_are_seeded(tiny: dict) -> None:
    def first(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(iter(pretrain.RenderedBatches(tiny["tokenizer"], 4, seed, 0.5)))

    (a_img, a_ids), (b_img, b_ids), (c_img, _) = first(3), first(3), first(4)
    assert a_img.shape == (4, 32, 32, 3) and a_img.dtype == torch.uint8 and a_ids.shape == (4, 16)
    assert torch.equal(a_img, b_img) and torch.equal(a_ids, b_ids)
    assert not torch.equal(a_img, c_img)


def test_pretrain_loss_falls_and_writes_snapshots(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Tiny and 16 px: the property (the denoising loss falls) does not need the real size.
    argv = [
        "--output", str(out), "--steps", "30", "--batch-size", "8", "--lr", "5e-3",
        "--warmup-steps", "3", "--device", "cpu", "--seed", "0", "--log-every", "1",
        "--save-every", "15", "--eval-max-prompts", "2", "--eval-steps", "2", "--image-size", "16",
        "--channels", "8,16", "--text-hidden", "16", "--text-layers", "1", "--ema-decay", "0.9",
    ]  # fmt: skip
    assert pretrain.main(argv) == 0
    lines = (out / "train_log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 30
    # An untrained model stays near its initial loss (~1 = E[eps^2] for a near-zero output);
    # measured with this seed: 0.91 -> 0.41 (v-prediction: 0.72 -> 0.40).
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    for snap in ("step_15", "step_30", "final"):
        assert (out / snap / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (out / snap / "text_encoder" / "model.safetensors").is_file()
    record = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 30
    for key in ("binding_val_pair", "binding_train_single", "binding_val_unseen"):
        assert 0.0 <= record[key] <= 1.0
    info = json.loads((out / "final" / sm.MODEL_INFO_FILE).read_text())
    assert info["pretrain"]["step"] == 30 and info["image_size"] == 16


def test_shipped_weights_load_and_generate() -> None:
    components = sm.load_components(sm.SHIPPED_WEIGHTS_DIR)
    size = sum(f.stat().st_size for f in sm.SHIPPED_WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20  # a few MB inside the package
    prompts = ["a red circle", "a striped blue square and a yellow cross"]
    images = sm.generate(
        components,
        prompts,
        num_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.05  # not a constant image
