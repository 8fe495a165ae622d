"""A method's training stages: ``StageSettings``, ``train_stage`` (one trl run), ``train_qa``, ``train_method``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch
from datasets import Dataset

from .checkpoints import last_complete_checkpoint
from .collator import ContextDataCollator
from .trainer import ContextSFTConfig, ContextSFTTrainer


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
