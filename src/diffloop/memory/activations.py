"""Activation bytes of the denoiser's forward, counted on ``meta``: the storages saved for
backward (with and without gradient checkpointing, attention as the fused kernels store it), the
no-grad forward's and the VAE decode's peak of live tensors."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from diffloop.memory.architecture import Architecture, UnknownArchitecture, policy_class
from diffloop.memory.settings import Settings

ACTIVATION_TOLERANCE = 0.25
"""Relative tolerance of the activation estimate against a real training backward (tests)."""


class SavedBytes:
    """Distinct storages saved for backward (parameters excluded), as a saved_tensors_hooks
    pair: ``total`` bytes."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude:
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @contextlib.contextmanager
    def hooks(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


class _FlashAttention(torch.autograd.Function):
    """Scaled dot-product attention as the fused kernels store it (flash / memory-efficient on
    GPUs, flash on CPU): the output (..., L, Dv), and for backward q, k, v, the output and an fp32
    logsumexp (..., L); meta's own path would be the math one, which materialises (L, L)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(*args: Any, **kw: Any) -> Any:
    """``F.scaled_dot_product_attention``'s signature (query, key, value positional or named)."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if i < len(args) else kw[n] for i, n in enumerate(names))
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as ``_FlashAttention`` inside (meta passes)."""
    from unittest import mock

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa):
        yield


def parameter_storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage()._cdata for p in module.parameters()} | {
        b.untyped_storage()._cdata for b in module.buffers()
    }


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors produced inside (no-grad passes on meta): each new storage is
    counted until its tensor is freed (``weakref.finalize``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _drop(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.seen:
                    n = t.untyped_storage().nbytes()
                    self.seen.add(key)
                    self.live += n
                    weakref.finalize(t, self._drop, key, n)
        self.peak = max(self.peak, self.live)
        return out


def denoiser_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's per-block units (the classes diffusers' ``_no_split_modules`` names, else
    the UNet's down/mid/up blocks)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in module.modules() if type(m).__name__ in names]
    if found:
        return found
    return [m for attr in ("down_blocks", "up_blocks") for m in getattr(module, attr, [])] + (
        [module.mid_block] if getattr(module, "mid_block", None) is not None else []
    )


def _latent_side(arch: Architecture, s: Settings) -> tuple[int, int]:
    """(image side, latent side) of the run: model.resolution (else the family's default) over
    the VAE's downsampling."""
    vae = arch.vae
    cfg = getattr(vae, "config", None)
    if cfg is None:
        factor = 1
    elif hasattr(cfg, "temperal_downsample"):
        factor = 2 ** len(cfg.temperal_downsample)
    else:
        factor = 2 ** (len(cfg.block_out_channels) - 1)
    dcfg = arch.denoiser.config
    if s.resolution is not None:
        side = s.resolution
    elif hasattr(dcfg, "sample_size") and arch.family in ("sd", "sdxl", "sd3"):
        size = dcfg.sample_size
        side = (size if isinstance(size, int) else size[0]) * factor
    else:
        side = 1024
    return side, side // factor


DEFAULT_TEXT_TOKENS = {"sd": 77, "sdxl": 77, "sd3": 256, "flux": 512, "flux2": 512,
                       "flux2_klein": 512, "qwen_image": 512, "zimage": 512}  # fmt: skip


def _text_tokens(arch: Architecture, s: Settings) -> int:
    n = s.text_tokens if s.text_tokens is not None else DEFAULT_TEXT_TOKENS[arch.family]
    if arch.text_cap is not None and arch.family not in ("sd", "sdxl"):
        n = min(n, arch.text_cap)
    return 77 + n if arch.family == "sd3" else (77 if arch.family in ("sd", "sdxl") else n)


def denoiser_call(
    arch: Architecture, module: torch.nn.Module, s: Settings, batch: int, dtype: torch.dtype
) -> Callable[[], Any]:
    """A call of ``module`` (the denoiser) on meta inputs of one training forward's shapes: the
    latents at the train resolution and ``_text_tokens`` of text."""
    meta = torch.device("meta")
    _, side = _latent_side(arch, s)
    text = _text_tokens(arch, s)
    c = module.config
    t = torch.ones(batch, device=meta)

    def rand(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=meta, dtype=dtype)

    f = arch.family
    if f in ("sd", "sdxl"):
        kwargs: dict[str, Any] = {"encoder_hidden_states": rand(batch, text, c.cross_attention_dim)}
        if f == "sdxl":
            time_ids = 6 * c.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": rand(batch, c.projection_class_embeddings_input_dim - time_ids),
                "time_ids": rand(batch, 6),
            }
        x = rand(batch, c.in_channels, side, side)
        return lambda: module(x, t, **kwargs).sample
    if f == "sd3":
        x = rand(batch, c.in_channels, side, side)
        text_states = rand(batch, text, c.joint_attention_dim)
        pooled = rand(batch, c.pooled_projection_dim)
        return lambda: module(
            hidden_states=x, timestep=t, encoder_hidden_states=text_states,
            pooled_projections=pooled, return_dict=False,
        )[0]  # fmt: skip
    tokens = (side // 2) ** 2
    if f == "flux":
        from diffloop.policies.flux import latent_image_ids, text_ids

        x = rand(batch, tokens, c.in_channels)
        kwargs = {
            "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
            "pooled_projections": rand(batch, c.pooled_projection_dim),
            "txt_ids": text_ids(text, meta),
            "img_ids": latent_image_ids(side, side, meta),
        }
        if c.guidance_embeds:
            kwargs["guidance"] = torch.ones(batch, device=meta)
        return lambda: module(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    if f in ("flux2", "flux2_klein"):
        from diffloop.policies.flux2 import position_ids

        x = rand(batch, tokens, c.in_channels)
        kwargs = {"encoder_hidden_states": rand(batch, text, c.joint_attention_dim)}
        kwargs |= position_ids(batch, side // 2, side // 2, text, meta)
        if c.guidance_embeds:
            kwargs["guidance"] = torch.ones(batch, device=meta)
        return lambda: module(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    if f == "qwen_image":
        x = rand(batch, tokens, c.in_channels)
        kwargs = {
            "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
            "img_shapes": [[(1, side // 2, side // 2)]] * batch,
        }
        return lambda: module(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
    if f == "zimage":
        from diffloop.policies.zimage import call_transformer

        x = rand(batch, c.in_channels, side, side)
        caps = [rand(text, c.cap_feat_dim) for _ in range(batch)]
        return lambda: call_transformer(module, x, t, caps, dtype)
    raise UnknownArchitecture(f"no meta forward for family {f}")


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes saved for backward by one sample's denoiser forward (``full``), with gradient
    checkpointing (``checkpointed``: the boundaries plus the largest block's own), and the
    no-grad forward's peak of live tensors (``sampling``)."""

    full: int
    checkpointed: int
    sampling: int


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module``'s floating tensors in ``dtype`` (a meta copy; diffusers' ``.to`` would warn)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return module


def lora_denoiser(arch: Architecture, s: Settings) -> torch.nn.Module:
    """A meta copy of the denoiser with the run's LoRA adapter (``policies.lora.add_lora``, the
    family's default targets when lora.target_modules is left at its default)."""
    from diffloop.config import LoraConfig
    from diffloop.policies.lora import add_lora

    module = copy.deepcopy(arch.denoiser)
    config = LoraConfig(enabled=True, rank=s.lora_rank, target_modules=list(s.target_modules))
    add_lora(module, config, policy_class(arch.family).DEFAULT_LORA_TARGETS)
    return module


def estimate_activations(arch: Architecture, s: Settings) -> ActivationEstimate:
    """Run the denoiser's forward on meta at batch 1 (with the run's LoRA or all trainable) and
    measure the saved and the live bytes (``diffloop.memory``'s docstring)."""
    dtype = s.dtype
    module = _cast(lora_denoiser(arch, s) if s.lora else copy.deepcopy(arch.denoiser), dtype)
    if s.lora:
        module.requires_grad_(False)
        for n, p in module.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        module.requires_grad_(True)
    module.train()
    exclude = parameter_storages(module)
    call = denoiser_call(arch, module, s, 1, dtype)
    blocks = denoiser_blocks(module)
    per_block: list[int] = []
    saved = SavedBytes(exclude)

    def before(_m: Any, _a: Any) -> None:
        per_block.append(-saved.total)

    def after(_m: Any, _a: Any, _o: Any) -> None:
        per_block[-1] += saved.total

    handles = [b.register_forward_pre_hook(before) for b in blocks]
    handles += [b.register_forward_hook(after) for b in blocks]
    try:
        with saved.hooks(), fused_attention():
            call()
    finally:
        for h in handles:
            h.remove()
    full = saved.total
    checkpointed = full
    if getattr(module, "_supports_gradient_checkpointing", False):
        module.enable_gradient_checkpointing()
        boundary = SavedBytes(exclude)
        with boundary.hooks(), fused_attention():
            call()
        checkpointed = boundary.total + max(per_block, default=0)
        module.disable_gradient_checkpointing()
    live = _LiveBytes()
    with torch.no_grad(), fused_attention(), live:
        call()
    return ActivationEstimate(full, min(checkpointed, full), live.peak)


def vae_decode_peak(arch: Architecture, s: Settings, batch: int) -> int:
    """Peak live bytes of decoding ``batch`` latents (no grad, on meta) in the VAE's dtype."""
    vae = arch.vae
    if vae is None:
        return 0
    dtype = torch.float32 if vae_fp32(arch, s) else s.dtype
    module = _cast(copy.deepcopy(vae), dtype)
    _, side = _latent_side(arch, s)
    channels = getattr(vae.config, "latent_channels", None) or vae.config.z_dim
    shape = (batch, channels, 1, side, side) if arch.family == "qwen_image" else (
        batch, channels, side, side)  # fmt: skip
    z = torch.empty(*shape, device="meta", dtype=dtype)
    live = _LiveBytes()
    with torch.no_grad(), fused_attention(), live:
        module.decode(z)
    return live.peak


def vae_fp32(arch: Architecture, s: Settings) -> bool:
    """Whether the family decodes in fp32 (its policy's ``upcast_vae`` and the VAE's
    ``force_upcast``)."""
    upcast = policy_class(arch.family).upcast_vae
    return upcast and bool(getattr(arch.vae.config, "force_upcast", False))
