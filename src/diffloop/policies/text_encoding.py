"""The text side of every family's policy: the text encoders, where they run, and the prompt cache.

``TextEncoding`` is the mixin ``denoiser.DenoiserPolicy`` inherits; it owns

- the text encoders (``text_encoder_names``) and their tokenizers (``tokenizers``, ``tokenize``);
- their placement (``model.text_encoder_device``, ``TEXT_ENCODER_DEVICES``): on the accelerator, on
  the CPU (``text_device``), or offloaded to CPU memory and visiting the device only to encode
  (``text_encoders_on_device``, ``set_text_encoder_offload``);
- the prompt-embedding cache (``embedding_cache.EmbeddingCache``): ``encoded`` encodes a prompt once
  (the family's ``encode_uncached`` hook), ``use_embedding_cache_dir`` keeps the encodings on disk
  keyed by ``text_identity`` (``encoding_settings``), ``precompute_embeddings`` encodes every prompt
  of a run up front (``needs_negative_prompt``) and ``release_text_encoders`` then frees the
  encoders.

The host class provides ``device``, ``weight_dtype``, ``lora_config``, ``components``,
``family_name``, ``model_path`` and ``_freeze`` (a frozen component in a dtype on a device); its
constructor calls ``init_text_encoding`` and, once the components are attributes,
``freeze_text_encoders``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffloop.config import LoraConfig
from diffloop.policies.embedding_cache import DiskStore, EmbeddingCache, Rows, encoder_identity

TEXT_ENCODER_DEVICES = ("accelerator", "cpu", "offload")
"""``model.text_encoder_device``'s choices (``TextEncoding.text_device``)."""


