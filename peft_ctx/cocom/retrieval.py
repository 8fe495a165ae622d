"""Retrieval by memory states (CLaRa's end-to-end checkpoints): questions compressed by the adapter's query LoRA, as
passages are by its compressor LoRA, and passages ranked by the cosine between a question's and a passage's states,
each flattened into one vector (state i of the question against state i of the passage).

Example::

    index = peft_ctx.cocom.compress(model, tokenizer, corpus)      # the compressor LoRA, once
    found = index.search(model, tokenizer, questions, k=5)         # the query LoRA, per question
    answers = peft_ctx.generate(model, tokenizer, questions, contexts=index.select(found.ids))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..inference import active_config
from .compressed import CompressedIndex, adapter_fingerprint, compress_texts, compressing
from .config import QUERY_ROLE, CocomConfig


@dataclass(frozen=True)
class Retrieved:
    """Per question, the ``k`` best passages' index ids, best first, and their cosine scores."""

    ids: list[list[int]]
    scores: list[list[float]]


@torch.no_grad()
def query_states(model, tokenizer, questions: Sequence[str]) -> torch.Tensor:
    """Each question compressed by the active adapter's query LoRA, as a passage is (same input, same number of
    states).  # [n_questions, k, hidden]"""
    config = _retrieving_config(model)
    if isinstance(questions, str) or not questions:
        raise ValueError("questions must be a non-empty list of strings.")
    with compressing(model) as adapter_name:
        states, _ = compress_texts(model, tokenizer, config, adapter_name, questions, role=QUERY_ROLE)
    return states.view(len(questions), config.memory_tokens_per_passage, -1)


def search(
    model,
    tokenizer,
    questions: Sequence[str],
    index: CompressedIndex,
    k: int = 5,
    candidates: Optional[Sequence[Sequence[int]]] = None,
) -> Retrieved:
    """The ``k`` passages of ``index`` whose compressed states are closest (cosine of the flattened states) to each
    question's query states; ``candidates``: per question, the index ids to rank (CLaRa ranks each question's own
    retrieved documents), default every passage of the index."""
    config = _retrieving_config(model)
    if index.adapter_fingerprint != adapter_fingerprint(model):
        raise ValueError(
            "The index was compressed by another adapter (or this one trained further since); compress the corpus "
            "with this adapter (peft_ctx.cocom.compress) before searching it."
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}; give a positive number of passages per question.")
    n = config.memory_tokens_per_passage
    if index.embeddings.shape[0] != n * len(index):
        raise ValueError(f"The index's passages do not all have {n} states; it is not this adapter's.")
    queries = query_states(model, tokenizer, questions).flatten(1).float()  # [q, n * hidden]
    passages = index.embeddings.view(len(index), -1).to(queries)  # [N, n * hidden]
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(passages, dim=-1).T
    if candidates is not None and len(candidates) != len(questions):
        raise ValueError(f"candidates has {len(candidates)} lists for {len(questions)} questions; give one each.")
    ids, values = [], []
    for i in range(len(questions)):
        pool = torch.arange(len(index)) if candidates is None else torch.tensor(list(candidates[i]), dtype=torch.long)
        if len(pool) < k:
            raise ValueError(f"Question {i} has {len(pool)} candidate passages, fewer than k={k}.")
        top = scores[i, pool].topk(k)
        ids.append(pool[top.indices].tolist())
        values.append(top.values.tolist())
    return Retrieved(ids, values)


def _retrieving_config(model) -> CocomConfig:
    config = active_config(model)
    if not isinstance(config, CocomConfig) or not config.query_adapter:
        raise ValueError(
            "Retrieval by memory states needs an active COCOM adapter with a query LoRA (query_adapter=True, as "
            "converted from CLaRa's end-to-end checkpoints)."
        )
    return config
