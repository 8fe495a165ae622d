"""Training recipes the demo and the benchmarks run: a cheaper step for frozen-LLM methods, and xRAG's two stages.

The LLM (and the retriever) never change during training, so everything that depends only on them is computed once
instead of every step:

- the retriever's document vectors (a dataset column, as ``train/xrag.py`` does);
- the self-distillation teacher: the frozen LLM reading the passage as text gives the same answer-token
  distribution every epoch, so its top-k log-probabilities are cached per example (``teacher_topk``) and the KL term
  costs no teacher forward pass during training;
- the student's logits: batches are left-padded so that every answer ends the row, and the model computes the
  vocabulary projection only for the answer span (``logits_to_keep``) instead of for every prompt token.

``CachedContextTrainer`` is ``ContextSFTTrainer`` (trl) with that loss; ``CachedContextCollator`` is the shared
``ContextDataCollator`` with left padding and the cached teacher columns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from .inference import build_examples, collate, text_examples
from .prompting import IGNORE_INDEX
from .training import ContextDataCollator, ContextSFTConfig, ContextSFTTrainer, _tensor_docs

TEACHER_IDS, TEACHER_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask of the positions whose logits predict an answer token.  # [batch, seq - 1]"""
    return labels[:, 1:] != IGNORE_INDEX


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
        keep_from = int(_first_label(labels))
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with disable() if disable is not None else _nullcontext():
            logits = model(**batch, use_cache=False, logits_to_keep=labels.shape[1] - keep_from + 1).logits
        labels = labels[:, labels.shape[1] - logits.shape[1] :]
        log_probs = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
        top = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
        mask = _answer_positions(labels)
        for row in range(labels.shape[0]):
            out.append((top.indices[row][mask[row]].tolist(), top.values[row][mask[row]].tolist()))
        bar.update(labels.shape[0])
    bar.close()
    return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _first_label(labels: torch.Tensor) -> int:
    """The first sequence position holding an answer label in any row of a left-padded batch."""
    has = (labels != IGNORE_INDEX).any(0)
    if not has.any():
        raise ValueError("The batch has no answer tokens to train on.")
    return int(has.nonzero()[0])


@dataclass
class CachedContextCollator(ContextDataCollator):
    """``ContextDataCollator`` with left padding (answers end every row) and the cached teacher's columns.

    Rows may carry ``teacher_topk_ids`` / ``teacher_topk_logprobs`` (from ``teacher_topk``); ``distill`` then reads
    those instead of building a text-RAG prompt for a teacher forward pass.
    """

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        self._rng = self._batch_rng(rows)
        if self.task == "paraphrase":
            examples = [self._paraphrase_example(row) for row in rows]
        else:
            examples = build_examples(
                self.config,
                self.tokenizer,
                [row["question"] for row in rows],
                [_tensor_docs(row[self.context_column]) for row in rows],
                answers=[row["answer"] for row in rows],
                model=self.model,
                **self._options(),
            )
        batch = collate(self.config, examples, self.tokenizer, padding_side="left", max_length=self.max_length)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if self.distill:
            if TEACHER_IDS not in rows[0]:
                raise ValueError(
                    f"distill=True but the rows have no {TEACHER_IDS!r} column; add the cached teacher with "
                    "peft_ctx.recipes.teacher_topk first."
                )
            batch[TEACHER_IDS] = torch.cat([torch.tensor(row[TEACHER_IDS], dtype=torch.long) for row in rows])
            batch[TEACHER_LOGPROBS] = torch.cat(
                [torch.tensor(row[TEACHER_LOGPROBS], dtype=torch.float32) for row in rows]
            )
        return batch