class TextEncoding:
    """The text encoders, their placement and the prompt-embedding cache of a policy (module
    docstring). Methods marked "hook" are what a family overrides."""

    # ---------------------------------------------------------------- what a family declares
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """Component names of the frozen text encoders (an absent optional one is None); each one's
    tokenizer is named alike (text_encoder_2: tokenizer_2)."""
    encoding_attributes: ClassVar[tuple[str, ...]] = ("max_sequence_length", "out_layers")
    """Attributes (where the policy has them) that change the text encoding: part of the disk
    cache's key (``encoding_settings``)."""

    # ---------------------------------------------------------------- what the host provides
    device: torch.device
    weight_dtype: torch.dtype
    lora_config: LoraConfig | None
    components: dict[str, Any]
    family_name: ClassVar[str]
    model_path: str | None

    # ---------------------------------------------------------------- setup

    def init_text_encoding(self, text_encoder_device: str) -> None:
        """Set ``model.text_encoder_device`` (ValueError naming the choices unless one of
        ``TEXT_ENCODER_DEVICES``) and start an empty ``embedding_cache``."""
        if text_encoder_device not in TEXT_ENCODER_DEVICES:
            raise ValueError(
                f"model.text_encoder_device={text_encoder_device!r}: use one of "
                f"{', '.join(TEXT_ENCODER_DEVICES)}"
            )
        self.text_encoder_device = text_encoder_device
        self.embedding_cache = EmbeddingCache()
        """Every distinct prompt's text encoding, in CPU memory (``encoded``)."""

    def freeze_text_encoders(self, weight_dtype: torch.dtype) -> None:
        """Freeze the loaded text encoders in ``weight_dtype`` (``_freeze``) where they live: the
        policy's device for ``accelerator``, CPU memory for ``cpu`` and ``offload``."""
        home = self.device if self.text_encoder_device == "accelerator" else torch.device("cpu")
        for name in self.text_encoder_names:
            if getattr(self, name) is not None:
                self._freeze(getattr(self, name), weight_dtype, home)

    # ---------------------------------------------------------------- placement

    def text_encoders(self) -> list[torch.nn.Module]:
        """The loaded text encoders (``text_encoder_names`` that are present)."""
        found = (getattr(self, name, None) for name in self.text_encoder_names)
        return [encoder for encoder in found if encoder is not None]

    @property
    def text_device(self) -> torch.device:
        """Where the text encoders run: the CPU for ``model.text_encoder_device=cpu``, else the
        policy's device (offloaded encoders visit it to encode)."""
        return torch.device("cpu") if self.text_encoder_device == "cpu" else self.device

    @property
    def offload_text_encoders(self) -> bool:
        """``model.text_encoder_device=offload``."""
        return self.text_encoder_device == "offload"

    def set_text_encoder_offload(self, enabled: bool) -> None:
        """Offload the text encoders (``model.text_encoder_device=offload``: in CPU memory, on the
        device only to encode, ``text_encoders_on_device``) or keep them on the device."""
        self.text_encoder_device = "offload" if enabled else "accelerator"
        for encoder in self.text_encoders():
            encoder.to("cpu" if enabled else self.device)

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on ``text_device`` inside the block; offloaded ones go back to CPU
        memory after it (so a large encoder and the denoiser never share the device)."""
        if not self.offload_text_encoders:
            yield
            return
        for encoder in self.text_encoders():
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in self.text_encoders():
                encoder.to("cpu")

    # ---------------------------------------------------------------- tokenizing

    def tokenize(
        self, tokenizer: Any, prompts: Sequence[str], max_length: int | None = None
    ) -> torch.Tensor:
        """(N, L) token ids of ``prompts`` on the text encoders' device, padded and truncated to
        ``max_length`` (default the tokenizer's model_max_length), as the pipelines'
        encode_prompt."""
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_device)

    # ---------------------------------------------------------------- prompt embeddings

    def encode_uncached(self, prompts: list[str]) -> Rows:
        """Hook: the family's text encoding of ``prompts`` (N,) by the text encoders (on
        ``text_device`` inside ``text_encoders_on_device``), {name: (N, ...)}, each prompt
        encoded alone (``embedding_cache.each_alone``): what ``encoded`` caches."""
        raise NotImplementedError

    def encoded(self, *groups: Sequence[str]) -> list[Rows]:
        """Each group of prompts' text encoding {name: (N_g, ...)} on the device, through
        ``embedding_cache``: a prompt held in memory or on disk is not encoded again; the others
        are encoded (``encode_uncached``, one group at a time, in one visit of offloaded encoders
        to the device) and kept. After ``release_text_encoders`` a prompt not held is an
        ``EmbeddingCacheMissError``."""
        cache = self.embedding_cache
        if any(cache.missing(g) for g in groups):
            cache.check_can_encode([p for g in groups for p in cache.missing(g)])
            with self.text_encoders_on_device():
                for group in groups:
                    missing = cache.missing(group)
                    if missing:
                        cache.add(missing, self.encode_uncached(missing))
        out = [cache.stacked(g, self.device) for g in groups]
        cache.forget_unless_kept()
        return out

    def tokenizers(self) -> dict[str, Any]:
        """The loaded text encoders' tokenizers by name (text_encoder_2's is tokenizer_2)."""
        names = (n.replace("text_encoder", "tokenizer") for n in self.text_encoder_names)
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def encoding_settings(self) -> dict[str, Any]:
        """Hook: what besides the encoders and tokenizers decides the text encoding (the family,
        ``encoding_attributes``, the dtype and the device type it runs in): part of the disk
        cache's key."""
        attrs = {a: getattr(self, a) for a in self.encoding_attributes if hasattr(self, a)}
        return {
            "family": self.family_name,
            "policy": type(self).__name__,
            "dtype": str(self.weight_dtype),
            "device": self.text_device.type,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
        }

    def text_identity(self) -> str:
        """The disk cache's key of this policy's text encoding (``encoder_identity``)."""
        names = [n for n in self.text_encoder_names if getattr(self, n, None) is not None]
        return encoder_identity(
            {n: getattr(self, n) for n in names},
            self.tokenizers(),
            self.encoding_settings(),
            self.model_path,
        )

    def use_embedding_cache_dir(self, directory: str | Path) -> None:
        """Keep (and look up) prompt embeddings on disk under ``directory``
        (``prompts.embedding_cache_dir``), keyed by ``text_identity``."""
        if self.embedding_cache.frozen_by is not None:
            raise ValueError("set the embedding cache directory before freeing the text encoders")
        self.embedding_cache.store = DiskStore(directory, self.text_identity())

    def precompute_embeddings(self, prompts: Sequence[str], negative_prompt: str) -> None:
        """Encode (or read from disk) every distinct prompt of ``prompts`` and the negative
        prompt now, as ``conditioning`` would."""
        groups = [list(dict.fromkeys(prompts))]
        if self.needs_negative_prompt(negative_prompt):
            groups.append([negative_prompt])
        self.encoded(*groups)

    def needs_negative_prompt(self, negative_prompt: str) -> bool:
        """Hook: whether ``conditioning`` encodes the negative prompt (default: yes)."""
        return True

    def release_text_encoders(self, field: str = "prompts.precompute_embeddings") -> None:
        """Free the text encoders once every prompt the run needs is in ``embedding_cache``: they
        leave the accelerator (LoRA: deleted, their memory returned; full fine-tuning: kept in CPU
        memory, which the full export writes). A prompt not held is then an error naming
        ``field``."""
        self.embedding_cache.freeze(field)
        for name in self.text_encoder_names:
            encoder = getattr(self, name, None)
            if encoder is None:
                continue
            if self.lora_config is None:
                encoder.to("cpu")
            else:
                setattr(self, name, None)
                self.components[name] = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
