"""``ContextSFTConfig`` and ``ContextSFTTrainer``: trl's SFT trainer with the answer NLL, self-distillation from
text RAG, the wrong-passage margin, complete checkpoints and peft_ctx's push."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ..config import is_int
from ..distributed import partitioned
from .checkpoints import COMPLETE_MARKER
from .collator import TEACHER_IDS, BudgetReport
from .scoring import answer_logits, row_mean_nll
from .teacher import add_teacher_cache


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


class ContextSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for peft_ctx adapters: answer NLL plus optional self-distillation from text RAG.

    With ``teacher_top_k`` set (and ``a_kl`` > 0) the teacher's top-k log-probs are added to the training rows once,
    here, before the first step (``teacher_cache_seconds`` says how long that took).
    Pushing is not the trainer's job: with ``push_to_hub=True`` it pushes as trl does (trl's card). peft_ctx's model
    card comes from ``peft_ctx.push_to_hub(model, repo_id)``, or, around a trainer, from
    ``peft_ctx.hub.take_push_settings(args)`` before building it and ``peft_ctx.hub.push_after_training(trainer,
    settings)`` after training, as the ``train/`` scripts do (``peft_ctx.scripts.train_and_save``).

    Example::

        collator = ContextDataCollator(model.active_peft_config, tokenizer, distill=True)
        args = ContextSFTConfig(output_dir="out", a_kl=1.0, teacher_top_k=32)  # CPU-only machine: use_cpu, no bf16
        ContextSFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    """

    def __init__(self, *args, **kwargs):
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
