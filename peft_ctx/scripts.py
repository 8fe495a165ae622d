"""What every ``train/*.py`` script shares: its common arguments and their parsing, reading rows, guarding the output
folder, the end of a run (saving, and pushing with peft_ctx's card)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from datasets import Dataset, load_dataset, load_from_disk
from peft import PeftModel, get_peft_model
from transformers import AutoTokenizer
from trl import TrlParser

from . import local_copies
from .distributed import gathered_adapter_state_dict
from .hub import push_after_training, take_push_settings
from .methods import get_method
from .training import ContextSFTConfig, ContextSFTTrainer, resolve_resume, save_adapter


@dataclass(kw_only=True)
class TrainScriptArguments:
    """The arguments every ``train/*.py`` script takes; each script's ``ScriptArguments`` subclasses it with its own
    (keyword-only here, so that a script's own required fields may follow these defaults)."""

    model_name_or_path: str = field(metadata={"help": "Base causal LM: Hub id (or a local copy of it) or folder."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a datasets folder or Hub dataset."})
    max_examples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training rows."})
    adapter_init: Optional[str] = field(
        default=None,
        metadata={
            "help": "Go on training this saved adapter of the script's method instead of a new one (a second stage "
            "starts from the first's)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing the adapter into a folder that already holds one."}
    )


def load_rows(name: str, split: str = "train", max_examples: Optional[int] = None) -> Dataset:
    """A JSON / JSONL file, a folder written by ``datasets``, or a Hub dataset id (or its local copy, listed in
    ``peft_ctx.local_copies``: ``wiki``, the offline Wikipedia paragraphs, after ``make install``); at most
    ``max_examples`` rows."""
    name = local_copies.resolve(name)
    if os.path.isfile(name):
        rows = load_dataset("json", data_files=name, split="train")
    elif os.path.isdir(name):
        data = load_from_disk(name)
        if hasattr(data, "keys"):
            if split not in data:
                raise ValueError(f"{name} has splits {sorted(data.keys())}, not {split!r}; pass --dataset_split.")
            data = data[split]
        rows = data
    else:
        rows = load_dataset(name, split=split)
    if max_examples is not None:
        rows = rows.select(range(min(max_examples, len(rows))))
    return rows


def require_columns(rows: Dataset, columns: tuple[str, ...], what: str) -> None:
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise ValueError(f"{what} needs the column(s) {missing}; the dataset has {rows.column_names}.")


def refuse_existing_adapter(output_dir: str, overwrite: bool) -> None:
    """Fail before any work when the run would replace an adapter the user already has."""
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds an adapter; pass --overwrite_output_dir true or pick another --output_dir."
        )


def collator_settings(training_args) -> dict[str, Any]:
    """What a script's collator takes from the training arguments: the text-RAG teacher's inputs when ``a_kl`` > 0,
    ``max_length`` and the seed of its per-row draws."""
    return {"distill": training_args.a_kl > 0, "max_length": training_args.max_length, "seed": training_args.seed}


def parse_script(script_arguments: type, argv: Optional[list[str]] = None):
    """A script's start: its ``script_arguments``, ``ModelArguments`` and ``ContextSFTConfig`` from the command line
    or ``--config file.yaml`` (``TrlParser``), refused before any work when ``--output_dir`` already holds an adapter
    (unless ``--overwrite_output_dir``), and the base model's tokenizer.

    Returns ``(script_args, loading, training_args, tokenizer)``.

    Example::

        script_args, loading, training_args, tokenizer = parse_script(ScriptArguments, ["--config", "run.yaml"])
    """
    parser = TrlParser((script_arguments, ModelArguments, ContextSFTConfig))
    script_args, loading, training_args = parser.parse_args_and_config(args=argv)
    refuse_existing_adapter(training_args.output_dir, script_args.overwrite_output_dir)
    tokenizer = AutoTokenizer.from_pretrained(local_copies.resolve(script_args.model_name_or_path))
    return script_args, loading, training_args, tokenizer


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# auto takes bf16 on a CPU only where its bf16 matrix products measure at least this much faster than fp32.
CPU_BF16_MIN_SPEEDUP = 1.5


@dataclass
class ModelArguments:
    """How every ``train/*.py`` script loads the base model (the adapter's own weights always train in fp32)."""

    dtype: str = field(
        default="fp32",
        metadata={
            "help": "Base model weights: auto, bf16, fp16 or fp32. auto: bf16 on a GPU that supports it, and on a "
            "CPU whose bf16 matrix products measure at least 1.5x faster than fp32 on this machine; else fp32."
        },
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={
            "help": "transformers attention implementation (eager, sdpa, flash_attention_2, ...); default: "
            "the model's own."
        },
    )
    low_cpu_mem_usage: bool = field(
        default=False, metadata={"help": "Load the weights without a second full copy in memory (large models)."}
    )

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype={self.dtype!r}; choose auto, {', '.join(DTYPES)}.")

    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(self.dtype), "low_cpu_mem_usage": self.low_cpu_mem_usage}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(size: int = 512, repeats: int = 20) -> float:
    """fp32 time over bf16 time of the same matrix products on this CPU (median of ``repeats``): > 1 where bf16
    matrix units (AMX, AVX512-BF16) make bf16 faster, < 1 where bf16 is emulated (AVX2)."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            samples.append(time.perf_counter() - start)
        times[dtype] = sorted(samples)[len(samples) // 2]
    return times[torch.float32] / times[torch.bfloat16]


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``--dtype``; ``auto`` as ``ModelArguments.dtype`` describes it, measured, not assumed."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"dtype={name!r}; choose auto, {', '.join(DTYPES)}.")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP else torch.float32


def build_adapter_model(
    model_name_or_path: str,
    adapter_init: Optional[str],
    config_class: type,
    make_config: Callable[[], Any],
    loading: Optional[ModelArguments] = None,
):
    """The base model (loaded as ``loading`` says: fp32 by default) with a new adapter from ``make_config()``, or with
    the adapter saved at ``adapter_init`` to go on training (refused unless it is a ``config_class`` adapter). The
    adapter's trainable weights are fp32 on any base dtype (peft_ctx's tuner keeps them so)."""
    loading = loading or ModelArguments()
    kwargs = loading.load_kwargs()
    base = local_copies.load_model(model_name_or_path, **kwargs)
    print(f"Loaded {model_name_or_path} in {kwargs['dtype']}", flush=True)
    if not adapter_init:
        return get_peft_model(base, make_config())
    model = PeftModel.from_pretrained(base, adapter_init, is_trainable=True)
    if not isinstance(model.active_peft_config, config_class):
        raise ValueError(
            f"adapter_init={adapter_init!r} is a {type(model.active_peft_config).__name__} adapter; give a "
            f"{config_class.__name__} adapter folder."
        )
    return model


def train_and_save(
    model,
    training_args,
    dataset: Dataset,
    collator,
    tokenizer,
    *,
    script_args: Any,
    method_title: Optional[str] = None,
    **push_kwargs: Any,
) -> str:
    """Train with ``ContextSFTTrainer`` (resuming from the newest complete checkpoint when asked), gather the adapter
    on every rank (whole tensors under FSDP2 / DeepSpeed ZeRO-3), save it atomically on the main process (replacing
    an adapter there only with ``--overwrite_output_dir``), and push it with its model card when ``--push_to_hub``
    was given."""
    # Taken before the Trainer exists, which then does not push itself (trl's card would go over ours at every save).
    push_settings = take_push_settings(training_args)
    trainer = ContextSFTTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
    )
    args = trainer.args
    trainer.train(resume_from_checkpoint=resolve_resume(args.resume_from_checkpoint, args.output_dir))
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Every rank takes part: under FSDP2 / ZeRO-3 the adapter's tensors are shards until gathered.
    state = gathered_adapter_state_dict(model)
    if trainer.is_world_process_zero():
        save_adapter(model, args.output_dir, overwrite=script_args.overwrite_output_dir, state_dict=state)
        tokenizer.save_pretrained(args.output_dir)
        title = method_title or get_method(model.active_peft_config.method).title
        print(f"Saved the {title} adapter to {args.output_dir}")
        push_after_training(
            trainer, push_settings, training_config={"script": script_args}, tokenizer=tokenizer, **push_kwargs
        )
    end_process_group(trainer.accelerator)
    return args.output_dir


def end_process_group(accelerator) -> None:
    """Wait for every rank, then destroy the process group: a rank that left while rank 0 was still saving aborted
    at exit ("terminate called without an active exception", SIGABRT) in one of three full-suite runs, failing
    the launch. A no-op in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
