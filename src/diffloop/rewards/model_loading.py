"""Shared machinery of the model-based rewards: finding weights, dtypes, device moves, batching.

Weights are named by a Hugging Face hub id or a local path, loaded exactly as each model's own
library expects (``from_pretrained`` for transformers models, ``torch.load`` / safetensors for raw
checkpoints). A hub id is looked up as the policy's model is (``policies.loading``): in the hub
cache, its snapshot is read from disk without asking the hub; else one quick request tells whether
the hub has it (then ``from_pretrained`` / ``hf_hub_download`` download it) or why not (offline
mode, an unreachable hub, a gated or missing repository), in one line, without huggingface_hub's
retries. A weight that cannot be found raises :class:`MissingWeightsError` saying what was looked
for and how to provide it -- never a silent fallback to random weights.

A model reward (:class:`ModelReward`) loads its networks on the CPU at construction (so a missing
weight fails before training starts), casts them to ``dtype``, and moves them to the images' device
on the first call (and again whenever the images arrive on another device). It scores in chunks of
``batch_size`` images, in eval mode, under ``torch.no_grad``, and returns (N,) float32 scores on the
images' device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffloop.errors import DiffloopError
from diffloop.policies.loading import HubProblem, ask_hub, cached_snapshot

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class MissingWeightsError(DiffloopError, FileNotFoundError):
    """A reward's weights were not found locally and could not be fetched from the hub."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def _hub_help(
    spec: str,
    reward: str,
    kwarg: str,
    what: str,
    exc: BaseException | None,
    download: str | None = None,
    problem: HubProblem | None = None,
    partial: bool = False,
) -> str:
    """The one-line error of a hub weight that could not be had: ``problem`` (the hub probe's
    answer) or ``exc`` (the library's own failure) as the cause, then the two ways to provide it."""
    first = (str(exc).strip().splitlines() or [""])[0][:300] if exc else ""
    if problem is not None:
        cached = "only partly in" if partial else "not in"
        cause = f"it is {cached} the Hugging Face cache, and {problem.message}."
    else:
        cause = f"loading it from the Hugging Face hub failed ({type(exc).__name__}: {first})."
    return (
        f"reward {reward!r}: could not load {what} from {kwarg}={spec!r}: it is not an existing "
        f"local path; {cause} Provide it in one of two ways: (1) where the hub is reachable, "
        f"download it once into the hub cache (HF_HOME), e.g. `hf download {download or spec}` "
        f"(or run once without HF_HUB_OFFLINE); later offline runs find it there; or (2) pass a "
        f"local copy: {kwarg}=/path/to/it."
    )


def _hub_file(cls: Any) -> str:
    """The file whose presence on the hub (or in the cache) stands for ``cls``'s weights."""
    name = getattr(cls, "__name__", "")
    if "Tokenizer" in name:
        return "tokenizer_config.json"
    return "preprocessor_config.json" if "Processor" in name else "config.json"


