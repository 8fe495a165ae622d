"""What every ``train/*.py`` script shares: reading rows, guarding the output folder, the end of a run."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import torch
from datasets import Dataset, load_dataset, load_from_disk
from peft import PeftModel, get_peft_model

from . import local_copies
from .training import ContextSFTTrainer, resolve_resume, save_adapter


def load_rows(name: str, split: str = "train", max_examples: Optional[int] = None) -> Dataset:
    """A JSON / JSONL file, a folder written by ``datasets``, or a Hub dataset id; at most ``max_examples`` rows."""
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


def build_adapter_model(
    model_name_or_path: str, adapter_init: Optional[str], config_class: type, make_config: Callable[[], Any]
):
    """The base model (fp32) with a new adapter from ``make_config()``, or with the adapter saved at
    ``adapter_init`` to go on training (refused unless it is a ``config_class`` adapter)."""
    base = local_copies.load_model(model_name_or_path, dtype=torch.float32)
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
    method_title: str,
    **push_kwargs: Any,
) -> str:
    """Train with ``ContextSFTTrainer`` (resuming from the newest complete checkpoint when asked), save the adapter
    atomically on the main process (replacing an adapter there only with ``--overwrite_output_dir``), and push it with
    its model card when ``--push_to_hub`` was given."""
    trainer = ContextSFTTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
    )
    args = trainer.args
    trainer.train(resume_from_checkpoint=resolve_resume(args.resume_from_checkpoint, args.output_dir))
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter(model, args.output_dir, overwrite=script_args.overwrite_output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"Saved the {method_title} adapter to {args.output_dir}")
        trainer.push_to_hub(training_config={"script": script_args}, tokenizer=tokenizer, **push_kwargs)
    return args.output_dir
