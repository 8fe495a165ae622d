"""COCOM's training recipe, shared by ``train/cocom.py`` and the demo: pretraining, then QA fine-tuning.

Pretraining batches mix, at a set ratio:

- auto-encoding: the passage (truncated to ``max_passage_tokens``) is compressed; the decoder reads its context
  embeddings and the ``<AE>`` marker and must write the passage back (then EOS).
- continuation: the first part of the passage is compressed; the decoder must write the part that follows (no EOS:
  the text goes on).

Prompts are bare (no instruction, no chat template): only the context embeddings and the target. QA fine-tuning
afterwards is the shared QA stage (``peft_ctx.training``) with the adapter's QA prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..inference import with_resources
from ..methods import get_method
from ..prompting import IGNORE_INDEX, Example, pad_token_id, tokenize_parts
from ..training import (
    BudgetReport,
    ContextDataCollator,
    StageReport,
    check_diagnostic_passages,
    cut_passage,
    mean_answer_scores,
    train_qa,
    train_stage,
)
from .config import STAGES, CocomConfig

TASKS = ("autoencode", "continuation")


@dataclass
class CocomPretrainingCollator(ContextDataCollator):
    """Rows with a passage in ``text_column`` -> batches for ``ContextSFTTrainer`` (labels on the targets).

    Each row is auto-encoded with probability ``autoencode_ratio``, otherwise continued; the draw depends only on the
    seed and the batch's texts, so a resumed run draws what the uninterrupted one drew.
    """

    tasks: ClassVar[tuple[str, ...]] = ("pretrain",)
    task: str = "pretrain"
    text_column: str = "text"
    autoencode_ratio: float = 0.5
    max_target_tokens: int = 128

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.config, CocomConfig):
            raise ValueError(f"CocomPretrainingCollator needs a CocomConfig, got {type(self.config).__name__}.")
        if not 0 <= self.autoencode_ratio <= 1:
            raise ValueError(f"autoencode_ratio={self.autoencode_ratio!r}: give a fraction in [0, 1] (paper: 0.5).")
        if self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens={self.max_target_tokens!r}: give a positive int.")

    def fit_to_budget(self, rows, max_length, teacher_max_length=None):
        """Rows unchanged: a pretraining example is bounded by construction (at most ``max_passage_tokens``
        compressed, ``max_target_tokens`` written)."""
        return rows, BudgetReport(rows=len(rows))

    def _batch_rng(self, rows: list[dict]) -> random.Random:
        texts = [row[self.text_column] for row in rows]
        return random.Random(hashlib.sha256(f"{self.seed}:{json.dumps(texts)}".encode()).hexdigest())

    def examples(self, rows: list[dict]) -> list:
        self._tasks = ["autoencode" if self._rng.random() < self.autoencode_ratio else "continuation" for _ in rows]
        return [self.example(row[self.text_column], task) for row, task in zip(rows, self._tasks)]

    def wrong_examples(self, rows: list[dict]) -> list:
        """Each row's own task and target, its context embeddings made from the next row's passage (the margin's
        control: the target is only likelier with its own compression if that compression carries it)."""
        texts = [row[self.text_column] for row in rows]
        return [
            self.example(text, task, context_text=texts[(i + 1) % len(texts)])
            for i, (text, task) in enumerate(zip(texts, self._tasks))
        ]

    def example(self, text: str, task: str, context_text: Optional[str] = None):
        """One tokenised example: the compressed part as context slots, the target as labels. ``context_text``
        compresses another passage in place of the one the target comes from (as long as it, or its first half for
        continuation): the diagnostics' and the margin's control."""
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
            if context_text is not None:
                context = self.tokenizer(context_text, add_special_tokens=False).input_ids[
                    : self.config.max_passage_tokens
                ]
            if self.tokenizer.eos_token_id is not None:
                target = target + [self.tokenizer.eos_token_id]
        else:
            cut = min(len(ids) // 2, self.config.max_passage_tokens)
            context, target = ids[:cut], ids[cut : cut + self.max_target_tokens]
            if context_text is not None:
                other = self.tokenizer(context_text, add_special_tokens=False).input_ids
                context = other[: max(1, min(len(other) // 2, self.config.max_passage_tokens))]
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


def collator(
    config,
    tokenizer,
    stage: str,
    *,
    distill: bool = False,
    autoencode_ratio: float = 0.5,
    max_target_tokens: int = 128,
    **kwargs: Any,
) -> ContextDataCollator:
    """The batches of one stage: ``pretrain`` (auto-encoding + continuation on a ``text`` column) or ``qa``."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; choose one of {', '.join(STAGES)}.")
    if stage == "pretrain":
        if distill:
            raise ValueError("a_kl > 0 is for stage 2 (qa); pretraining has no text-RAG teacher.")
        return CocomPretrainingCollator(
            config, tokenizer, autoencode_ratio=autoencode_ratio, max_target_tokens=max_target_tokens, **kwargs
        )
    return ContextDataCollator(config, tokenizer, task="qa", distill=distill, **kwargs)


