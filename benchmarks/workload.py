"""The benchmark workload: real Wikipedia passages cut to a fixed token length, and questions padded to a fixed
instruction length (the xRAG paper's profile: 180-token documents, a 54-token instruction, 30 generated tokens)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from peft_ctx.harness import assets
from peft_ctx.inference import template_examples

# Words appended to a question that is shorter than the profile's instruction; ordinary prose, not a special token.
_FILLER = (
    " Please answer briefly and only from the background document, in one short sentence, giving names, dates and"
    " places where the document states them, without any explanation of how the answer was found."
)


@dataclass
class Workload:
    """Passages and questions shared by every method; ``docs_for(i, n)`` are example i's n documents."""

    passages: list[str]
    questions: list[str]
    titles: list[str]
    doc_tokens: int
    instruction_tokens: int

    def docs_for(self, example: int, n_docs: int) -> list[str]:
        start = (example * n_docs) % len(self.passages)
        return [self.passages[(start + j) % len(self.passages)] for j in range(n_docs)]


def _fit(tokenizer, text: str, n_tokens: int) -> str:
    """``text`` cut (or padded with filler prose) to about ``n_tokens`` tokens of ``tokenizer``."""
    if n_tokens < 1:
        raise ValueError(f"Cannot fit a text into {n_tokens} tokens; the profile leaves no room for the question.")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    while len(ids) < n_tokens:
        ids = ids + tokenizer(_FILLER, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:n_tokens]).strip()


def load_passages(tokenizer, n: int, doc_tokens: int, wiki_path: Optional[str] = None) -> tuple[list[str], list[str]]:
    """``n`` Wikipedia lead paragraphs of at least ``doc_tokens`` tokens, each cut to exactly that many tokens."""
    if wiki_path is None:
        wiki_path = assets.wiki_summaries_path()
    with open(wiki_path) as f:
        articles = json.load(f)
    passages, titles = [], []
    for key in sorted(articles):
        extract = (articles[key].get("extract") or "").strip()
        ids = tokenizer(extract, add_special_tokens=False).input_ids
        if len(ids) < doc_tokens:
            continue
        passages.append(tokenizer.decode(ids[:doc_tokens]).strip())
        titles.append(articles[key].get("title") or key)
        if len(passages) == n:
            break
    if len(passages) < n:
        raise ValueError(f"Only {len(passages)} passages of >= {doc_tokens} tokens in {wiki_path}; asked for {n}.")
    return passages, titles


def build_workload(
    tokenizer,
    prompt_template: str,
    n_examples: int,
    max_docs: int,
    doc_tokens: int = 180,
    instruction_tokens: int = 54,
    passages: Optional[list[str]] = None,
    titles: Optional[list[str]] = None,
) -> Workload:
    """Questions whose text-RAG prompt minus its documents is ``instruction_tokens`` long (chat template included).

    ``prompt_template`` is the prompt template the text-RAG baseline uses (xRAG's, as in the
    paper's profile).
    """
    if passages is None:
        passages, titles = load_passages(tokenizer, n_examples * max_docs, doc_tokens)
    titles = titles or [f"passage {i}" for i in range(len(passages))]
    # What the template, chat wrapping and a one-token question cost, so the question gets the rest of the budget.
    probe = template_examples(tokenizer, ["Why?"], [[passages[0]]], prompt_template=prompt_template)[0]
    doc_len = len(tokenizer(passages[0], add_special_tokens=False).input_ids)
    overhead = len(probe.input_ids) - doc_len - len(tokenizer("Why?", add_special_tokens=False).input_ids)
    question_tokens = instruction_tokens - overhead
    questions = []
    for i in range(n_examples):
        title = titles[(i * max_docs) % len(titles)]
        questions.append(_fit(tokenizer, f"What is {title}, and what is it best known for?", question_tokens))
    return Workload(
        passages=passages,
        questions=questions,
        titles=titles,
        doc_tokens=doc_tokens,
        instruction_tokens=instruction_tokens,
    )