def load_pretrained(
    cls: Any,
    spec: str | os.PathLike[str],
    *,
    reward: str,
    kwarg: str,
    what: str | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(spec, **kwargs)`` with a :class:`MissingWeightsError` that says what
    was looked for and how to provide it. ``spec``: a local directory or a hub id."""
    spec = str(spec)
    what = what or getattr(cls, "__name__", str(cls))
    if Path(spec).expanduser().exists():
        return cls.from_pretrained(str(Path(spec).expanduser()), **kwargs)
    if _looks_like_path(spec):
        raise MissingWeightsError(
            f"reward {reward!r}: {kwarg}={spec!r} looks like a local path, but it does not exist. "
            f"Pass a directory written by `{what}.save_pretrained`, or a Hugging Face hub id."
        )
    # A hub id: from its cached snapshot (read from disk, the hub not asked) when it loads from
    # there, else from the hub once one request found it there (no retries, no waiting).
    snapshot = cached_snapshot(spec, _hub_file(cls))
    if snapshot is not None:
        try:
            return cls.from_pretrained(str(snapshot), **kwargs)
        except OSError:  # a partial download (no weights): the hub may have the rest
            pass
        except ValueError as exc:
            raise MissingWeightsError(_hub_help(spec, reward, kwarg, what, exc)) from exc
    problem = ask_hub(spec, _hub_file(cls))
    if problem is not None and problem.kind != "no_file":  # no such file: from_pretrained says
        raise MissingWeightsError(
            _hub_help(spec, reward, kwarg, what, None, problem=problem, partial=bool(snapshot))
        )
    try:
        return cls.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as exc:  # transformers: OSError for "not found / no network"
        raise MissingWeightsError(_hub_help(spec, reward, kwarg, what, exc)) from exc


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.sep + os.sep in spec


def resolve_file(spec: str | os.PathLike[str], *, reward: str, kwarg: str) -> Path:
    """A checkpoint file: a local path, or ``"owner/repo/path/in/repo"`` on the Hugging Face hub
    (fetched with ``hf_hub_download``, i.e. from the hub cache when offline)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise MissingWeightsError(f"reward {reward!r}: {kwarg}={spec!r} exists but is not a file")
    parts = spec.split("/")
    if _looks_like_path(spec) or len(parts) < 3:
        raise MissingWeightsError(
            f"reward {reward!r}: no file at {kwarg}={spec!r}. Pass the path of the checkpoint "
            f"file, or a hub location 'owner/repo/filename' (downloaded into the hub cache)."
        )
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    what, download = f"{filename!r} of hub repo {repo_id!r}", f"{repo_id} {filename}"
    snapshot = cached_snapshot(repo_id, filename)
    if snapshot is not None:  # read from the cache, the hub not asked
        return snapshot / filename
    problem = ask_hub(repo_id, filename)  # one request: no retries against an unreachable hub
    if problem is not None:
        raise MissingWeightsError(_hub_help(spec, reward, kwarg, what, None, download, problem))
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as exc:  # hub errors come in many classes (offline, 404, network)
        raise MissingWeightsError(_hub_help(spec, reward, kwarg, what, exc, download)) from exc


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file on the CPU: ``.safetensors``, or a torch pickle read with
    ``weights_only=True``. A ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are
    removed (HPS v2 and open_clip training checkpoints carry both)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


class ModelReward:
    """Base of the model rewards: device following, dtype, batching, eval + no_grad.

    Subclasses set ``name``, register their networks with ``self._set_modules(...)`` and implement
    ``score_batch(images (B, 3, H, W) in [0, 1] on the model's device, prompts, metadata) -> (B,)``.
    """

    name: str = "model_reward"

    def __init__(self, dtype: str | torch.dtype = "float32", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dtype = parse_dtype(dtype)
        self.batch_size = int(batch_size)
        self.device = torch.device("cpu")
        self._modules: list[nn.Module] = []

    def _set_modules(self, *modules: nn.Module, float32: Sequence[nn.Module] = ()) -> None:
        """Freeze, eval-mode and cast the reward's networks to ``dtype`` (they stay on the CPU
        until called); the small heads in ``float32`` keep full precision whatever ``dtype``."""
        self._modules = [*modules, *float32]
        for module in self._modules:
            module.requires_grad_(False)
            module.eval()
        for module in modules:
            module.to(dtype=self.dtype)
        for module in float32:
            module.to(dtype=torch.float32)

    def to(self, device: str | torch.device) -> ModelReward:
        """Move the networks to ``device`` (done automatically on each call)."""
        device = torch.device(device)
        if device != self.device:
            for module in self._modules:
                module.to(device)
            self.device = device
        return self

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        n = images.shape[0]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata")
        self.to(images.device)
        for module in self._modules:
            module.eval()  # a caller may have flipped train mode; dropout would make scores noisy
        chunks = []
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                stop = start + self.batch_size
                scores = self.score_batch(
                    images[start:stop].float(), prompts[start:stop], metadata[start:stop]
                )
                chunks.append(scores.float())
        return torch.cat(chunks) if chunks else images.new_zeros(0)

    def score_batch(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype}, device={self.device})"
        )
