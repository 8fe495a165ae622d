"""The training rows' collator: prompts with context slots, labels, teacher inputs, the wrong-passage rows and
the token budget (``ContextDataCollator``)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..config import ContextConfig
from ..inference import build_examples, collate, text_examples
from ..methods import get_method
from ..prompting import Example, pad_examples, pad_token_id, position_ids

# The columns of the teacher cache (teacher.add_teacher_cache) that the collator turns into teacher inputs.
TEACHER_IDS, TEACHER_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"
PADDING_SIDES = ("left", "right")
TEACHERS = ("text", "cached")


def _tensor_docs(value: Any) -> Any:
    # datasets hands stored vectors back as nested lists
    is_matrix = isinstance(value, list) and value and isinstance(value[0], list) and value[0]
    if is_matrix and isinstance(value[0][0], float):
        return torch.tensor(value, dtype=torch.float32)
    return value


def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


class _LongestDraw(random.Random):
    """The draws that make the longest example: the top of a ``randint`` range, the longest ``choice``."""

    def randint(self, a: int, b: int) -> int:
        return b

    def choice(self, seq):
        return max(seq, key=len)


@dataclass
class BudgetReport:
    """What ``ContextDataCollator.fit_to_budget`` did to a dataset: rows truncated (passage tokens cut) and skipped."""

    rows: int = 0
    truncated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    passage_tokens_cut: int = 0

    def summary(self) -> str:
        text = (
            f"Token budget: {len(self.truncated)} of {self.rows} rows truncated ({self.passage_tokens_cut} passage "
            f"tokens cut), {len(self.skipped)} skipped (no room even for one passage token)"
        )
        if self.skipped:
            shown = ", ".join(map(str, self.skipped[:20])) + (" ..." if len(self.skipped) > 20 else "")
            text += f": rows {shown}"
        return text + "."


@dataclass
class ContextDataCollator:
    """Turns dataset rows into model batches (labels on the answer only).

    Rows: ``question``, ``answer`` and the documents in ``context_column`` (texts, or vectors for xRAG). A method's
    other tasks are subclasses that build their own ``examples`` (xRAG's paraphrase batches, COCOM's pretraining).
    With ``distill=True`` the batch also carries the teacher: with ``teacher="text"`` its text-RAG prompt
    (``teacher_*`` keys, built from the texts in ``text_column``) for a live teacher pass; with ``teacher="cached"``
    the rows' cached top-k log-probs (``ContextSFTTrainer`` adds them when ``teacher_top_k`` is set, and then sets
    ``teacher="cached"`` itself). ``padding_side="left"`` also adds ``position_ids`` that skip the padding.
    """

    config: ContextConfig
    tokenizer: Any
    task: str = "qa"
    context_column: str = "contexts"
    text_column: str = "contexts"
    distill: bool = False
    teacher: str = "text"
    padding_side: str = "right"
    max_length: Optional[int] = None
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    # The PeftModel, for methods that read documents with the adapter's own parts (COCOM-light's encoder tokenizer);
    # ContextSFTTrainer fills it in when left None.
    model: Any = None
    # A peft_ctx.vectors.VectorIndex: the rows' context_column then holds a row number of that on-disk index, read
    # per batch (xRAG's document vectors at scale), instead of the vectors themselves.
    vector_index: Any = None
    # QA only: the batch also carries each row read with the next row's documents (``wrong_*`` keys), for the margin
    # term (ContextSFTConfig.a_margin; the trainer switches it on).
    wrong_passage: bool = False
    # The tasks this collator builds (a subclass builds its own in ``examples``).
    tasks: ClassVar[tuple[str, ...]] = ("qa",)

    def __post_init__(self):
        if self.task not in self.tasks:
            raise ValueError(f"task={self.task!r}; use one of {', '.join(map(repr, self.tasks))}.")
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side={self.padding_side!r}; use 'left' or 'right'.")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r}; use 'text' (a live teacher pass) or 'cached'.")

    def _options(self) -> dict:
        return get_method(self.config.method).training_options(self.config, self._rng, self.method_options)

    def _batch_rng(self, rows: list[dict]) -> random.Random:
        # Random choices (templates, SPRING's k) depend on the seed and the batch's content only, never on how many
        # batches came before: a resumed run or another process count draws exactly what the uninterrupted run drew.
        key = json.dumps([[row.get(c) for c in ("question", "answer", self.text_column)] for row in rows], default=str)
        return random.Random(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest())

    def examples(self, rows: list[dict]) -> list[Example]:
        """The batch's tokenised examples before padding (subclasses build other tasks here)."""
        return build_examples(
            self.config,
            self.tokenizer,
            [row["question"] for row in rows],
            [self._docs(row) for row in rows],
            answers=[row["answer"] for row in rows],
            model=self.model,
            **self._options(),
        )

    def _docs(self, row: dict) -> Any:
        if self.vector_index is not None:
            return self.vector_index[row[self.context_column]]  # [n_vectors, d_r], read from disk
        return _tensor_docs(row[self.context_column])

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        self._rng = self._batch_rng(rows)
        batch = self.pad(self.examples(rows))
        if self.distill:
            batch.update(self._teacher(rows))
        if self.wrong_passage:
            if len(rows) < 2:
                raise ValueError(
                    f"The wrong-passage margin needs batches of two rows or more, got {len(rows)}: each row reads the "
                    "next row's passages."
                )
            batch.update({f"wrong_{key}": value for key, value in self.pad(self.wrong_examples(rows)).items()})
        return batch

    def wrong_examples(self, rows: list[dict]) -> list[Example]:
        """The batch's examples with each row reading the next row's documents (same question, same answer)."""
        if self.task != "qa":
            raise ValueError(f"The wrong-passage margin is for QA batches here, not task={self.task!r}.")
        self._rng = self._batch_rng(rows)  # the same draws (templates, SPRING's k) as the row's own example
        return self.examples(
            [
                dict(row, **{self.context_column: rows[(i + 1) % len(rows)][self.context_column]})
                for i, row in enumerate(rows)
            ]
        )

    def pad(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Examples padded into a batch on this collator's side (left also gets ``position_ids``)."""
        batch = collate(
            self.config, examples, self.tokenizer, padding_side=self.padding_side, max_length=self.max_length
        )
        if self.padding_side == "left":
            batch["position_ids"] = position_ids(batch["attention_mask"])
        return batch

    # ---- the token budget ----------------------------------------------------------------------------------------
    def passage_columns(self) -> tuple[str, ...]:
        """The columns holding passage text that the budget may cut (the context column too when it is text)."""
        return tuple(dict.fromkeys((self.context_column, self.text_column)))

    def measure(self, row: dict) -> tuple[int, int]:
        """(student prompt tokens, teacher prompt tokens or 0) of one row, with every random draw at its longest
        (SPRING's largest k, xRAG's longest paraphrase instruction): a row that fits here fits in any batch."""
        saved = getattr(self, "_rng", None)
        self._rng = _LongestDraw()
        try:
            student = len(self.examples([row])[0].input_ids)
        finally:
            self._rng = saved
        teacher = 0
        if self.distill and self.task == "qa":
            teacher = len(self._teacher_examples([row])[0].input_ids)
        return student, teacher

    def fit_to_budget(
        self, rows: Dataset, max_length: Optional[int], teacher_max_length: Optional[int] = None
    ) -> tuple[Dataset, BudgetReport]:
        """``rows`` with every row within the token budget: ``max_length`` tokens for the student's prompt plus
        answer, ``teacher_max_length`` (default: ``max_length``) for the text-RAG teacher's.

        The rule: a row over budget loses passage tokens first, from the end of its last passage backwards (a passage
        cut to nothing is dropped, with its vector when the context column holds one vector per passage), keeping as
        many as fit; the question and the answer are never cut. A row that does not fit even with one passage token
        left is skipped. The report counts both and names the skipped rows' indices.
        """
        report = BudgetReport(rows=len(rows))
        if max_length is None:
            return rows, report
        teacher_budget = teacher_max_length or max_length
        kept = []
        for index in tqdm(range(len(rows)), desc="Checking the token budget", disable=len(rows) < 1000):
            fitted, cut = self._fit_row(rows[index], max_length, teacher_budget)
            if fitted is None:
                report.skipped.append(index)
                continue
            if cut:
                report.truncated.append(index)
                report.passage_tokens_cut += cut
            kept.append(fitted)
        if not report.truncated and not report.skipped:
            return rows, report
        return Dataset.from_list(kept), report

    def _fits(self, row: dict, budget: int, teacher_budget: int) -> bool:
        try:
            student, teacher = self.measure(row)
        except ValueError:  # e.g. a method that needs documents, given none
            return False
        return student <= budget and teacher <= teacher_budget

    def _fit_row(self, row: dict, budget: int, teacher_budget: int) -> tuple[Optional[dict], int]:
        """(the row within budget or None if it cannot fit, passage tokens cut)."""
        if self._fits(row, budget, teacher_budget):
            return row, 0
        columns = [c for c in self.passage_columns() if _is_text(row.get(c))]
        if not columns:
            return None, 0
        lists = {c: [row[c]] if isinstance(row[c], str) else list(row[c]) for c in columns}
        tokens = [self.tokenizer(p, add_special_tokens=False).input_ids for p in lists[columns[0]]]
        total = sum(map(len, tokens))

        def cut(keep: int) -> dict:
            new = dict(row)
            counts, left = [], keep
            for ids in tokens:
                counts.append(min(len(ids), left))
                left -= counts[-1]
            n_docs = sum(1 for c in counts if c > 0)
            for column, passages in lists.items():
                texts = [self.tokenizer.decode(ids[:c]) if c < len(ids) else text
                         for ids, c, text in zip(tokens, counts, passages)][:n_docs]  # fmt: skip
                new[column] = texts[0] if isinstance(row[column], str) else texts
            vectors = row.get(self.context_column)
            if self.context_column not in lists and isinstance(vectors, list) and len(vectors) == len(tokens):
                new[self.context_column] = vectors[:n_docs]  # one vector per passage: drop the dropped ones'
            return new

        if total == 0 or not self._fits(cut(1), budget, teacher_budget):
            return None, 0
        low, high = 1, total  # cut(low) fits, cut(total) does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._fits(cut(middle), budget, teacher_budget) else (low, middle)
        return cut(low), total - low

    def _teacher_examples(self, rows: list[dict]) -> list[Example]:
        return text_examples(
            self.config,
            self.tokenizer,
            [row["question"] for row in rows],
            [row[self.text_column] for row in rows],
            answers=[row["answer"] for row in rows],
        )

    def _teacher(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.teacher == "cached":
            if TEACHER_IDS not in rows[0]:
                raise ValueError(
                    f"teacher='cached' but the rows have no {TEACHER_IDS!r} column; set teacher_top_k in "
                    "ContextSFTConfig (the trainer caches the teacher) or add it with "
                    "peft_ctx.training.add_teacher_cache."
                )
            return {
                TEACHER_IDS: torch.cat([torch.tensor(row[TEACHER_IDS], dtype=torch.long) for row in rows]),
                TEACHER_LOGPROBS: torch.cat(
                    [torch.tensor(row[TEACHER_LOGPROBS], dtype=torch.float32) for row in rows]
                ),
            }
        if self.task != "qa":
            raise ValueError("distill=True needs task='qa': the teacher reads the question and its passages as text.")
        teacher = self._teacher_examples(rows)
        padded = pad_examples(teacher, pad_token_id(self.tokenizer), padding_side=self.padding_side)
        out = {f"teacher_{key}": padded[key] for key in ("input_ids", "attention_mask", "labels")}
        if self.padding_side == "left":
            out["teacher_position_ids"] = position_ids(padded["attention_mask"])
        return out