class CachedContextTrainer(ContextSFTTrainer):
    """``ContextSFTTrainer`` whose step computes logits on the answer span only and reads the teacher from cache.

    Loss = a_nll * NLL + a_kl * T^2 * sum_topk p_teacher * (log p_teacher - log p_student), the KL of the xRAG paper
    restricted to the teacher's top-k tokens at each answer position.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        teacher_ids, teacher_logprobs = inputs.pop(TEACHER_IDS, None), inputs.pop(TEACHER_LOGPROBS, None)
        labels = inputs.pop("labels")
        keep = labels.shape[1] - _first_label(labels) + 1
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
        logits = outputs.logits[:, :-1]  # [batch, keep - 1, vocab]: predicts the label after each position
        targets = labels[:, labels.shape[1] - keep + 1 :]
        mask = targets != IGNORE_INDEX
        student_logits, targets = logits[mask].float(), targets[mask]  # [n_answer_tokens, vocab], [n_answer_tokens]
        n_tokens = targets.numel()
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(student_logits.device)
        nll_sum = F.cross_entropy(student_logits, targets, reduction="sum")
        loss = self.args.a_nll * nll_sum / denominator
        self._metrics[mode]["nll"].append((nll_sum / max(n_tokens, 1)).item())
        if teacher_ids is not None and self.args.a_kl > 0:
            if teacher_ids.shape[0] != n_tokens:
                raise ValueError(
                    f"The cached teacher has {teacher_ids.shape[0]} answer tokens for a batch with {n_tokens}; the "
                    "cache was built with another tokenizer or other answers. Rebuild it."
                )
            temperature = self.args.kl_temperature
            student = F.log_softmax(student_logits / temperature, dim=-1).gather(-1, teacher_ids.to(logits.device))
            teacher_logprobs = teacher_logprobs.to(student.device)
            kl_sum = (teacher_logprobs.exp() * (teacher_logprobs - student)).sum() * temperature**2
            loss = loss + self.args.a_kl * kl_sum / denominator
            self._metrics[mode]["kl"].append((kl_sum / max(n_tokens, 1)).item())
        with torch.no_grad():
            accuracy = (student_logits.argmax(-1) == targets).float().mean() if n_tokens else torch.tensor(0.0)
        self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
        return (loss, outputs) if return_outputs else loss


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
    max_chars: Optional[int] = None  # stage 1: passages are cut to this many characters (at a sentence end)
    save_steps: Optional[int] = None  # checkpoints for long runs (resumed automatically)
    options: dict = field(default_factory=dict)  # method options (SPRING's k ...)


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


def run_stage(
    model,
    tokenizer,
    rows: list[dict],
    settings: StageSettings,
    *,
    task: str,
    context_column: str,
    text_column: str,
    output_dir: str,
    name: str,
    seed: int = 0,
    teacher_cache_s: float = 0.0,
    collator=None,
) -> StageReport:
    """Train the active adapter of ``model`` for ``settings.steps`` steps on ``rows`` with the cheaper step.

    ``collator`` replaces the default ``CachedContextCollator`` (e.g. COCOM's pretraining collator); the step computes
    logits from the first answer position on whatever the padding side.
    """
    args = ContextSFTConfig(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(round(settings.warmup_ratio * settings.steps)),
        a_nll=settings.a_nll,
        a_kl=settings.a_kl,
        kl_temperature=settings.kl_temperature,
        logging_steps=max(1, min(10, settings.steps // 10)),
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # trl turns it on by default; a small model on short sequences has memory to spare, and recomputing the
        # forward pass would cost about a third more time per step.
        gradient_checkpointing=False,
    )
    collator = collator or CachedContextCollator(
        model.active_peft_config,
        tokenizer,
        task=task,
        context_column=context_column,
        text_column=text_column,
        distill=settings.a_kl > 0,
        seed=seed,
        method_options=dict(settings.options),
    )
    trainer = CachedContextTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        processing_class=tokenizer,
    )
    from .training import last_complete_checkpoint

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
        cache_seconds=round(teacher_cache_s, 1),
        final_loss=round(losses[-1], 4) if losses else None,
        settings=asdict(settings),
    )


def add_teacher_cache(model, tokenizer, rows: list[dict], settings: StageSettings, batch_size: int = 8) -> float:
    """Fill the teacher columns of QA rows in place (text RAG with the adapter off); returns the seconds it took."""
    start = time.perf_counter()
    cache = teacher_topk(
        model,
        tokenizer,
        model.active_peft_config,
        [r["question"] for r in rows],
        [r["contexts"] for r in rows],
        [r["answer"] for r in rows],
        k=settings.teacher_k,
        temperature=settings.kl_temperature,
        batch_size=batch_size,
    )
    for row, (ids, logprobs) in zip(rows, cache):
        row[TEACHER_IDS], row[TEACHER_LOGPROBS] = ids, logprobs
    return time.perf_counter() - start


def encode_column(encoder, texts: Sequence[str], batch_size: int = 64, desc: str = "Encoding passages") -> list:
    """One ``[[d_r floats]]`` entry per text: the retriever's vectors, computed once for every epoch."""
    vectors = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc):
        vectors.append(
            encoder.encode(list(texts[start : start + batch_size]), batch_size=batch_size, show_progress=False)
        )
    if not vectors:
        return []
    return [[row.tolist()] for row in torch.cat(vectors)]


