"""Prompt embeddings: each distinct prompt encoded once, kept in CPU memory, optionally on disk.

Text encoders are frozen and prompts repeat (K samples per prompt, epoch after epoch, the fixed
evaluation set), so a policy encodes a prompt the first time it meets it and reuses the result
(``DenoiserPolicy.encoded``). What is kept per prompt is the family's text encoding, ``Rows``: one
tensor per name without the batch dimension (SD: ``embeds`` (L, D); SDXL / SD3 / FLUX.1: ``embeds``
and ``pooled`` (P,); Qwen-Image: ``embeds`` and ``mask`` (L,); Z-Image: ``embeds`` and ``lengths``
()), in CPU memory, moved to the device on use.

Bit-identity. Every prompt is encoded alone (a batch of one): its embedding cannot depend on which
other prompts shared its batch (their padding, the kernels a batch size selects), so a cached, a
precomputed, a disk-read and a freshly encoded embedding are the same bits, on any device. The
disk copy is the tensor's bytes (safetensors); CPU <-> device moves are exact.

On disk (``prompts.embedding_cache_dir``): ``DIR/<identity>/<sha256(prompt)>.safetensors``, the
prompt in the file's metadata (checked on read). ``identity`` hashes what decides the encoding
(``encoder_identity``): each text encoder's config and weights, each tokenizer's vocabulary,
rules and templates, the family's encoding settings (text length, layers), the dtype and device
type of the encoding, and the torch / transformers versions; a different value reads none of the
old files. Files are written aside and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffloop.errors import DiffloopError

logger = logging.getLogger(__name__)

Rows = dict[str, torch.Tensor]
"""One prompt's (or, with a leading batch dimension, several prompts') text encoding."""

FORMAT_VERSION = 1
"""Bumped when what a family stores per prompt changes (old disk entries then miss)."""
SMALL_ENCODER_ELEMENTS = 2**28
"""An encoder of at most this many weight elements (1 GiB in fp32) is fingerprinted by its
weights' bytes; a larger one by its weight files (names, sizes, hub blob hashes or mtimes), which
costs no read of the weights."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".gguf", ".pt", ".pth")


class EmbeddingCacheMissError(DiffloopError, KeyError):
    """A prompt was not encoded before the text encoders were freed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# ---------------------------------------------------------------------------- rows


def stack_rows(rows: Sequence[Rows], device: torch.device | str) -> Rows:
    """Per-prompt rows -> {name: (N, ...)} on ``device``."""
    return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}


def split_rows(batch: Rows, n: int) -> list[Rows]:
    """{name: (N, ...)} -> N per-prompt rows, each a CPU copy (not a view of the batch)."""
    return [{k: v[i].detach().to("cpu", copy=True) for k, v in batch.items()} for i in range(n)]


def cat_rows(parts: Sequence[Rows]) -> Rows:
    """Concatenate batches of rows along the prompt dimension."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def repeat_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(1, ...) -> (n, ...), a contiguous copy (one prompt's encoding for n samples)."""
    return t.expand(n, *t.shape[1:]).contiguous()


def each_alone(prompts: Sequence[str], encode: Callable[[list[str]], Rows]) -> Rows:
    """``encode`` run on one prompt at a time, the results concatenated: (N, ...) per name. The
    cache's rule (module docstring): no embedding depends on its batch."""
    return cat_rows([encode([p]) for p in prompts])


# ---------------------------------------------------------------------------- identity


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def state_dict_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def weight_files_digest(folder: Path) -> str | None:
    """sha256 over a component folder's weight and config files: name, size, and the hub blob's
    name (its content hash) where the file links into the Hugging Face cache, else the file's
    modification time (a rewritten file is a new identity). None if the folder has none."""
    entries = []
    for path in sorted(folder.glob("*")):
        if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
            continue
        target = path.resolve()
        blob = target.name if path.is_symlink() and "blobs" in target.parts else None
        stat = target.stat()
        entries.append([path.name, stat.st_size, blob or stat.st_mtime_ns])
    return _digest(entries) if entries else None


