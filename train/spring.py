# /// script
# requires-python = ">=3.10"
# dependencies = ["peft-ctx"]
# ///
"""Train SPRING virtual tokens with trl (the LLM stays frozen; only the [N, d] token matrix learns).
``--push_to_hub --hub_model_id org/name`` uploads the adapter and its model card at the end.

    python train/spring.py --config train/configs/spring.yaml

The paper's recipe by default: plain-text prompts (no chat template), 1-5 of each example's top 5 passages in random
order, tokens initialised from an instruction's embeddings. Each batch draws k uniformly from
``min_virtual_tokens``..``max_virtual_tokens`` (default 1..N) and puts the first k tokens between the passages
("[i] passage" lines) and the question; the loss is on the answer tokens only. Any option of the YAML file can be
given on the command line too (``--max_steps 50``); all of ``peft_ctx.training.ContextSFTConfig`` (= trl.SFTConfig +
a_nll, a_kl, kl_temperature) is available.
Data: a JSON / JSONL file, a folder saved with ``datasets``, or a Hub dataset id, with columns ``question``,
``answer`` and ``contexts`` (a list of retrieved passages, best first).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Optional

from transformers import set_seed

import peft_ctx
from peft_ctx import scripts
from peft_ctx.spring.method import check_range
from peft_ctx.training import ContextDataCollator

COLUMNS = ("question", "answer", "contexts")
# A new adapter's tokens start from this instruction's token embeddings, as the paper's start from an instruction's
# (our wording).
INIT_INSTRUCTION = "According to the passages above, answer the question below."


@dataclass
class ScriptArguments(scripts.TrainScriptArguments):
    dataset_name: str = field(metadata={"help": "JSON/JSONL file, datasets folder, or Hub dataset id."})
    num_virtual_tokens: int = field(default=50, metadata={"help": "N, the number of virtual tokens of a new adapter."})
    min_virtual_tokens: int = field(default=1, metadata={"help": "Smallest k drawn per batch."})
    max_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Largest k drawn per batch (None: N)."})
    max_passages: Optional[int] = field(
        default=5, metadata={"help": "Keep at most this many passages per example, best first (None: all)."}
    )
    min_passages: Optional[int] = field(
        default=1,
        metadata={
            "help": "The paper's sampling: each example keeps a random number of passages between min_passages and "
            "max_passages, from its top max_passages, in random order (seeded per row). None: the top max_passages "
            "in retrieval order."
        },
    )
    init_text: Optional[str] = field(
        default=INIT_INSTRUCTION,
        metadata={
            "help": "Initialise a new adapter's tokens from this text's token embeddings (the paper starts from an "
            "instruction's); an empty string: random vocabulary rows."
        },
    )
    use_chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap prompts in the tokenizer's chat template; the paper and its released tokens use plain text."
        },
    )

    def __post_init__(self):
        if self.max_passages is not None and self.max_passages < 1:
            raise ValueError(
                f"max_passages={self.max_passages}; give a positive number, or None to keep all passages."
            )
        if self.min_passages is not None and (
            self.min_passages < 1 or self.max_passages is None or self.min_passages > self.max_passages
        ):
            raise ValueError(
                f"min_passages={self.min_passages} with max_passages={self.max_passages}; give 1 <= min_passages <= "
                "max_passages, or min_passages None for the top passages in order."
            )
        self.init_text = self.init_text or None


def choose_passages(row: dict, index: int, low: Optional[int], high: int, seed: int) -> dict:
    """Row ``index``'s passages: the top ``high`` in order, or (``low`` given) a random number of them between ``low``
    and ``high``, shuffled, drawn from the seed and the row's index only."""
    top = list(row["contexts"][:high])
    if low is None or not top:
        return {"contexts": top}
    rng = random.Random(f"{seed}:{index}")
    chosen = rng.sample(top, rng.randint(min(low, len(top)), len(top)))  # a random subset, in random order
    return {"contexts": chosen}


def build_model(script_args: ScriptArguments, loading: Optional[scripts.ModelArguments] = None):
    def make_config():
        return peft_ctx.SpringConfig(
            num_virtual_tokens=script_args.num_virtual_tokens,
            use_chat_template=script_args.use_chat_template,
            init_text=script_args.init_text,
            tokenizer_name_or_path=script_args.model_name_or_path if script_args.init_text else None,
            base_model_name_or_path=script_args.model_name_or_path,
        )

    return scripts.build_adapter_model(
        script_args.model_name_or_path, script_args.adapter_init, peft_ctx.SpringConfig, make_config, loading
    )


def main(argv: Optional[list[str]] = None) -> str:
    script_args, loading, training_args, tokenizer = scripts.parse_script(ScriptArguments, argv)
    dataset = scripts.load_rows(script_args.dataset_name, script_args.dataset_split, script_args.max_examples)
    scripts.require_columns(dataset, COLUMNS, "SPRING training")
    if script_args.max_passages is not None:
        # Chosen here rather than in the collator, so that a distillation teacher (a_kl > 0) reads the same passages.
        dataset = dataset.map(
            functools.partial(
                choose_passages, low=script_args.min_passages, high=script_args.max_passages, seed=training_args.seed
            ),
            with_indices=True,
            desc="Choosing the passages",
        )
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
        method_options={"virtual_tokens_range": virtual_tokens_range},
        **scripts.collator_settings(training_args),
    )
    return scripts.train_and_save(model, training_args, dataset, collator, tokenizer, script_args=script_args)


if __name__ == "__main__":
    main()
