"""COCOM pretraining batches: auto-encoding and continuation from context embeddings, mixed at a set ratio.

- auto-encoding: the passage (truncated to ``max_passage_tokens``) is compressed; the decoder reads its context
  embeddings and the ``<AE>`` marker and must write the passage back (then EOS).
- continuation: the first part of the passage is compressed; the decoder must write the part that follows (no EOS:
  the text goes on).

Prompts are bare (no instruction, no chat template): only the context embeddings and the target. QA fine-tuning
afterwards uses the shared ``peft_ctx.training.ContextDataCollator`` with the adapter's QA prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..inference import collate, with_resources
from ..methods import get_method
from ..prompting import IGNORE_INDEX, tokenize_parts
from .config import CocomConfig

TASKS = ("autoencode", "continuation")


@dataclass
class CocomPretrainingCollator:
    """Rows with a passage in ``text_column`` -> right-padded batches for ``ContextSFTTrainer`` (labels on targets).

    Each row is auto-encoded with probability ``autoencode_ratio``, otherwise continued; the draw depends only on the
    seed and the batch's texts, so a resumed run draws what the uninterrupted one drew.
    """

    config: CocomConfig
    tokenizer: Any
    text_column: str = "text"
    autoencode_ratio: float = 0.5
    max_target_tokens: int = 128
    max_length: Optional[int] = None
    seed: int = 0
    # The PeftModel (COCOM-light tokenises passages with the adapter's encoder tokenizer); ContextSFTTrainer fills it.
    model: Any = None

    def __post_init__(self):
        if not isinstance(self.config, CocomConfig):
            raise ValueError(f"CocomPretrainingCollator needs a CocomConfig, got {type(self.config).__name__}.")
        if not 0 <= self.autoencode_ratio <= 1:
            raise ValueError(f"autoencode_ratio={self.autoencode_ratio!r}: give a fraction in [0, 1] (paper: 0.5).")
        if self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens={self.max_target_tokens!r}: give a positive int.")

    def _rng(self, texts: list[str]) -> random.Random:
        key = hashlib.sha256(f"{self.seed}:{json.dumps(texts)}".encode()).hexdigest()
        return random.Random(key)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [row[self.text_column] for row in rows]
        rng = self._rng(texts)
        examples = [
            self.example(text, "autoencode" if rng.random() < self.autoencode_ratio else "continuation")
            for text in texts
        ]
        return collate(self.config, examples, self.tokenizer, padding_side="right", max_length=self.max_length)

    def example(self, text: str, task: str):
        """One tokenised example: the compressed part as context slots, the target as labels."""
        if task not in TASKS:
            raise ValueError(f"task={task!r}; use one of {', '.join(TASKS)}.")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Pretraining passages must be non-empty strings, got {text!r:.60}.")
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if task == "continuation" and len(ids) < 2:
            task = "autoencode"  # nothing left to continue
        if task == "autoencode":
            cut = min(len(ids), self.config.max_passage_tokens, self.max_target_tokens)
            context, target = ids[:cut], ids[:cut]
            if self.tokenizer.eos_token_id is not None:
                target = target + [self.tokenizer.eos_token_id]
        else:
            cut = min(len(ids) // 2, self.config.max_passage_tokens)
            context, target = ids[:cut], ids[cut : cut + self.max_target_tokens]
        method = get_method(self.config.method)
        options = with_resources(
            self.config, {"autoencode": task == "autoencode"}, tokenizer=self.tokenizer, model=self.model
        )
        docs = method.prepare_docs(self.config, [[self.tokenizer.decode(context)]], options)[0]
        fields, payload = method.prompt_fields(self.config, docs, options)
        example = tokenize_parts(self.tokenizer, fields["context"], use_chat_template=False)
        example.labels = [IGNORE_INDEX] * len(example.input_ids) + list(target)
        example.input_ids = example.input_ids + list(target)
        example.context_mask = example.context_mask + [False] * len(target)
        example.context = payload
        return example
