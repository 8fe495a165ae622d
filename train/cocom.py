# /// script
# requires-python = ">=3.10"
# dependencies = ["peft-ctx"]
# ///
"""Train a COCOM or COCOM-light adapter with trl.

Stage 1, pretraining: passages are compressed into context embeddings and the LLM learns to read them, by
auto-encoding (write the passage back after the <AE> marker) and continuation (compress the first part, write what
follows), mixed by --autoencode_ratio (default 0.5):

    python train/cocom.py --config train/configs/cocom_pretrain.yaml

Stage 2, QA fine-tuning on the top-k passages of each question, starting from stage 1:

    python train/cocom.py --config train/configs/cocom_qa.yaml --adapter_init outputs/cocom-pretrain

COCOM-light compresses with a BERT-style encoder instead of the LLM (--compressor
sentence-transformers/all-MiniLM-L6-v2, or any encoder folder / Hub id): train/configs/cocom_light_pretrain.yaml.
ARC-Encoder's setting (a Llama-style encoder read bidirectionally, its last layer pooling, a bridge into the frozen
LLM; reconstruction 20% of the time): train/configs/cocom_arc_pretrain.yaml, which starts the encoder from SmolLM2's
own layers (cocom_arc_pretrain_paper.yaml: Llama-3.2-3B's first 26 layers for Llama-3.1-8B, as the paper).
CLaRa's setting (the PISCO lineage): --pisco_lineage --memory_tokens_per_passage 16; its instruction tuning with the
paper's settings is train/configs/cocom_clara_qa_paper.yaml (or --adapter_init a converted CLaRa release, which brings
its chat prompt).
Any compression rate works (--compression_rate 4, 16, 128 ...). Any option of the YAML file can be given on the
command line too (--max_steps 50); all of ``peft_ctx.training.ContextSFTConfig`` (= trl.SFTConfig + a_nll, a_kl,
kl_temperature, teacher_top_k) is available; a_kl > 0 in stage 2 distils from the frozen LLM reading the passages as
text. The stages and their batches are ``peft_ctx.cocom.recipe``'s, which the demo runs too.

Data: stage 1 takes "wiki" (10,033 Wikipedia lead paragraphs, offline: ``make install`` lists them in
``peft_ctx.local_copies``), a text file (one passage a line), a JSON /
JSONL file or a ``datasets`` folder with a ``text`` column; stage 2 a JSON / JSONL file or ``datasets`` folder with
``question``, ``answer`` and ``contexts`` (the retrieved passages, best first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from datasets import Dataset
from transformers import set_seed

import peft_ctx
from peft_ctx import scripts
from peft_ctx.cocom import CocomConfig, recipe
from peft_ctx.cocom.convert import PISCO_LINEAGE

STAGES = recipe.STAGES


@dataclass
class ScriptArguments(scripts.TrainScriptArguments):
    dataset_name: str = field(
        metadata={"help": "Stage 1: 'wiki', a text / JSON / JSONL file or datasets folder; stage 2: QA rows."}
    )
    stage: str = field(default="pretrain", metadata={"help": "'pretrain' (stage 1) or 'qa' (stage 2)."})
    compression_rate: int = field(default=16, metadata={"help": "New adapter: tokens per context embedding (xi)."})
    compressor: Optional[str] = field(
        default=None,
        metadata={
            "help": "New adapter: None = the LLM compresses (COCOM); an encoder Hub id or folder "
            "('sentence-transformers/all-MiniLM-L6-v2') = COCOM-light."
        },
    )
    compressor_type: str = field(
        default="encoder",
        metadata={
            "help": "New COCOM-light adapter: 'encoder' (a BERT-style encoder, states concatenated and projected) or "
            "'arc' (ARC-Encoder: a Llama-style --compressor read bidirectionally, its last layer pooling, a bridge "
            "to the frozen LLM; use --lora_r 0)."
        },
    )
    bridge_hidden_size: int = field(default=2048, metadata={"help": "New ARC adapter: the bridge's inner width."})
    compressor_layers: Optional[int] = field(
        default=None, metadata={"help": "New ARC adapter: keep the encoder's first N layers (ARC: 26 of 28)."}
    )
    max_passage_tokens: int = field(default=128, metadata={"help": "New adapter: passages are cut to this length."})
    lora_r: int = field(default=16, metadata={"help": "New adapter: LoRA rank on the LLM (0: LLM frozen)."})
    lora_alpha: float = field(default=32, metadata={"help": "New adapter: LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "New adapter: LoRA dropout."})
    passage_special_tokens: bool = field(
        default=True,
        metadata={
            "help": "New COCOM adapter: the compressor reads <ENC> BOS passage EOS, as the public COCOM code does "
            "(false: <ENC> passage)."
        },
    )
    pisco_lineage: bool = field(
        default=False,
        metadata={
            "help": "New COCOM adapter: the PISCO lineage's settings, as CLaRa's releases have them (<ENC><s>passage"
            "</s> truncated as one sequence at left-padded positions, <SEP> after each passage, separate compressor "
            "and decoder LoRAs); give --memory_tokens_per_passage too."
        },
    )
    memory_tokens_per_passage: Optional[int] = field(
        default=None,
        metadata={"help": "New COCOM adapter: this many context embeddings for every passage (CLaRa: 256 / xi)."},
    )
    separate_compressor_adapter: bool = field(
        default=False, metadata={"help": "New COCOM adapter: separate compressor and decoder LoRAs (as PISCO)."}
    )
    residual_pooling: bool = field(
        default=False,
        metadata={
            "help": "New COCOM adapter: context embeddings = the passage's token embeddings mean-pooled by xi + a "
            "learned correction that starts at zero."
        },
    )
    residual_source: str = field(
        default="memory",
        metadata={
            "help": "New COCOM adapter with --residual_pooling: the correction reads the memory tokens' states "
            "('memory') or the passage's own token states pooled per run ('tokens')."
        },
    )
    autoencode_ratio: float = field(
        default=0.5, metadata={"help": "Stage 1: fraction of auto-encoding examples (the rest is continuation)."}
    )
    max_target_tokens: int = field(default=128, metadata={"help": "Stage 1: at most this many target tokens."})
    top_k: int = field(default=5, metadata={"help": "Stage 2: compress the first k passages of each question."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}; choose one of {', '.join(STAGES)}.")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}; give a positive number of passages per question.")


def load_passages(name: str, split: str, max_examples: Optional[int]) -> Dataset:
    """Stage-1 rows: a text file of passages (one a line), or rows with a ``text`` column (``scripts.load_rows``: a
    JSON / JSONL file, a datasets folder, a Hub dataset, or ``wiki``, the offline Wikipedia paragraphs)."""
    if os.path.isfile(name) and not name.endswith((".json", ".jsonl")):
        with open(name) as f:
            texts = [line.strip() for line in f if line.strip()]
        return Dataset.from_dict({"text": texts[:max_examples] if max_examples is not None else texts})
    return scripts.load_rows(name, split, max_examples)


def prepare_rows(dataset: Dataset, stage: str, top_k: int) -> Dataset:
    needed = ("text",) if stage == "pretrain" else ("question", "answer", "contexts")
    scripts.require_columns(dataset, needed, f"COCOM stage {stage!r}")
    if stage == "pretrain":
        return dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))
    dataset = dataset.map(lambda row: {"contexts": [c for c in row["contexts"] if c and c.strip()][:top_k]})
    kept = dataset.filter(lambda row: len(row["contexts"]) > 0)
    if len(kept) < len(dataset):
        print(f"Dropped {len(dataset) - len(kept)} QA rows without passages (COCOM answers from passages).")
    return kept


def build_model(script_args: ScriptArguments, loading: Optional[scripts.ModelArguments] = None):
    def make_config():
        lineage = PISCO_LINEAGE if script_args.pisco_lineage else {}
        return CocomConfig(
            compression_rate=script_args.compression_rate,
            compressor=script_args.compressor,
            max_passage_tokens=script_args.max_passage_tokens,
            memory_tokens_per_passage=script_args.memory_tokens_per_passage,
            lora_r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            **{
                "separate_compressor_adapter": script_args.separate_compressor_adapter,
                "passage_special_tokens": script_args.passage_special_tokens and not script_args.compressor,
                **lineage,
            },
            residual_pooling=script_args.residual_pooling,
            residual_source=script_args.residual_source,
            compressor_type=script_args.compressor_type,
            bridge_hidden_size=script_args.bridge_hidden_size,
            compressor_layers=script_args.compressor_layers,
            base_model_name_or_path=script_args.model_name_or_path,
        )

    return scripts.build_adapter_model(
        script_args.model_name_or_path, script_args.adapter_init, CocomConfig, make_config, loading
    )


def main(argv: Optional[list[str]] = None) -> str:
    script_args, loading, training_args, tokenizer = scripts.parse_script(ScriptArguments, argv)
    if script_args.stage == "pretrain" and training_args.a_kl > 0:
        raise ValueError("a_kl > 0 is for stage 2 (qa); pretraining has no text-RAG teacher.")
    if script_args.stage == "pretrain":
        dataset = load_passages(script_args.dataset_name, script_args.dataset_split, script_args.max_examples)
    else:
        dataset = scripts.load_rows(script_args.dataset_name, script_args.dataset_split, script_args.max_examples)
    dataset = prepare_rows(dataset, script_args.stage, script_args.top_k)
    set_seed(training_args.seed)  # the new adapter's initialisation is part of the run's reproducibility
    model = build_model(script_args, loading)
    config = model.active_peft_config
    collator = recipe.collator(
        config,
        tokenizer,
        script_args.stage,
        autoencode_ratio=script_args.autoencode_ratio,
        max_target_tokens=script_args.max_target_tokens,
        **scripts.collator_settings(training_args),
    )
    size = peft_ctx.adapter_size(model)
    title = "ARC (COCOM)" if config.compressor_type == "arc" else "COCOM-light" if config.is_light else "COCOM"
    print(
        f"{title} adapter: compression rate {config.compression_rate}, {size['parameters']:,} parameters, "
        f"{size['bytes'] / 2**20:.2f} MiB"
    )
    output_dir = scripts.train_and_save(
        model, training_args, dataset, collator, tokenizer, script_args=script_args, method_title=title
    )
    weights = os.path.join(output_dir, "adapter_model.safetensors")
    if os.path.isfile(weights):
        print(f"{title} adapter file: {os.path.getsize(weights) / 2**20:.2f} MiB")
    return output_dir


if __name__ == "__main__":
    main()