def train_xrag(
    model,
    tokenizer,
    encoder,
    qa_rows: list[dict],
    corpus: Sequence[str],
    stage1: StageSettings,
    stage2: StageSettings,
    work_dir: str,
    seed: int = 0,
) -> list[StageReport]:
    """xRAG's two stages on the active adapter: paraphrase pretraining on ``corpus``, then QA with self-distillation.

    ``qa_rows`` carry ``question``, ``answer`` and ``contexts`` (the gold passage first); vectors and the teacher
    are computed here, once.
    """
    reports = []
    if stage1.steps > 0:
        n = min(len(corpus), stage1.steps * stage1.batch_size)
        texts = [cut_passage(t, stage1.max_chars) for t in corpus[:n]]
        vectors = encode_column(encoder, texts, desc="Encoding stage-1 passages")
        rows = [{"text": t, "retrieval_embeds": v} for t, v in zip(texts, vectors)]
        reports.append(
            run_stage(
                model,
                tokenizer,
                rows,
                stage1,
                task="paraphrase",
                context_column="retrieval_embeds",
                text_column="text",
                output_dir=os.path.join(work_dir, "stage1"),
                name="xrag stage 1 (paraphrase)",
                seed=seed,
            )
        )
    if stage2.steps > 0:
        n = min(len(qa_rows), stage2.steps * stage2.batch_size)
        rows = [dict(r) for r in qa_rows[:n]]
        vectors = encode_column(encoder, [r["contexts"][0] for r in rows], desc="Encoding QA passages")
        for row, vector in zip(rows, vectors):
            row["retrieval_embeds"] = vector
        cache_s = add_teacher_cache(model, tokenizer, rows, stage2) if stage2.a_kl > 0 else 0.0
        reports.append(
            run_stage(
                model,
                tokenizer,
                rows,
                stage2,
                task="qa",
                context_column="retrieval_embeds",
                text_column="contexts",
                output_dir=os.path.join(work_dir, "stage2"),
                name="xrag stage 2 (QA + self-distillation)",
                seed=seed,
                teacher_cache_s=cache_s,
            )
        )
    return reports


def train_qa(
    model, tokenizer, qa_rows: list[dict], settings: StageSettings, work_dir: str, name: str, seed: int = 0
) -> list[StageReport]:
    """Any method on (question, passages as text, answer) rows, with the cached teacher when ``a_kl`` > 0."""
    if settings.steps <= 0:
        return []
    n = min(len(qa_rows), settings.steps * settings.batch_size)
    rows = [dict(r) for r in qa_rows[:n]]
    cache_s = add_teacher_cache(model, tokenizer, rows, settings) if settings.a_kl > 0 else 0.0
    return [
        run_stage(
            model,
            tokenizer,
            rows,
            settings,
            task="qa",
            context_column="contexts",
            text_column="contexts",
            output_dir=os.path.join(work_dir, "qa"),
            name=name,
            seed=seed,
            teacher_cache_s=cache_s,
        )
    ]


def as_dict(report: StageReport) -> dict[str, Any]:
    return asdict(report)
