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

from .checkpoints import COMPLETE_MARKER, last_complete_checkpoint, resolve_resume, save_adapter
from .collator import (
    PADDING_SIDES,
    TEACHER_IDS,
    TEACHER_LOGPROBS,
    TEACHERS,
    BudgetReport,
    ContextDataCollator,
)
from .scoring import answer_logits, answer_scores, check_diagnostic_passages, mean_answer_scores, row_mean_nll
from .stages import StageReport, StageSettings, cut_passage, train_method, train_qa, train_stage
from .teacher import add_teacher_cache, teacher_topk
from .trainer import ContextSFTConfig, ContextSFTTrainer

__all__ = [
    "COMPLETE_MARKER",
    "PADDING_SIDES",
    "TEACHERS",
    "TEACHER_IDS",
    "TEACHER_LOGPROBS",
    "BudgetReport",
    "ContextDataCollator",
    "ContextSFTConfig",
    "ContextSFTTrainer",
    "StageReport",
    "StageSettings",
    "add_teacher_cache",
    "answer_logits",
    "answer_scores",
    "check_diagnostic_passages",
    "cut_passage",
    "last_complete_checkpoint",
    "mean_answer_scores",
    "resolve_resume",
    "row_mean_nll",
    "save_adapter",
    "teacher_topk",
    "train_method",
    "train_qa",
    "train_stage",
]
