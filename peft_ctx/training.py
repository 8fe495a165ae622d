"""The one training stack: a collator that builds context-slot prompts, and a trl ``SFTTrainer`` with the loss.

Loss = a_nll * NLL(answer | compressed context) + a_kl * T^2 * KL(teacher || student) over the answer tokens, where
the teacher is the same frozen LLM reading the documents as text (the adapter disabled) and the student reads the
adapter's context slots (xRAG's self-distillation; a_kl = 0 gives plain answer NLL). Options of the one stack:

- the teacher: a live pass every step over the text-RAG prompt (the exact KL), or, with ``teacher_top_k``, the
  teacher's top-k answer-token log-probs computed once before training (the LLM is frozen, so they never change) and
  the KL restricted to those tokens;
- the logits: by default only for the answer span (``logits_to_keep``), not for every prompt token;
- padding: right, or left (every answer then ends its row, which keeps the answer span short).

The training scripts (``train/*.py``), the methods' multi-stage recipes (``<method>/recipe.py``, which the demo and
the scripts both call) and the benchmarks all run this collator and this trainer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm
from trl import SFTConfig, SFTTrainer

from .config import ContextConfig, is_int
from .distributed import partitioned
from .hub import push_after_training, take_push_settings
from .inference import build_examples, collate, text_examples, with_resources
from .methods import get_method
from .prompting import IGNORE_INDEX, Example, pad_examples, pad_token_id, position_ids, tokenize_parts

TEACHER_IDS, TEACHER_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"
PADDING_SIDES = ("left", "right")
TEACHERS = ("text", "cached")

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

    Rows for ``task="qa"``: ``question``, ``answer`` and the documents in ``context_column`` (texts, or vectors for
    xRAG). Rows for ``task="paraphrase"``: the document's vectors in ``context_column`` and its text in
    ``text_column``; the answer is the document itself (xRAG stage 1).
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
    tasks: ClassVar[tuple[str, ...]] = ("qa", "paraphrase")

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
        if self.task == "paraphrase":
            return [self._paraphrase_example(row) for row in rows]
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
        (SPRING's largest k, the longest paraphrase instruction): a row that fits here fits in any batch."""
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

    def _paraphrase_example(self, row: dict):
        method = get_method(self.config.method)
        options = with_resources(self.config, self._options(), tokenizer=self.tokenizer, model=self.model)
        docs = method.prepare_docs(self.config, [self._docs(row)], options)[0]
        fields, payload = method.prompt_fields(self.config, docs, options)
        template = self._rng.choice(PARAPHRASE_TEMPLATES)
        before, after = template.split("{context}")
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


