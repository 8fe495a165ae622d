"""Training with trl: a collator that builds context-slot prompts, and an SFTTrainer with the methods' losses.

Loss = a_nll * NLL(answer | compressed context) + a_kl * T^2 * KL(teacher || student) over the answer tokens, where
the teacher is the same frozen LLM reading the documents as text (the adapter disabled) and the student reads the
adapter's context slots (xRAG's self-distillation; a_kl = 0 gives plain answer NLL).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from .config import ContextConfig
from .inference import build_examples, collate, text_examples, with_resources
from .methods import get_method
from .prompting import IGNORE_INDEX, pad_examples, pad_token_id, tokenize_parts

# Stage-1 paraphrase instructions (our wording); "{context}" is where the document's slots go.
PARAPHRASE_TEMPLATES = (
    "Background: {context} means the same as",
    "{context}\nSay the text above again in your own words.",
    "Here is a document: {context}\nRewrite it.",
    "{context}\nWhat does this passage say? Repeat it.",
    "Read this: {context}\nNow write it out in full.",
    "Document: {context}\nReproduce the document.",
    "{context}\nPut the information above into words.",
    "Text: {context}\nParaphrase the text.",
    "The following passage {context} says:",
    "{context}\nRestate the passage above.",
    "Passage: {context}\nWrite the passage down.",
    "Expand this into text: {context}",
    "{context}\nTell me what this is about, in full.",
)


def _tensor_docs(value: Any) -> Any:
    # datasets hands stored vectors back as nested lists
    is_matrix = isinstance(value, list) and value and isinstance(value[0], list) and value[0]
    if is_matrix and isinstance(value[0][0], float):
        return torch.tensor(value, dtype=torch.float32)
    return value


@dataclass
class ContextDataCollator:
    """Turns dataset rows into model batches (right padding, labels on the answer only).

    Rows for ``task="qa"``: ``question``, ``answer`` and the documents in ``context_column`` (texts, or vectors for
    xRAG). Rows for ``task="paraphrase"``: the document's vectors in ``context_column`` and its text in
    ``text_column``; the answer is the document itself (xRAG stage 1 / COCOM auto-encoding).
    With ``distill=True`` the batch also carries the teacher's text-RAG prompt (``teacher_*`` keys), built from the
    texts in ``text_column``.
    """

    config: ContextConfig
    tokenizer: Any
    task: str = "qa"
    context_column: str = "contexts"
    text_column: str = "contexts"
    distill: bool = False
    max_length: Optional[int] = None
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    # The PeftModel, for methods that read documents with the adapter's own parts (COCOM-light's encoder tokenizer);
    # ContextSFTTrainer fills it in when left None.
    model: Any = None

    def __post_init__(self):
        if self.task not in ("qa", "paraphrase"):
            raise ValueError(f"task={self.task!r}; use 'qa' or 'paraphrase'.")

    def _options(self) -> dict:
        return get_method(self.config.method).training_options(self.config, self._rng, self.method_options)

    def _batch_rng(self, rows: list[dict]) -> random.Random:
        # Random choices (templates, SPRING's k) depend on the seed and the batch's content only, never on how many
        # batches came before: a resumed run or another process count draws exactly what the uninterrupted run drew.
        key = json.dumps([[row.get(c) for c in ("question", "answer", self.text_column)] for row in rows], default=str)
        return random.Random(hashlib.sha256(f"{self.seed}:{key}".encode()).hexdigest())

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        self._rng = self._batch_rng(rows)
        if self.task == "paraphrase":
            examples = [self._paraphrase_example(row) for row in rows]
            answers = [row[self.text_column] for row in rows]
        else:
            answers = [row["answer"] for row in rows]
            examples = build_examples(
                self.config,
                self.tokenizer,
                [row["question"] for row in rows],
                [_tensor_docs(row[self.context_column]) for row in rows],
                answers=answers,
                model=self.model,
                **self._options(),
            )
        batch = collate(self.config, examples, self.tokenizer, padding_side="right", max_length=self.max_length)
        if self.distill:
            teacher = text_examples(
                self.config,
                self.tokenizer,
                [row["question"] for row in rows],
                [row[self.text_column] for row in rows],
                answers=answers,
            )
            padded = pad_examples(teacher, pad_token_id(self.tokenizer), padding_side="right")
            batch.update({f"teacher_{key}": padded[key] for key in ("input_ids", "attention_mask", "labels")})
        return batch

    def _paraphrase_example(self, row: dict):
        method = get_method(self.config.method)
        options = with_resources(self.config, self._options(), tokenizer=self.tokenizer, model=self.model)
        docs = method.prepare_docs(self.config, [_tensor_docs(row[self.context_column])], options)[0]
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
    """``trl.SFTConfig`` plus the loss weights of context-compression training."""

    a_nll: float = field(default=1.0, metadata={"help": "Weight of the answer NLL term."})
    a_kl: float = field(
        default=0.0,
        metadata={"help": "Weight of KL(teacher || student) self-distillation on answer tokens (xRAG stage 2: 2.0)."},
    )
    kl_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the distillation term."})

    def __post_init__(self):
        # Our collator needs the raw columns (documents, vectors) that trl would otherwise drop.
        self.remove_unused_columns = False
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__post_init__()
        for name in ("a_nll", "a_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.a_nll == 0 and self.a_kl == 0:
            raise ValueError("a_nll and a_kl are both 0: nothing to train. Set at least one above 0.")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature={self.kl_temperature} must be > 0.")


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict each label token, and those labels.  # [n_answer_tokens, vocab], [n_answer_tokens]"""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


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


class ContextSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for peft_ctx adapters: answer NLL plus optional self-distillation from text RAG.

    With ``push_to_hub=True`` the adapter is published by ``peft_ctx.push_to_hub`` with peft_ctx's model card when
    ``push_to_hub()`` is called (the Trainer's own push would upload trl's card over ours at every save).
    """

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            tmp = os.path.join(folder, COMPLETE_MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"global_step": self.state.global_step}, f)
            os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))

    def __init__(self, *args, **kwargs):
        from .hub import take_push_settings

        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.hub_settings = take_push_settings(training_args) if training_args is not None else None
        super().__init__(*args, **kwargs)
        if hasattr(self.data_collator, "model") and self.data_collator.model is None:
            self.data_collator.model = self.model
        if self.args.a_kl > 0 and not getattr(self.data_collator, "distill", False):
            raise ValueError(
                "a_kl > 0 needs teacher inputs: build the collator with ContextDataCollator(distill=True)."
            )

    def push_to_hub(self, commit_message: Optional[str] = None, blocking: bool = True, **kwargs):
        """Publish the adapter with peft_ctx's card; a no-op unless the arguments asked for ``push_to_hub``."""
        from .hub import push_after_training

        if commit_message is not None:
            kwargs["commit_message"] = commit_message
        return push_after_training(self, self.hub_settings, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        teacher = {key[len("teacher_") :]: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        student_logits, targets = _shifted(outputs.logits, labels)
        n_tokens = targets.numel()
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_tokens, 1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(student_logits.device)
        nll_sum = F.cross_entropy(student_logits.float(), targets, reduction="sum")
        loss = self.args.a_nll * nll_sum / denominator
        self._metrics[mode]["nll"].append((nll_sum / max(n_tokens, 1)).item())
        if teacher and self.args.a_kl > 0:
            temperature = self.args.kl_temperature
            # The teacher is the same frozen LLM with the adapter off; under DDP/FSDP `model` is a wrapper.
            peft_model = self.accelerator.unwrap_model(model)
            with torch.no_grad(), peft_model.disable_adapter():
                teacher_logits = peft_model(
                    input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"], use_cache=False
                ).logits
            teacher_logits, teacher_targets = _shifted(teacher_logits, teacher["labels"])
            if not torch.equal(teacher_targets, targets):
                raise ValueError("Teacher and student prompts tokenised the answers differently; cannot distil.")
            kl_sum = F.kl_div(
                F.log_softmax(student_logits.float() / temperature, -1),
                F.log_softmax(teacher_logits.float() / temperature, -1),
                log_target=True,
                reduction="sum",
            ) * (temperature**2)
            loss = loss + self.args.a_kl * kl_sum / denominator
            self._metrics[mode]["kl"].append((kl_sum / max(n_tokens, 1)).item())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks (as Trainer does).
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            accuracy = (student_logits.argmax(-1) == targets).float().mean() if n_tokens else torch.tensor(0.0)
        self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
        return (loss, outputs) if return_outputs else loss
