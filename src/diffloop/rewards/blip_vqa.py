"""T2I-CompBench's BLIP-VQA attribute-binding score, on transformers' ``BlipForQuestionAnswering``.

Follows Karine-Huang/T2I-CompBench, BLIPvqa_eval (BLIP_vqa.py and models/blip_vqa.py, inference
mode "vqa_prob", the one its evaluation uses). For an image x and prompt c with noun phrases
p_1..p_M (:func:`~diffloop.rewards.phrases.split_noun_phrases`, or metadata["phrases"]):

    q_m      = text_encoder("<p_m>?", cross-attending to vision_model(T(x)))       (L, D) states
    P_m(w)   = softmax(text_decoder([DEC] | q_m).logits[0])[w]    first answer token, teacher-forced
    yes_m    = P_m(yes) / (P_m(yes) + P_m(no))         answer_prob="yes_vs_no" (T2I-CompBench)
             = P_m(yes)                                answer_prob="yes"
    score    = prod_m yes_m  in [0, 1]

Changes from T2I-CompBench: the questions of all phrases and images go through the model in one
batch (the original runs one pass per phrase index); phrases come from a rule-based splitter, not
spaCy (see phrases.py for the differences); a prompt with no phrase asks about the whole prompt
(the original scores it 1, a free reward); at most ``max_phrases`` phrases are asked (its
``np_num``, default 8). The model is HF's port (Salesforce/blip-vqa-base by default, 384 px,
questions starting with [CLS] as HF's generate does) rather than the LAVIS checkpoint it loads.
T is the processor's resize to a square (bicubic) + CLIP normalisation, on the images' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from diffloop.rewards.model_loading import ModelReward, load_pretrained
from diffloop.rewards.phrases import split_noun_phrases
from diffloop.rewards.preprocess import ImageTransform


def phrases_for(prompt: str, metadata: dict[str, Any], max_phrases: int) -> list[str]:
    """metadata["phrases"] when the prompt source gives them, else the prompt's noun phrases
    (at most ``max_phrases``), else the prompt itself."""
    given = metadata.get("phrases")
    if given is not None:
        if isinstance(given, str) or not all(isinstance(p, str) for p in given):
            raise TypeError(f"metadata['phrases'] must be a list of strings, got {given!r}")
        phrases = list(given)
    else:
        phrases = split_noun_phrases(prompt)
    return phrases[:max_phrases] or [prompt]


class BlipVqaReward(ModelReward):
    """Product over noun phrases of BLIP-VQA's P(yes | image, "<phrase>?"); module docstring.

    Args:
        model:       hub id or directory of a BlipForQuestionAnswering checkpoint.
        processor:   where the tokenizer and preprocessor_config.json live (default: ``model``).
        answer_prob: "yes_vs_no" (T2I-CompBench) or "yes" (the raw first-token probability).
        max_phrases: questions per prompt at most (T2I-CompBench's np_num = 8).
        max_question_tokens: question truncation length (35, as BLIP's VQA code).
        dtype, batch_size: see ModelReward (batch_size counts images).
    """

    name = "blip_vqa"

    def __init__(
        self,
        model: str = "Salesforce/blip-vqa-base",
        processor: str | None = None,
        answer_prob: Literal["yes_vs_no", "yes"] = "yes_vs_no",
        max_phrases: int = 8,
        max_question_tokens: int = 35,
        dtype: str | torch.dtype = "float32",
        batch_size: int = 16,
    ) -> None:
        super().__init__(dtype=dtype, batch_size=batch_size)
        from transformers import AutoTokenizer, BlipForQuestionAnswering

        if answer_prob not in ("yes_vs_no", "yes"):
            raise ValueError(f"answer_prob must be 'yes_vs_no' or 'yes', got {answer_prob!r}")
        if max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1, got {max_phrases}")
        processor = processor or model
        self.model = load_pretrained(
            BlipForQuestionAnswering, model, reward=self.name, kwarg="model"
        )
        self.tokenizer = load_pretrained(
            AutoTokenizer, processor, reward=self.name, kwarg="processor", what="tokenizer"
        )
        self.transform = ImageTransform.from_pretrained(
            processor, "exact", reward=self.name, kwarg="processor"
        )
        self.answer_prob = answer_prob
        self.max_phrases = max_phrases
        self.max_question_tokens = max_question_tokens
        self.yes_id, self.no_id = (self._token_id(w) for w in ("yes", "no"))
        self.start_id = self.model.config.text_config.bos_token_id  # [DEC], decoder start
        self._set_modules(self.model)

    def _token_id(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"reward 'blip_vqa': the tokenizer has no single token for {word!r}")
        return int(ids[0])

    def yes_probabilities(self, image_embeds: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """(Q, P, D) image states, Q questions -> (Q,) probability of answering "yes".

        Questions are run in groups of equal token length, so nothing is padded: transformers
        5.x's BLIP text cross-attention drops its attention mask (BlipTextAttention does not pass
        ``encoder_attention_mask`` on), so a padded question would attend to its padding.
        """
        ids = self.tokenizer(questions, truncation=True, max_length=self.max_question_tokens)[
            "input_ids"
        ]
        p_yes = torch.empty(len(questions), device=self.device)
        for length in sorted({len(i) for i in ids}):
            group = [q for q, i in enumerate(ids) if len(i) == length]
            index = torch.tensor(group, device=self.device)
            input_ids = torch.tensor([ids[q] for q in group], device=self.device)
            p_yes[index] = self._yes_probability(image_embeds[index], input_ids)
        return p_yes

    def _yes_probability(self, image_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(G, P, D) image states, (G, L) unpadded question ids -> (G,)."""
        question_states = self.model.text_encoder(
            input_ids=input_ids, encoder_hidden_states=image_embeds
        ).last_hidden_state
        start = torch.full((input_ids.shape[0], 1), self.start_id, device=self.device)
        logits = self.model.text_decoder(
            input_ids=start, encoder_hidden_states=question_states, use_cache=False
        ).logits[:, 0]
        probs = logits.float().softmax(dim=-1)
        p_yes, p_no = probs[:, self.yes_id], probs[:, self.no_id]
        return p_yes / (p_yes + p_no) if self.answer_prob == "yes_vs_no" else p_yes

    def score_batch(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        pixel_values = self.transform(images).to(self.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        questions, owner = [], []
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            for phrase in phrases_for(prompt, meta, self.max_phrases):
                questions.append(f"{phrase}?")
                owner.append(i)
        index = torch.tensor(owner, device=self.device)
        p_yes = self.yes_probabilities(image_embeds[index], questions)
        scores = torch.ones(len(prompts), device=self.device)
        return scores.scatter_reduce(0, index, p_yes, reduce="prod")