def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = ("_name_or_path", "transformers_version", "_commit_hash", "_diffusers_version")
    return {k: v for k, v in data.items() if k not in drop}


def encoder_fingerprint(module: torch.nn.Module, folder: Path | None) -> dict[str, Any]:
    """What identifies a text encoder: its class and config, and its weights (``state_dict_digest``
    for a small one or one without files; ``weight_files_digest`` of its folder for a large
    one)."""
    elements = sum(t.numel() for t in module.state_dict().values())
    weights = None
    if elements > SMALL_ENCODER_ELEMENTS and folder is not None and folder.is_dir():
        weights = weight_files_digest(folder)
    if weights is None:
        try:
            weights = state_dict_digest(module)
        except (RuntimeError, TypeError, AttributeError):  # a quantized tensor subclass
            files = weight_files_digest(folder) if folder is not None else None
            weights = files or f"unhashable:{id(module)}"  # no files: never reused
    return {"class": type(module).__name__, "config": _config_dict(module), "weights": weights}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer (or a processor's tokenizer): its class, its rules and vocabulary
    (the ``tokenizers`` backend's JSON, less the padding / truncation state a call leaves), or its
    vocabulary and special tokens without a backend; its chat templates and lengths."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    backend = getattr(inner, "backend_tokenizer", None)
    if backend is not None:
        rules = json.loads(backend.to_str())
        rules.pop("padding", None)
        rules.pop("truncation", None)
    else:
        rules = {"vocab": inner.get_vocab(), "special": getattr(inner, "all_special_tokens", [])}
    return {
        "class": type(tokenizer).__name__,
        "rules": _digest(rules),
        "chat_template": [getattr(t, "chat_template", None) for t in (tokenizer, inner)],
        "model_max_length": getattr(inner, "model_max_length", None),
        "sides": [getattr(inner, "padding_side", None), getattr(inner, "truncation_side", None)],
    }


def encoder_identity(
    encoders: dict[str, torch.nn.Module],
    tokenizers: dict[str, Any],
    settings: dict[str, Any],
    model_path: str | None,
) -> str:
    """The disk cache's key of a policy's text encoding (module docstring): sha256 hex."""
    import transformers

    root = Path(model_path) if model_path is not None else None
    return _digest(
        {
            "format": FORMAT_VERSION,
            "versions": [torch.__version__, transformers.__version__],
            "settings": settings,
            "encoders": {
                name: encoder_fingerprint(m, root / name if root is not None else None)
                for name, m in encoders.items()
            },
            "tokenizers": {name: tokenizer_fingerprint(t) for name, t in tokenizers.items()},
        }
    )


# ---------------------------------------------------------------------------- disk


class DiskStore:
    """One identity's embeddings on disk: ``root/<identity[:32]>/<sha256(prompt)[:40]>.safetensors``
    (module docstring)."""

    def __init__(self, root: str | Path, identity: str) -> None:
        self.root = Path(root)
        self.folder = self.root / identity[:32]
        self.identity = identity

    def path(self, prompt: str) -> Path:
        return self.folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:40]}.safetensors"

    def load(self, prompt: str) -> Rows | None:
        """The stored rows of ``prompt``, or None (absent, unreadable, or another prompt's or
        identity's file: a miss, encoded again and rewritten)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("identity") != self.identity:
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            logger.warning("prompt embedding cache: %s is unreadable (%s); encoding it", path, e)
            return None

    def save(self, prompt: str, rows: Rows) -> None:
        """Write ``rows`` aside and rename it into place (atomic: a reader sees the whole file or
        none; concurrent writers of one prompt write the same bytes)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(prompt)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {k: v.contiguous() for k, v in rows.items()}
        save_file(tensors, str(tmp), metadata={"prompt": prompt, "identity": self.identity})
        os.replace(tmp, path)


# ---------------------------------------------------------------------------- the cache