def train(
    model, tokenizer, data, stages: Mapping[str, Any], work_dir: str, seed: int = 0, callbacks=None
) -> list[StageReport]:
    """Pretraining on ``data.corpus`` (auto-encoding + continuation), then QA on ``data.qa_rows`` (each stage's
    ``StageSettings`` in ``stages``; 0 steps skips it)."""
    reports = []
    pretrain = stages.get("pretrain")
    if pretrain is not None and pretrain.steps > 0:
        n = min(len(data.corpus), pretrain.steps * pretrain.batch_size)
        rows = [{"text": cut_passage(t, pretrain.max_chars)} for t in data.corpus[:n]]
        ratio = pretrain.options.get("autoencode_ratio", 0.5)  # ARC's rows: 0.2
        batches = collator(model.active_peft_config, tokenizer, "pretrain", seed=seed, autoencode_ratio=ratio)
        reports.append(
            train_stage(
                model,
                tokenizer,
                rows,
                pretrain,
                output_dir=os.path.join(work_dir, "pretrain"),
                name="COCOM pretraining",
                seed=seed,
                collator=batches,
                callbacks=callbacks,
            )
        )
    if "qa" in stages:
        reports += train_qa(
            model, tokenizer, data.qa_rows, stages["qa"], work_dir, "COCOM (QA)", seed=seed, callbacks=callbacks
        )
    return reports


def diagnostics(model, tokenizer, passages: list[str], batch_size: int = 8, max_tokens: int = 64) -> dict[str, float]:
    """Auto-encoding NLL and greedy token accuracy on the first ``max_tokens`` tokens of each passage, written back
    from its own context embeddings, against another passage's (the next one in the list) and against the base LM
    with no context at all (the adapter disabled, one start token as the prompt)."""
    check_diagnostic_passages(passages)
    batches = CocomPretrainingCollator(
        model.active_peft_config, tokenizer, max_target_tokens=max_tokens, padding_side="left", model=model
    )
    start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_token_id(tokenizer)]

    def own(i: int):
        return batches.example(passages[i], "autoencode")

    def wrong(i: int):
        return batches.example(passages[i], "autoencode", context_text=passages[(i + 1) % len(passages)])

    def no_context(i: int):
        target = [t for t in own(i).labels if t != IGNORE_INDEX]
        return Example(start + target, [False] * (1 + len(target)), [IGNORE_INDEX] + target)

    def scored(make) -> dict[str, float]:
        chunks = [
            range(first, min(first + batch_size, len(passages))) for first in range(0, len(passages), batch_size)
        ]
        return mean_answer_scores(model, (batches.pad([make(i) for i in chunk]) for chunk in chunks))

    out: dict[str, float] = {}
    for suffix, make in (("", own), ("_wrong_passage", wrong)):
        out.update({f"autoencode_{name}{suffix}": value for name, value in scored(make).items()})
    with model.disable_adapter():
        out.update({f"autoencode_{name}_no_context": value for name, value in scored(no_context).items()})
    return out