@dataclass
class ContextSFTConfig(SFTConfig):
    """``trl.SFTConfig`` plus the loss weights and teacher options of context-compression training.

    Unlike trl's default, ``bf16`` is only switched on where a GPU supports it, and a machine with no accelerator
    trains on the CPU (``use_cpu``) without being told, so one YAML file serves both.
    """

    a_nll: float = field(default=1.0, metadata={"help": "Weight of the answer NLL term."})
    a_kl: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(teacher || student) self-distillation on answer tokens (xRAG stage 2: 2.0)."},
    )
    kl_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the distillation term."})
    teacher_top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": "With a_kl > 0: None runs the text-RAG teacher every step (the exact KL); k computes the "
            "teacher's top-k answer-token log-probs once before training and restricts the KL to them."
        },
    )
    teacher_max_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "Token budget of the text-RAG teacher's prompt plus answer (a_kl > 0); None: max_length. Rows "
            "over either budget lose passage tokens first (the trainer counts them); rows that cannot fit are skipped."
        },
    )
    a_margin: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the wrong-passage margin (QA): each row's mean answer NLL with its own passages must "
            "be `margin` nats below its NLL with the next row's, so an answer guessable from the question alone "
            "stops paying. 0: off."
        },
    )
    margin: float = field(default=1.0, metadata={"help": "The margin in nats per answer token (with a_margin > 0)."})
    answer_logits_only: bool = field(
        default=True,
        metadata={"help": "Compute the vocabulary projection for the answer span only (logits_to_keep)."},
    )
    bf16: Optional[bool] = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. None (default): on where a CUDA GPU supports bf16 and fp16 is not set, "
            "off elsewhere (on a CPU the base's dtype is chosen by the scripts' --dtype instead)."
        },
    )

    def __post_init__(self):
        # The same config file runs on GPUs and on a CPU-only machine: with no accelerator at all, the CPU is the
        # device (and accelerate then forms its gloo group for multi-process runs, which it does not without it).
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = (
                not self.fp16 and not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            )
        # Our collator needs the raw columns (documents, vectors) that trl would otherwise drop.
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__post_init__()
        for name in ("a_nll", "a_kl", "a_margin", "margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.a_nll == 0 and self.a_kl == 0 and self.a_margin == 0:
            raise ValueError("a_nll, a_kl and a_margin are all 0: nothing to train. Set at least one above 0.")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature={self.kl_temperature} must be > 0.")
        for name in ("max_length", "teacher_max_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name}={value!r}; give a positive number of tokens, or None for no budget.")
        if self.teacher_top_k is not None and (isinstance(self.teacher_top_k, bool) or self.teacher_top_k < 1):
            raise ValueError(f"teacher_top_k={self.teacher_top_k!r}; give a positive int, or None for a live teacher.")


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


def _first_label(labels: torch.Tensor) -> int:
    """The first sequence position holding an answer label in any row of a left-padded batch."""
    has = (labels != IGNORE_INDEX).any(0)
    if not has.any():
        raise ValueError("The batch has no answer tokens to train on.")
    return int(has.nonzero()[0])


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


COMPLETE_MARKER = "peft_ctx_checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def resolve_resume(resume_from_checkpoint, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a folder, or true/auto/last for the newest complete checkpoint in output_dir."""
    if resume_from_checkpoint in (None, False, "", "false", "False", "no"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "auto", "last"):
        return last_complete_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume_from_checkpoint, COMPLETE_MARKER)):
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete peft_ctx checkpoint (no {COMPLETE_MARKER}: the run was "
            "probably killed while writing it); resume from an earlier one or pass --resume_from_checkpoint auto."
        )
    return resume_from_checkpoint


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder that a ContextSFTTrainer finished writing (None if there is none).

    A run killed while writing a checkpoint leaves a folder without the completion marker; it is skipped.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, COMPLETE_MARKER)):
            steps.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def save_adapter(model, output_dir: str, overwrite: bool = False, **kwargs) -> str:
    """``save_pretrained`` into a temporary folder renamed into place: a killed save never looks complete."""
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")) and not overwrite:
        raise FileExistsError(f"{output_dir} already holds an adapter; pass overwrite=True to replace it.")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # peft_ctx never resizes the vocabulary, so PEFT's "auto" check (which looks the base model up on the Hub, or
    # warns offline) has nothing to find.
    kwargs.setdefault("save_embedding_layers", False)
    model.save_pretrained(tmp, **kwargs)
    if os.path.isdir(output_dir):
        # Keep what else the folder holds (checkpoints, logs); replace only the adapter files. The config goes first
        # and comes back last, so a folder caught half-way never looks like a complete adapter.
        config_path = os.path.join(output_dir, "adapter_config.json")
        if os.path.exists(config_path):
            os.remove(config_path)
        names = sorted(os.listdir(tmp), key=lambda name: name == "adapter_config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, output_dir)
    return output_dir


def answer_logits(model, inputs: dict, labels: torch.Tensor, answer_span_only: bool = True):
    """The model's outputs on ``inputs`` and the logits that predict each answer token (``labels`` not
    ``IGNORE_INDEX``), with those tokens; ``answer_span_only`` computes the vocabulary projection from the first
    answer position on.  # outputs, [n_answer_tokens, vocab], [n_answer_tokens]"""
    kwargs = {"logits_to_keep": labels.shape[1] - _first_label(labels) + 1} if answer_span_only else {}
    outputs = model(**inputs, use_cache=False, **kwargs)
    logits = outputs.logits[:, :-1]  # predicts the label after each kept position
    targets = labels[:, labels.shape[1] - logits.shape[1] :]
    mask = targets != IGNORE_INDEX
    return outputs, logits[mask].float(), targets[mask]


def row_mean_nll(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean answer-token NLL from ``answer_logits``' flat outputs (answer tokens row by row).  # [B]"""
    # [n_answer_tokens]: row-major, as answer_logits keeps them (a label in column 0 is never predicted)
    owner = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    if owner.numel() != targets.numel():
        raise ValueError(f"{targets.numel()} answer logits for {owner.numel()} labelled positions; pass their labels.")
    nll = F.cross_entropy(logits, targets, reduction="none")  # [n_answer_tokens]
    zeros = nll.new_zeros(labels.shape[0])
    return zeros.index_add(0, owner, nll) / zeros.index_add(0, owner, torch.ones_like(nll)).clamp_min(1)


def mean_answer_scores(model, batches) -> dict[str, float]:
    """``answer_scores`` averaged over batches (each batch counts once), what the content diagnostics report."""
    scores = [answer_scores(model, batch) for batch in batches]
    if not scores:
        raise ValueError("No batches to score; the content diagnostics need two or more passages.")
    return {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}


def check_diagnostic_passages(passages) -> None:
    if len(passages) < 2:
        raise ValueError(
            f"The diagnostics need two or more passages (each is another's control), got {len(passages)}."
        )


@torch.no_grad()
def answer_scores(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean NLL (nats per answer token) and greedy token accuracy of a labelled batch (``labels`` in ``batch``),
    what the content diagnostics report."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    _, logits, targets = answer_logits(model, inputs, labels)
    nll = F.cross_entropy(logits, targets).item()
    return {"nll": nll, "token_accuracy": (logits.argmax(-1) == targets).float().mean().item()}


class ContextSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for peft_ctx adapters: answer NLL plus optional self-distillation from text RAG.

    With ``teacher_top_k`` set (and ``a_kl`` > 0) the teacher's top-k log-probs are added to the training rows once,
    here, before the first step (``teacher_cache_seconds`` says how long that took).
    With ``push_to_hub=True`` the adapter is published by ``peft_ctx.push_to_hub`` with peft_ctx's model card when
    ``push_to_hub()`` is called (the Trainer's own push would upload trl's card over ours at every save).

    Example::

        collator = ContextDataCollator(model.active_peft_config, tokenizer, distill=True)
        args = ContextSFTConfig(output_dir="out", a_kl=1.0, teacher_top_k=32)  # CPU-only machine: use_cpu, no bf16
        ContextSFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    """

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.hub_settings = take_push_settings(training_args) if training_args is not None else None
        super().__init__(*args, **kwargs)
        collator = self.data_collator
        if hasattr(collator, "model") and collator.model is None:
            collator.model = self.model
        self.budget_report = BudgetReport()
        if isinstance(self.train_dataset, Dataset) and hasattr(collator, "fit_to_budget"):
            self.train_dataset, self.budget_report = collator.fit_to_budget(
                self.train_dataset, self.args.max_length, self.args.teacher_max_length
            )
            if self.budget_report.truncated or self.budget_report.skipped:
                print(self.budget_report.summary(), flush=True)
        self._budget_logged = False
        self.teacher_cache_seconds = 0.0
        if self.args.a_margin > 0:
            if not hasattr(collator, "wrong_passage"):
                raise ValueError(
                    "a_margin > 0 needs a ContextDataCollator (task='qa'), which builds the wrong-passage rows."
                )
            collator.wrong_passage = True
        if self.args.a_kl > 0:
            if not getattr(collator, "distill", False):
                raise ValueError(
                    "a_kl > 0 needs teacher inputs: build the collator with ContextDataCollator(distill=True)."
                )
            if self.args.teacher_top_k is not None:
                if partitioned(self.model.parameters()):
                    # The cache is computed here, before the engine exists; partitioned weights cannot run a forward.
                    raise ValueError(
                        f"teacher_top_k={self.args.teacher_top_k} caches the teacher before training, but the model "
                        "was loaded partitioned by DeepSpeed ZeRO-3 (zero3_init_flag: true). Use the live teacher "
                        "(teacher_top_k: null), or load the model whole (zero3_init_flag: false)."
                    )
                self._cache_teacher(collator)

    def _cache_teacher(self, collator) -> None:
        dataset = self.train_dataset
        if TEACHER_IDS in (dataset.column_names or []):
            collator.teacher = "cached"
            return
        start = time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)
        rows = dataset.to_list() if isinstance(dataset, Dataset) else list(dataset)
        add_teacher_cache(
            model,
            collator.tokenizer,
            rows,
            self.args.teacher_top_k,
            self.args.kl_temperature,
            contexts_column=collator.text_column,
            config=collator.config,
        )
        self.train_dataset = Dataset.from_list(rows)
        collator.teacher = "cached"
        self.teacher_cache_seconds = time.perf_counter() - start

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if not self._budget_logged:  # once, in the training log: what the token budget did to the rows
            logs = {**logs, "rows_truncated": len(self.budget_report.truncated)}
            logs["rows_skipped"] = len(self.budget_report.skipped)
            self._budget_logged = True
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            tmp = os.path.join(folder, COMPLETE_MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"global_step": self.state.global_step}, f)
            os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))

    def push_to_hub(self, commit_message: Optional[str] = None, blocking: bool = True, **kwargs):
        """Publish the adapter with peft_ctx's card; a no-op unless the arguments asked for ``push_to_hub``."""
        if commit_message is not None:
            kwargs["commit_message"] = commit_message
        return push_after_training(self, self.hub_settings, **kwargs)

    def _answer_logits(self, model, inputs: dict, labels: torch.Tensor):
        return answer_logits(model, inputs, labels, answer_span_only=self.args.answer_logits_only)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        teacher = {key[len("teacher_") :]: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        cached_ids, cached_logprobs = teacher.pop("topk_ids", None), teacher.pop("topk_logprobs", None)
        wrong = {key[len("wrong_") :]: inputs.pop(key) for key in list(inputs) if key.startswith("wrong_")}
        labels = inputs.pop("labels")
        outputs, student_logits, targets = self._answer_logits(model, inputs, labels)
        n_tokens = targets.numel()
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(student_logits.device)
        nll_sum = F.cross_entropy(student_logits, targets, reduction="sum")
        loss = self.args.a_nll * nll_sum / denominator
        self._metrics[mode]["nll"].append((nll_sum / max(n_tokens, 1)).item())
        if self.args.a_kl > 0:
            temperature = self.args.kl_temperature
            if cached_ids is not None:
                kl_sum = self._cached_kl(student_logits, cached_ids, cached_logprobs, temperature)
            elif teacher:
                kl_sum = self._live_kl(model, teacher, student_logits, targets, temperature)
            else:
                raise ValueError("a_kl > 0 but the batch carries no teacher; build the collator with distill=True.")
            loss = loss + self.args.a_kl * kl_sum / denominator
            self._metrics[mode]["kl"].append((kl_sum / max(n_tokens, 1)).item())
        if self.args.a_margin > 0:
            if not wrong:
                raise ValueError("a_margin > 0 but the batch has no wrong-passage rows; use a ContextDataCollator.")
            wrong_labels = wrong.pop("labels")
            _, wrong_logits, wrong_targets = self._answer_logits(model, wrong, wrong_labels)
            own_nll = row_mean_nll(student_logits, targets, labels)  # [B]
            wrong_nll = row_mean_nll(wrong_logits, wrong_targets, wrong_labels)  # [B]
            hinge = F.relu(self.args.margin - (wrong_nll - own_nll)).mean()
            # Scaled like the NLL term (per answer token), so a_margin weighs the two alike.
            loss = loss + self.args.a_margin * hinge * n_tokens / denominator
            self._metrics[mode]["margin_hinge"].append(hinge.item())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks (as Trainer does).
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            accuracy = (student_logits.argmax(-1) == targets).float().mean() if n_tokens else torch.tensor(0.0)
        self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
        return (loss, outputs) if return_outputs else loss

    def _live_kl(self, model, teacher: dict, student_logits, targets, temperature: float) -> torch.Tensor:
        # The teacher is the same frozen LLM with the adapter off; under DDP/FSDP `model` is a wrapper.
        peft_model = self.accelerator.unwrap_model(model)
        labels = teacher.pop("labels")
        with torch.no_grad(), peft_model.disable_adapter():
            _, teacher_logits, teacher_targets = self._answer_logits(peft_model, teacher, labels)
        if not torch.equal(teacher_targets, targets):
            raise ValueError("Teacher and student prompts tokenised the answers differently; cannot distil.")
        return F.kl_div(
            F.log_softmax(student_logits / temperature, -1),
            F.log_softmax(teacher_logits / temperature, -1),
            log_target=True,
            reduction="sum",
        ) * (temperature**2)

    @staticmethod
    def _cached_kl(student_logits, teacher_ids, teacher_logprobs, temperature: float) -> torch.Tensor:
        """sum_topk p_teacher * (log p_teacher - log p_student): the KL restricted to the teacher's top-k tokens."""
        if teacher_ids.shape[0] != student_logits.shape[0]:
            raise ValueError(
                f"The cached teacher has {teacher_ids.shape[0]} answer tokens for a batch with "
                f"{student_logits.shape[0]}; the cache was built with another tokenizer or other answers. Rebuild it."
            )
        student = F.log_softmax(student_logits / temperature, dim=-1).gather(-1, teacher_ids.to(student_logits.device))
        teacher_logprobs = teacher_logprobs.to(student.device)
        return (teacher_logprobs.exp() * (teacher_logprobs - student)).sum() * temperature**2


# ---- recipes -----------------------------------------------------------------------------------------------------
@dataclass
class StageSettings:
    """One training stage. ``steps`` 0 skips it."""

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    a_nll: float = 1.0
    a_kl: float = 0.0
    kl_temperature: float = 1.0
    teacher_k: int = 32
    a_margin: float = 0.0  # the wrong-passage margin term (ContextSFTConfig.a_margin / margin)
    margin: float = 1.0
    max_chars: Optional[int] = None  # stage 1: passages are cut to this many characters (at a sentence end)
    save_steps: Optional[int] = None  # checkpoints for long runs (resumed automatically)
    options: dict = field(default_factory=dict)  # method options (SPRING's k ...)
    # bf16 autocast (fp32 master weights), for accelerators. On CPUs measure first: 8 COCOM xi=4 steps of SmolLM2-135M
    # on a 2-core AMX Xeon took 54 s with it and 43 s without (the autocast casts cost more than the matmuls save).
    bf16: bool = False


@dataclass
class StageReport:
    name: str
    steps: int
    batch_size: int
    learning_rate: float
    examples: int
    seconds: float
    seconds_per_step: float
    cache_seconds: float
    final_loss: Optional[float]
    settings: dict


def cut_passage(text: str, max_chars: Optional[int]) -> str:
    """The passage's first sentences, at most ``max_chars`` characters (cut word-wise if one sentence is longer)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    if end > max_chars // 3:
        return head[: end + 1]
    return head.rsplit(" ", 1)[0]


def train_stage(
    model,
    tokenizer,
    rows: Union[list[dict], Dataset],
    settings: StageSettings,
    *,
    output_dir: str,
    name: str,
    seed: int = 0,
    collator=None,
    callbacks=None,
) -> StageReport:
    """Train the active adapter of ``model`` for ``settings.steps`` steps on ``rows`` (the recipes' stage runner).

    The default batches are QA rows (``question``, ``answer``, passages as text in ``contexts``), left-padded so that
    every answer ends its row; the step computes logits for the answer span only; with ``a_kl`` > 0 the text-RAG
    teacher's top-k log-probs are computed once, before the first step. ``collator`` replaces the default (a recipe's
    own ``ContextDataCollator``: xRAG's vectors, COCOM's pretraining). ``callbacks`` go to the trainer; the stage's
    ``name`` is its ``run_name``, so that a callback shared by several stages can tell them apart.
    """
    args = ContextSFTConfig(
        output_dir=output_dir,
        run_name=name,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(round(settings.warmup_ratio * settings.steps)),
        a_nll=settings.a_nll,
        a_kl=settings.a_kl,
        kl_temperature=settings.kl_temperature,
        a_margin=settings.a_margin,
        margin=settings.margin,
        teacher_top_k=settings.teacher_k if settings.a_kl > 0 else None,
        logging_steps=max(1, min(10, settings.steps // 10)),
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=settings.bf16,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # trl turns it on by default; a small model on short sequences has memory to spare, and recomputing the
        # forward pass would cost about a third more time per step.
        gradient_checkpointing=False,
    )
    collator = collator or ContextDataCollator(
        model.active_peft_config,
        tokenizer,
        distill=settings.a_kl > 0,
        padding_side="left",
        seed=seed,
        method_options=dict(settings.options),
    )
    trainer = ContextSFTTrainer(
        model=model,
        args=args,
        train_dataset=rows if isinstance(rows, Dataset) else Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
    )
    resume = last_complete_checkpoint(output_dir) if settings.save_steps else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    done = max(1, trainer.state.global_step - (int(os.path.basename(resume).split("-")[1]) if resume else 0))
    model.eval()
    return StageReport(
        name=name,
        steps=trainer.state.global_step,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        examples=len(rows),
        seconds=round(seconds, 1),
        seconds_per_step=round(result.metrics.get("train_runtime", seconds) / done, 3),
        cache_seconds=round(trainer.teacher_cache_seconds, 1),
        final_loss=round(losses[-1], 4) if losses else None,
        settings=asdict(settings),
    )


def train_qa(
    model,
    tokenizer,
    qa_rows: list[dict],
    settings: StageSettings,
    work_dir: str,
    name: str,
    seed: int = 0,
    callbacks=None,
) -> list[StageReport]:
    """One QA stage of any method on (question, passages as text, answer) rows; the cached text-RAG teacher when
    ``a_kl`` > 0."""
    if settings.steps <= 0:
        return []
    n = min(len(qa_rows), settings.steps * settings.batch_size)
    rows = [dict(r) for r in qa_rows[:n]]
    return [
        train_stage(
            model,
            tokenizer,
            rows,
            settings,
            output_dir=os.path.join(work_dir, "qa"),
            name=name,
            seed=seed,
            callbacks=callbacks,
        )
    ]


def train_method(
    method, model, tokenizer, data, stages, work_dir: str, seed: int = 0, callbacks=None
) -> list[StageReport]:
    """Train with ``method``'s own recipe (``ContextMethod.train``), or with one QA stage (``stages["qa"]``) for a
    method that has none."""
    reports = method.train(model, tokenizer, data, stages, work_dir, seed=seed, callbacks=callbacks)
    if reports is None:
        title = method.title or method.name
        reports = train_qa(
            model, tokenizer, data.qa_rows, stages["qa"], work_dir, f"{title} (QA)", seed=seed, callbacks=callbacks
        )
    return reports
