"""Prompt embeddings (``diffloop.policies.embedding_cache``): each distinct prompt encoded once
(alone, so no embedding depends on its batch), kept in CPU memory, optionally precomputed with the
text encoders then freed (``prompts.precompute_embeddings``), optionally on disk
(``prompts.embedding_cache_dir``, keyed by the encoders' identity), and the encoders' placement
(``model.text_encoder_device``). Runs are in-process on tiny random-weight models."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from diffloop.config import ConfigError, LoraConfig, ModelConfig, load_config
from diffloop.policies import embedding_cache as ec
from diffloop.policies.diffusers_policy import DDIMPolicy
from diffloop.policies.families import load_policy
from diffloop.policies.sd3 import SD3Policy
from diffloop.run_dir import read_metrics
from diffloop.testing.runs import comparable, killed_at_epoch, run, tiny_overrides
from diffloop.trainer import Trainer

CPU = torch.device("cpu")
POLICY_CLASS = {"tiny_sd": DDIMPolicy, "tiny_sd3": SD3Policy}
RUN = {"num_epochs": 2, "sample.num_steps": 3, "checkpoint_every": 1}


def recording_encodes(monkeypatch, cls: type) -> list[str]:
    """Every prompt ``cls.encode_uncached`` encodes, in order (the text encoders' work)."""
    seen: list[str] = []
    original = cls.encode_uncached

    def encode(self, prompts):
        seen.extend(prompts)
        return original(self, prompts)

    monkeypatch.setattr(cls, "encode_uncached", encode)
    return seen


def eval_file(tmp_path: Path) -> dict[str, str]:
    """Evaluation on two prompts of a file, one of them also a training prompt."""
    path = tmp_path / "eval.txt"
    path.write_text("a red ball\na blue cube\n")
    return {"eval.prompts": "file", "eval.path": str(path), "eval.num_prompts": "2",
            "eval.samples_per_prompt": "1", "eval.every_n_epochs": "0"}  # fmt: skip


# ------------------------------------------------------------------ runs: cached = uncached


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sd3"])
def test_cached_uncached_and_precomputed_runs_give_identical_metrics(
    model, request, tmp_path, monkeypatch
):
    """The in-memory cache encodes each distinct prompt once; without it every sampling call
    encodes again; with precompute the encoders are freed after one pass. The three runs' metrics
    (training and evaluation) are the same bits."""
    model_dir = request.getfixturevalue(model)
    settings = {**RUN, **eval_file(tmp_path)}
    seen = recording_encodes(monkeypatch, POLICY_CLASS[model])
    cached = run(model_dir, tmp_path / "cached", **settings)
    assert len(seen) == len(set(seen))  # each distinct prompt encoded once
    with monkeypatch.context() as m:  # uncached: every use forgets what it encoded
        m.setattr(ec.EmbeddingCache, "forget_unless_kept", lambda self: self.rows.clear())
        seen.clear()
        uncached = run(model_dir, tmp_path / "uncached", **settings)
        assert len(seen) > len(set(seen))
    seen.clear()
    pre = {**settings, "prompts.precompute_embeddings": True}
    trainer = Trainer(load_config(None, tiny_overrides(model_dir, tmp_path / "pre", **pre)))
    policy = trainer.policy
    assert policy.text_encoders() == [] and policy.text_encoder is None  # freed (LoRA: deleted)
    n_before = len(seen)
    precomputed = trainer.train()
    assert len(seen) == n_before  # nothing encoded after the precompute
    assert comparable(cached) == comparable(uncached) == comparable(precomputed)


def test_precompute_keeps_full_fine_tuning_encoders_off_the_device_and_refuses_new_prompts(
    tiny_sd, tmp_path
):
    config = load_config(None, tiny_overrides(tiny_sd, tmp_path / "full", **{
        **RUN, "lora.enabled": False, "prompts.precompute_embeddings": True}))  # fmt: skip
    trainer = Trainer(config)
    policy = trainer.policy
    # the full export writes the text encoder: kept, in CPU memory
    assert policy.text_encoder is not None and policy.text_encoder.device.type == "cpu"
    with pytest.raises(ec.EmbeddingCacheMissError, match="prompts.precompute_embeddings=true"):
        policy.conditioning(["a prompt nobody drew"], "")
    trainer.close()


# ------------------------------------------------------------------ disk cache


def test_a_resumed_run_reads_the_disk_cache_and_encodes_nothing(
    tiny_sd, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "embeddings"
    settings = {**RUN, "prompts.embedding_cache_dir": str(cache)}
    seen = recording_encodes(monkeypatch, DDIMPolicy)
    full = run(tiny_sd, tmp_path / "full", **settings)
    distinct = len(set(seen))
    assert distinct == 4  # the three prompts and the negative prompt ""
    assert len(list(cache.glob("*/*.safetensors"))) == distinct
    assert not list(cache.glob("*/.*"))  # written aside, renamed: nothing left half-written
    assert f"0 read from the disk cache ({next(cache.iterdir())}), 4 encoded, 4 written" in (
        capsys.readouterr().out
    )
    out = tmp_path / "resumed"
    with killed_at_epoch(1):
        run(tiny_sd, out, **RUN)  # without the disk cache: a resume may add it
    seen.clear()
    run(tiny_sd, out, resume=True, **settings)
    assert seen == []  # the resumed run's policy encoded nothing
    assert "4 read from the disk cache" in capsys.readouterr().out
    assert comparable(read_metrics(out / "metrics.jsonl")) == comparable(full)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def identity(path: Path) -> str:
    torch.manual_seed(0)
    return load_policy(ModelConfig(pretrained=str(path)), LoraConfig(), device=CPU).text_identity()


def test_a_changed_encoder_or_tokenizer_is_another_identity(tiny_sd, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, CLIPTextModel

    base = identity(tiny_sd)
    assert identity(copy_model(tiny_sd, tmp_path / "copy")) == base  # same weights elsewhere
    weights = copy_model(tiny_sd, tmp_path / "weights")
    encoder = CLIPTextModel.from_pretrained(weights / "text_encoder")
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] += 1e-3  # one weight of one encoder
    encoder.save_pretrained(weights / "text_encoder")
    tokenizer = copy_model(tiny_sd, tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tokenizer / "tokenizer")
    tok.add_tokens(["zebra"])
    tok.save_pretrained(tokenizer / "tokenizer")
    assert len({base, identity(weights), identity(tokenizer)}) == 3
    # a large encoder is known by its weight files (not read): a rewritten file is another one
    monkeypatch.setattr(ec, "SMALL_ENCODER_ELEMENTS", 0)
    files = identity(weights)
    assert identity(weights) == files
    encoder.save_pretrained(weights / "text_encoder")
    assert identity(weights) != files


def test_another_identity_reads_none_of_the_files_and_a_damaged_file_is_encoded_again(tmp_path):
    rows = {"embeds": torch.arange(6.0).view(2, 3), "mask": torch.ones(2, dtype=torch.long)}
    store = ec.DiskStore(tmp_path, "a" * 64)
    store.save("a cat", rows)
    loaded = store.load("a cat")
    assert loaded is not None and all(torch.equal(loaded[k], rows[k]) for k in rows)
    assert ec.DiskStore(tmp_path, "b" * 64).load("a cat") is None
    store.path("a dog").write_bytes(b"half a file")
    assert store.load("a dog") is None and store.load("a bird") is None


# ------------------------------------------------------------------ batch independence


@pytest.mark.parametrize("model", ["tiny_qwen_image", "tiny_zimage", "tiny_sd3", "tiny_sd"])
def test_a_prompts_embedding_does_not_depend_on_its_batch(model, request):
    """Padding (Qwen-Image pads to the batch's longest prompt) and batch-size-dependent kernels
    would make a batch's embedding differ from the prompt's own; each prompt is encoded alone."""
    path = request.getfixturevalue(model)
    short, long = "a cat", "a red dog on the moon and two blue horse"
    kwargs = {}
    if model == "tiny_zimage":
        kwargs["resolution"] = 32
    torch.manual_seed(0)
    together = load_policy(ModelConfig(pretrained=str(path), **kwargs), LoraConfig(), device=CPU)
    torch.manual_seed(0)
    alone = load_policy(ModelConfig(pretrained=str(path), **kwargs), LoraConfig(), device=CPU)
    both = together.conditioning([short, long, long], "")
    one = alone.conditioning([short], "")
    torch.testing.assert_close(both[0][:1], one[0], rtol=0, atol=0)
    for key, value in (one[2] or {}).items():
        torch.testing.assert_close(both[2][key][:1], value, rtol=0, atol=0)


# ------------------------------------------------------------------ encoder placement


@pytest.mark.parametrize("model", ["tiny_sd", "tiny_sd3", "tiny_flux"])
def test_text_encoder_device_cpu_and_offload_encode_the_same(model, request):
    path = request.getfixturevalue(model)
    prompts, out = ["a cat", "a red ball"], {}
    for device in ("accelerator", "cpu", "offload"):
        torch.manual_seed(0)
        policy = load_policy(ModelConfig(pretrained=str(path), text_encoder_device=device),
                             LoraConfig(), device=CPU)  # fmt: skip
        assert policy.text_device.type == "cpu"
        if device != "accelerator":  # in CPU memory (between uses, for offload)
            assert {e.device.type for e in policy.text_encoders()} == {"cpu"}
        moves: list[str] = []
        for encoder in policy.text_encoders():
            to = encoder.to
            encoder.to = lambda *a, _to=to, _moves=moves, **k: (
                _moves.append(str(a[0])) or _to(*a, **k)
            )
        out[device] = policy.conditioning(prompts, "")
        # offload: each encoder to the device and back once, for all prompts and the negative one
        assert len(moves) == (2 * len(policy.text_encoders()) if device == "offload" else 0)
    for device in ("cpu", "offload"):
        for a, b in zip(out["accelerator"][:2], out[device][:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offload_text_encoders_is_a_deprecated_alias(caplog):
    with caplog.at_level(logging.WARNING, logger="diffloop.config.schema"):
        config = load_config(None, ["model.offload_text_encoders=true"])
    assert config.model.text_encoder_device == "offload" and not config.model.offload_text_encoders
    warning = (
        "model.offload_text_encoders is deprecated: use model.text_encoder_device=offload "
        "(read as that)"
    )
    assert [r.getMessage() for r in caplog.records] == [warning]
    same = load_config(None, ["model.offload_text_encoders=true",
                              "model.text_encoder_device=offload"])  # fmt: skip
    assert same.model.text_encoder_device == "offload"
    with pytest.raises(ConfigError, match="disagree") as e:
        load_config(None, ["model.offload_text_encoders=true", "model.text_encoder_device=cpu"])
    assert "\n" not in str(e.value)


def test_cache_fields_are_checked_before_a_model_loads(tmp_path):
    from diffloop.config import validate

    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ConfigError, match="prompts.embedding_cache_dir="):
        validate(load_config(None, [f"prompts.embedding_cache_dir={afile}"]))
    with pytest.raises(ConfigError, match="model.text_encoder_device"):
        load_config(None, ["model.text_encoder_device=gpu"])
