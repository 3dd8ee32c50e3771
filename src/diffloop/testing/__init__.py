"""Helpers for tests and benchmarks, nothing downloaded: tiny random-weight models built from
configs (a ``tiny_*`` module per model family, ``tiny_reward_models`` for the model rewards), the
committed tiny CLIP BPE tokenizer (``tokenizer``), short training runs (``runs``), training in other
processes (``processes``), and how other tools name and apply a LoRA's keys (``lora_loaders``)."""
