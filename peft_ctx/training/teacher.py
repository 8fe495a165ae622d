"""The text-RAG teacher's top-k log-probs, cached on the training rows before the first step."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import ContextConfig
from ..inference import collate, text_examples
from ..prompting import IGNORE_INDEX, position_ids
from .collator import TEACHER_IDS, TEACHER_LOGPROBS
from .scoring import answer_logits


@torch.no_grad()
def teacher_topk(
    model,
    tokenizer,
    config,
    questions: Sequence[str],
    contexts: Sequence[Sequence[str]],
    answers: Sequence[str],
    k: int = 32,
    temperature: float = 1.0,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The text-RAG teacher's top-k answer-token log-probabilities (at temperature T), one pair per example.

    ``model`` is the PeftModel (the teacher is the same frozen LLM with the adapter off) or a plain base model.
    Each pair holds ``[n_answer_tokens, k]`` token ids and log-probs, in answer order.
    """
    if k < 1:
        raise ValueError(f"k={k}: keep at least one teacher token per position.")
    disable = getattr(model, "disable_adapter", None)
    out: list[tuple[list[list[int]], list[list[float]]]] = []
    device = next(model.parameters()).device
    bar = tqdm(total=len(questions), desc="Caching teacher (text RAG)", disable=not show_progress)
    for start in range(0, len(questions), batch_size):
        stop = start + batch_size
        examples = text_examples(config, tokenizer, questions[start:stop], contexts[start:stop], answers[start:stop])
        batch = collate(config, examples, tokenizer, padding_side="left", device=device)
        labels = batch.pop("labels")
        batch.pop("context_mask", None)
        batch["position_ids"] = position_ids(batch["attention_mask"])
        with disable() if disable is not None else contextlib.nullcontext():
            _, logits, _ = answer_logits(model, batch, labels)  # [n_answer_tokens, vocab], row by row
        top = F.log_softmax(logits / temperature, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        counts = (labels != IGNORE_INDEX).sum(-1).tolist()
        for ids, values in zip(top.indices.split(counts), top.values.split(counts)):
            out.append((ids.tolist(), values.tolist()))
        bar.update(labels.shape[0])
    bar.close()
    return out


def add_teacher_cache(
    model,
    tokenizer,
    rows: list[dict],
    k: int,
    temperature: float = 1.0,
    *,
    contexts_column: str = "contexts",
    config: Optional[ContextConfig] = None,
    batch_size: int = 8,
) -> None:
    """Fill the teacher columns of QA rows in place (text RAG with the adapter off): ``teacher_topk`` per row."""
    cache = teacher_topk(
        model,
        tokenizer,
        config or model.active_peft_config,
        [r["question"] for r in rows],
        [r[contexts_column] for r in rows],
        [r["answer"] for r in rows],
        k=k,
        temperature=temperature,
        batch_size=batch_size,
    )
    for row, (ids, logprobs) in zip(rows, cache):
        row[TEACHER_IDS], row[TEACHER_LOGPROBS] = ids, logprobs