class EmbeddingCache:
    """prompt -> ``Rows`` in CPU memory, filled from a ``DiskStore`` (if any) or by encoding.

    ``freeze(field)`` marks the encoders as gone: a prompt neither in memory nor on disk is then an
    ``EmbeddingCacheMissError`` naming ``field``, never a silent reload of an encoder."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        """False: forget every prompt after its use (each use encodes again: the uncached
        behaviour, for comparisons)."""
        self.rows: dict[str, Rows] = {}
        self.store: DiskStore | None = None
        self.frozen_by: str | None = None
        self.encoded = 0  # prompts encoded by the text encoders
        self.disk_hits = 0  # prompts read from the disk store
        self.written = 0  # prompts written to the disk store

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self.rows

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """The distinct prompts of ``prompts`` in neither memory nor the disk store (those on disk
        are read into memory now), in first-seen order."""
        out = []
        for p in dict.fromkeys(prompts):
            if p in self.rows:
                continue
            found = self.store.load(p) if self.store is not None else None
            if found is None:
                out.append(p)
            else:
                self.rows[p] = found
                self.disk_hits += 1
        return out

    def check_can_encode(self, prompts: Sequence[str]) -> None:
        """EmbeddingCacheMissError when the encoders are frozen out and ``prompts`` need them."""
        if self.frozen_by is not None and prompts:
            raise EmbeddingCacheMissError(
                f"{self.frozen_by}=true freed the text encoders after encoding the run's prompts, "
                f"but {len(prompts)} prompt(s) were not among them (e.g. {prompts[0]!r}); use "
                f"prompts from the training or evaluation set, or set {self.frozen_by}=false"
            )

    def add(self, prompts: Sequence[str], batch: Rows) -> None:
        """Keep ``batch`` ({name: (N, ...)}, ``prompts`` (N,)) per prompt, written to disk too."""
        for prompt, rows in zip(prompts, split_rows(batch, len(prompts)), strict=True):
            self.rows[prompt] = rows
            if self.store is not None:
                self.store.save(prompt, rows)
                self.written += 1
        self.encoded += len(prompts)

    def stacked(self, prompts: Sequence[str], device: torch.device | str) -> Rows:
        """{name: (N, ...)} of ``prompts`` (every one present) on ``device``."""
        return stack_rows([self.rows[p] for p in prompts], device)

    def forget_unless_kept(self) -> None:
        """Without ``keep``: drop every prompt (called after each use)."""
        if not self.keep:
            self.rows.clear()

    def freeze(self, field: str) -> None:
        self.frozen_by = field

    def summary(self) -> str:
        """One line: distinct prompts held, read from disk, encoded, written."""
        where = f" ({self.store.folder})" if self.store is not None else ""
        return (
            f"prompt embeddings: {len(self.rows)} distinct prompts, {self.disk_hits} read from the "
            f"disk cache{where}, {self.encoded} encoded, {self.written} written"
        )


# ---------------------------------------------------------------------------- a run's prompts


def prepare_prompt_embeddings(
    policy: Any,
    precompute: bool,
    cache_dir: str | None,
    prompts: Sequence[str],
    negative_prompt: str,
) -> str | None:
    """A run's prompt embeddings before training (``prompts.precompute_embeddings``,
    ``prompts.embedding_cache_dir``): with a cache directory, every prompt of ``prompts`` (the
    training and evaluation prompts) and the negative prompt is read from it or encoded and written
    now; with ``precompute`` they are encoded now and the text encoders freed
    (``release_text_encoders``). Returns the one line to print (hits, misses, freed), or None when
    neither is set (prompts are then encoded as they are first drawn)."""
    if not precompute and cache_dir is None:
        return None
    if not hasattr(policy, "precompute_embeddings"):
        from diffloop.config import ConfigError

        field = "prompts.precompute_embeddings" if precompute else "prompts.embedding_cache_dir"
        raise ConfigError(f"{field} needs a model family's policy (DenoiserPolicy); unset it")
    if cache_dir is not None:
        policy.use_embedding_cache_dir(cache_dir)
    policy.precompute_embeddings(prompts, negative_prompt)
    line = policy.embedding_cache.summary()
    if precompute:
        policy.release_text_encoders("prompts.precompute_embeddings")
        line += "; text encoders freed (prompts.precompute_embeddings)"
    return line
