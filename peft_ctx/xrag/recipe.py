"""xRAG's training recipe, shared by ``train/xrag.py`` and the demo: paraphrase pretraining, then QA.

- ``paraphrase`` (stage 1): the document's retriever vector in, the document's text out (NLL on the text).
- ``instruct`` (stage 2): question + the passages' vectors in, the answer out, with self-distillation from the same
  frozen LLM reading the passages as text (``a_kl``; the demo caches the teacher's top-k log-probs once).

The retriever is frozen, so its vectors are computed once, up front, into an on-disk index (float16 by default)
that batches read row by row; the ``retrieval_embeds`` column holds each row's number in it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from datasets import Dataset

from ..inference import with_resources
from ..methods import get_method
from ..prompting import Example, tokenize_parts
from ..training import (
    ContextDataCollator,
    StageReport,
    check_diagnostic_passages,
    cut_passage,
    mean_answer_scores,
    train_stage,
)
from ..vectors import VectorIndex, build_vector_index
from .config import STAGES

VECTORS = "retrieval_embeds"

# Stage-1 paraphrase instructions (our wording; the paper's are paraphrase requests too, not requests for a verbatim
# copy); "{context}" is where the document's slots go.
PARAPHRASE_TEMPLATES = (
    "Background: {context} means the same as",
    "{context}\nSay the text above in other words.",
    "Here is a document: {context}\nParaphrase it.",
    "{context}\nWhat does this passage say? Answer in your own words.",
    "Read this: {context}\nNow put it differently.",
    "Document: {context}\nRephrase the document.",
    "{context}\nExpress the information above in other words.",
    "Text: {context}\nParaphrase the text.",
    "The following passage {context} can be rephrased as:",
    "{context}\nRestate the passage above in your own words.",
    "Passage: {context}\nReword the passage.",
    "In other words, {context} says that",
    "{context}\nExplain what this says, in different words.",
)


@dataclass
class XRAGParaphraseCollator(ContextDataCollator):
    """Stage-1 rows -> batches for ``ContextSFTTrainer``: the document's retriever vector in ``context_column`` fills
    the slot of a paraphrase instruction (one of ``PARAPHRASE_TEMPLATES``, drawn per row from the seed and the
    batch's texts), and the answer is the document's text in ``text_column`` (NLL on the text only).

    Example::

        dataset, index = encode_documents([{"text": t} for t in texts], encoder, "paraphrase")
        collator = XRAGParaphraseCollator(model.active_peft_config, tokenizer, vector_index=index)
        batch = collator(dataset.select(range(8)).to_list())
    """

    tasks: ClassVar[tuple[str, ...]] = ("paraphrase",)
    task: str = "paraphrase"
    context_column: str = VECTORS
    text_column: str = "text"

    def examples(self, rows: list[dict]) -> list[Example]:
        return [self.example(row) for row in rows]

    def example(self, row: dict) -> Example:
        """One row's tokenised example: the instruction around the document's slot, the document's text as answer."""
        method = get_method(self.config.method)
        options = with_resources(self.config, self._options(), tokenizer=self.tokenizer, model=self.model)
        docs = method.prepare_docs(self.config, [self._docs(row)], options)[0]
        fields, payload = method.prompt_fields(self.config, docs, options)
        before, after = self._rng.choice(PARAPHRASE_TEMPLATES).split("{context}")
        parts = [before, *fields["context"], after]
        example = tokenize_parts(
            self.tokenizer,
            [p for p in parts if not (isinstance(p, str) and not p)],
            system_prompt=self.config.system_prompt,
            use_chat_template=self.config.use_chat_template,
            answer=row[self.text_column],
        )
        example.context = payload
        return example


def text_column(stage: str) -> str:
    """The column holding the documents' text: one passage (``text``) in stage 1, a list of passages in stage 2."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; choose one of {', '.join(STAGES)}.")
    return "text" if stage == "paraphrase" else "contexts"


def encode_documents(
    dataset: Union[Dataset, list[dict]],
    encoder,
    stage: str,
    batch_size: int = 64,
    *,
    index_dir: Optional[str] = None,
    dtype: torch.dtype = torch.float16,
    chunk_tokens: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Optional[Callable[[], None]] = None,
) -> tuple[Dataset, VectorIndex]:
    """Every document encoded once (the retriever is frozen) into an on-disk ``VectorIndex`` in ``index_dir`` (a
    new temporary folder when None), and the dataset with a ``retrieval_embeds`` column holding each row's number
    in it; give the index to ``collator(..., vector_index=index)``.

    Under several processes every rank calls this and encodes its share (``rank`` of ``world_size``); ``barrier``
    (e.g. accelerate's ``PartialState().wait_for_everyone``) makes each wait for all shards before opening the
    index."""
    if not isinstance(dataset, Dataset):
        dataset = Dataset.from_list(list(dataset))
    column = text_column(stage)
    if column not in dataset.column_names:
        raise ValueError(f"Stage {stage!r} needs a {column!r} column; the dataset has {dataset.column_names}.")
    if world_size > 1 and barrier is None:
        raise ValueError("world_size > 1 needs a barrier (every shard is written before the index opens).")
    index_dir = index_dir or tempfile.mkdtemp(prefix="peft_ctx_vectors_")
    documents = [[d] if stage == "paraphrase" else list(d) for d in dataset[column]]
    build_vector_index(
        index_dir, documents, encoder, dtype=dtype, chunk_tokens=chunk_tokens, batch_size=batch_size,
        rank=rank, world_size=world_size,
    )  # fmt: skip
    if VECTORS in dataset.column_names:
        dataset = dataset.remove_columns(VECTORS)
    dataset = dataset.add_column(VECTORS, list(range(len(dataset))))
    if world_size > 1:
        barrier()
    return dataset, VectorIndex(index_dir)


def collator(config, tokenizer, stage: str, *, distill: bool = False, **kwargs: Any) -> ContextDataCollator:
    """The batches of one stage: vectors in, the document text (stage 1) or the answer (stage 2) out."""
    if stage == "paraphrase" and distill:
        raise ValueError("a_kl > 0 is for stage 2 (instruct); stage 1 trains on the document text with NLL only.")
    if stage == "paraphrase":
        return XRAGParaphraseCollator(config, tokenizer, **kwargs)
    return ContextDataCollator(
        config, tokenizer, context_column=VECTORS, text_column=text_column(stage), distill=distill, **kwargs
    )


def train(
    model, tokenizer, data, stages: Mapping[str, Any], work_dir: str, seed: int = 0, callbacks=None
) -> list[StageReport]:
    """Both stages on the active adapter: paraphrase on ``data.corpus``, then QA with self-distillation on
    ``data.qa_rows`` (each stage's ``StageSettings`` in ``stages``; 0 steps skips it)."""
    reports = []
    for stage in STAGES:
        settings = stages.get(stage)
        if settings is None or settings.steps <= 0:
            continue
        if stage == "paraphrase":
            n = min(len(data.corpus), settings.steps * settings.batch_size)
            rows = [{"text": cut_passage(t, settings.max_chars)} for t in data.corpus[:n]]
        else:
            n = min(len(data.qa_rows), settings.steps * settings.batch_size)
            rows = [{k: r[k] for k in ("question", "answer", "contexts")} for r in data.qa_rows[:n]]
        config = model.active_peft_config
        dataset, index = encode_documents(
            rows, data.encoder, stage, index_dir=os.path.join(work_dir, stage, "vectors"),
            chunk_tokens=config.chunk_tokens,
        )  # fmt: skip
        batches = collator(
            config,
            tokenizer,
            stage,
            distill=settings.a_kl > 0,
            padding_side="left",
            seed=seed,
            method_options=dict(settings.options),
            vector_index=index,
        )
        reports.append(
            train_stage(
                model,
                tokenizer,
                dataset,
                settings,
                output_dir=os.path.join(work_dir, stage),
                name=f"xRAG {stage}",
                seed=seed,
                collator=batches,
                callbacks=callbacks,
            )
        )
    return reports


def diagnostics(model, tokenizer, passages: list[str], encoder, batch_size: int = 8) -> dict[str, float]:
    """Paraphrase NLL and token accuracy of each passage's text from its own vector, against another passage's vector
    (the next one in the list): the gap is what the projector carries of the passage."""
    check_diagnostic_passages(passages)
    config = model.active_peft_config
    # One vector per passage, or one per chunk where the adapter chunks (chunk_tokens), as it reads them at inference.
    vectors = [v.tolist() for v in encoder.encode_chunks(list(passages), config.chunk_tokens, show_progress=False)]
    batches = collator(config, tokenizer, "paraphrase", padding_side="left", model=model)
    out: dict[str, float] = {}
    for suffix, shift in (("", 0), ("_wrong_passage", 1)):
        rows = [{"text": t, VECTORS: vectors[(i + shift) % len(passages)]} for i, t in enumerate(passages)]
        scores = mean_answer_scores(
            model, (batches(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))
        )
        out.update({f"paraphrase_{name}{suffix}": value for name, value in scores.items()})
    return out
