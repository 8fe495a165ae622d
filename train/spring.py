# /// script
# requires-python = ">=3.10"
# dependencies = ["peft-ctx"]
# ///
"""Train SPRING virtual tokens with trl (the LLM stays frozen; only the [N, d] token matrix learns).
``--push_to_hub --hub_model_id org/name`` uploads the adapter and its model card at the end.

    python train/spring.py --config train/configs/spring.yaml

Each batch draws k uniformly from ``min_virtual_tokens``..``max_virtual_tokens`` (default 1..N) and puts the first k
tokens between the passages ("[i] passage" lines, at most ``max_passages`` of them) and the question; the loss is on
the answer tokens only. Any option of the YAML file can be given on the command line too (``--max_steps 50``); all of
``peft_ctx.training.ContextSFTConfig`` (= trl.SFTConfig + a_nll, a_kl, kl_temperature) is available.
Data: a JSON / JSONL file, a folder saved with ``datasets``, or a Hub dataset id, with columns ``question``,
``answer`` and ``contexts`` (a list of retrieved passages, best first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoTokenizer, set_seed
from trl import TrlParser

import peft_ctx
from peft_ctx.local_copies import resolve
from peft_ctx.scripts import (
    ModelArguments,
    build_adapter_model,
    load_rows,
    refuse_existing_adapter,
    require_columns,
    train_and_save,
)
from peft_ctx.spring.method import check_range
from peft_ctx.training import ContextDataCollator, ContextSFTConfig

COLUMNS = ("question", "answer", "contexts")


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Base causal LM: Hub id (or a local copy of it) or folder."})
    dataset_name: str = field(metadata={"help": "JSON/JSONL file, datasets folder, or Hub dataset id."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_examples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training rows."})
    adapter_init: Optional[str] = field(
        default=None, metadata={"help": "Continue training this saved SPRING adapter instead of a new one."}
    )
    num_virtual_tokens: int = field(default=50, metadata={"help": "N, the number of virtual tokens of a new adapter."})
    min_virtual_tokens: int = field(default=1, metadata={"help": "Smallest k drawn per batch."})
    max_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Largest k drawn per batch (None: N)."})
    max_passages: Optional[int] = field(
        default=5, metadata={"help": "Keep at most this many passages per example, best first (None: all)."}
    )
    init_text: Optional[str] = field(
        default=None,
        metadata={"help": "Initialise a new adapter's tokens from this text's token embeddings (default: random)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing the adapter into a folder that already holds one."}
    )

    def __post_init__(self):
        if self.max_passages is not None and self.max_passages < 1:
            raise ValueError(
                f"max_passages={self.max_passages}; give a positive number, or None to keep all passages."
            )


def build_model(script_args: ScriptArguments, loading: Optional[ModelArguments] = None):
    def make_config():
        return peft_ctx.SpringConfig(
            num_virtual_tokens=script_args.num_virtual_tokens,
            init_text=script_args.init_text,
            tokenizer_name_or_path=script_args.model_name_or_path if script_args.init_text else None,
            base_model_name_or_path=script_args.model_name_or_path,
        )

    return build_adapter_model(
        script_args.model_name_or_path, script_args.adapter_init, peft_ctx.SpringConfig, make_config, loading
    )


def main(argv: Optional[list[str]] = None) -> str:
    parser = TrlParser((ScriptArguments, ModelArguments, ContextSFTConfig))
    script_args, loading, training_args = parser.parse_args_and_config(args=argv)
    refuse_existing_adapter(training_args.output_dir, script_args.overwrite_output_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve(script_args.model_name_or_path))
    dataset = load_rows(script_args.dataset_name, script_args.dataset_split, script_args.max_examples)
    require_columns(dataset, COLUMNS, "SPRING training")
    if script_args.max_passages is not None:
        # Cut here rather than in the collator, so that a distillation teacher (a_kl > 0) reads the same passages.
        limit = script_args.max_passages
        dataset = dataset.map(lambda row: {"contexts": row["contexts"][:limit]}, desc="Keeping the top passages")
    set_seed(training_args.seed)  # the new tokens' initialisation is part of the run's reproducibility
    model = build_model(script_args, loading)
    config = model.active_peft_config
    # Checked now rather than at the first batch.
    virtual_tokens_range = check_range(
        config, (script_args.min_virtual_tokens, script_args.max_virtual_tokens or config.num_virtual_tokens)
    )
    collator = ContextDataCollator(
        config,
        tokenizer,
        task="qa",
        context_column="contexts",
        text_column="contexts",
        distill=training_args.a_kl > 0,
        max_length=training_args.max_length,
        seed=training_args.seed,
        method_options={"virtual_tokens_range": virtual_tokens_range},
    )
    return train_and_save(
        model,
        training_args,
        dataset,
        collator,
        tokenizer,
        script_args=script_args,
        method_title="SPRING",
    )


if __name__ == "__main__":
    main()
