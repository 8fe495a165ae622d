# /// script
# requires-python = ">=3.10"
# dependencies = ["peft-ctx"]
# ///
"""Train an xRAG projector with trl.

Stage 1, paraphrase pretraining (the document's vector in, the document's text out):

    python train/xrag.py --config train/configs/xrag_stage1.yaml

Stage 2, context-aware instruction tuning with self-distillation from the same frozen LLM reading the text:

    python train/xrag.py --config train/configs/xrag_stage2.yaml --adapter_init outputs/xrag-stage1

Any option of the YAML file can be given on the command line too (``--max_steps 50``); all of
``peft_ctx.training.ContextSFTConfig`` (= trl.SFTConfig + a_nll, a_kl, kl_temperature, teacher_top_k) is available;
the stages are ``peft_ctx.xrag.recipe``'s, which the demo runs too.
Data: a JSON / JSONL file, a folder saved with ``datasets``, or a Hub dataset id, with columns
``text`` (stage 1) or ``question``, ``answer``, ``contexts`` (a list of passages; stage 2).
``--push_to_hub --hub_model_id org/name`` uploads the adapter and its model card at the end (peft_ctx.push_to_hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from accelerate import PartialState
from transformers import set_seed

import peft_ctx
from peft_ctx.scripts import (
    ModelArguments,
    TrainScriptArguments,
    build_adapter_model,
    collator_settings,
    load_rows,
    parse_script,
    resolve_dtype,
    train_and_save,
)
from peft_ctx.vectors import VECTOR_DTYPES
from peft_ctx.xrag import recipe
from peft_ctx.xrag.config import OFFICIAL_EVAL_TEMPLATE, OFFICIAL_TRAIN_TEMPLATE

STAGES = recipe.STAGES
OFFICIAL_TEMPLATES = {"official_train": OFFICIAL_TRAIN_TEMPLATE, "official_eval": OFFICIAL_EVAL_TEMPLATE}


@dataclass
class ScriptArguments(TrainScriptArguments):
    encoder_name_or_path: str = field(
        metadata={"help": "Frozen retriever: sentence-transformers / transformers Hub id or folder."}
    )
    dataset_name: str = field(metadata={"help": "JSON/JSONL file, datasets folder, or Hub dataset id."})
    stage: str = field(default="instruct", metadata={"help": "'paraphrase' (stage 1) or 'instruct' (stage 2)."})
    projector_type: str = field(default="mlp2x_gelu", metadata={"help": "Projector for a new adapter: 'mlpNx_gelu'."})
    encoder_pooling: Optional[str] = field(
        default=None, metadata={"help": "Pooling override: mean, cls, last_token, max (default: the model's own)."}
    )
    encode_batch_size: int = field(default=64, metadata={"help": "Batch size for encoding documents once, up front."})
    vector_index_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder of the on-disk document-vector index (default: <output_dir>/vectors-<stage>); an index "
            "already there for the same rows, encoder and settings is reused (e.g. on --resume_from_checkpoint)."
        },
    )
    vector_dtype: str = field(default="float16", metadata={"help": "Index storage: float16 or float32."})
    prompt_template: Optional[str] = field(
        default=None,
        metadata={
            "help": "A new adapter's QA prompt template with {context} and {question}; 'official_train' / "
            "'official_eval' name the official xRAG prompts (plain text, Mistral's [INST] format). Default: "
            "peft_ctx's own through the chat template."
        },
    )
    use_chat_template: Optional[bool] = field(
        default=None,
        metadata={"help": "Wrap a new adapter's prompts in the chat template (default: yes; not the official ones)."},
    )
    chunk_tokens: Optional[int] = field(
        default=180,
        metadata={
            "help": "A new adapter's chunk size: each passage is encoded in chunks of at most this many retriever "
            "tokens, one slot per chunk (official xRAG: 180); 0 or less: one vector per passage. A continued adapter "
            "keeps its own."
        },
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}; choose one of {', '.join(STAGES)}.")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector_dtype={self.vector_dtype!r}; choose one of {', '.join(VECTOR_DTYPES)}.")
        if self.chunk_tokens is not None and self.chunk_tokens <= 0:
            self.chunk_tokens = None
        self.prompt_template = OFFICIAL_TEMPLATES.get(self.prompt_template, self.prompt_template)
        if self.use_chat_template is None:
            self.use_chat_template = not self.official_prompt

    @property
    def official_prompt(self) -> bool:
        """Whether the QA prompt is an official xRAG one: plain text, the slots of several chunks joined by spaces."""
        return self.prompt_template in OFFICIAL_TEMPLATES.values()


def build_model(script_args: ScriptArguments, encoder: peft_ctx.Encoder, loading: Optional[ModelArguments] = None):
    def make_config():
        return peft_ctx.XRAGConfig(
            projector_type=script_args.projector_type,
            chunk_tokens=script_args.chunk_tokens,
            prompt_template=script_args.prompt_template,
            use_chat_template=script_args.use_chat_template,
            slot_separator=" " if script_args.official_prompt else "",
            base_model_name_or_path=script_args.model_name_or_path,
            **encoder.describe(),
        )

    model = build_adapter_model(
        script_args.model_name_or_path, script_args.adapter_init, peft_ctx.XRAGConfig, make_config, loading
    )
    encoder.check_compatible(model.active_peft_config)  # a stage-1 adapter made with another retriever
    return model


def main(argv: Optional[list[str]] = None) -> str:
    script_args, loading, training_args, tokenizer = parse_script(ScriptArguments, argv)
    if script_args.stage == "paraphrase" and training_args.a_kl > 0:
        raise ValueError("a_kl > 0 is for stage 2 (instruct); stage 1 trains on the document text with NLL only.")
    # The frozen retriever runs on this process's training device, in the base model's dtype.
    state = PartialState(cpu=training_args.use_cpu)
    encoder = peft_ctx.Encoder(
        script_args.encoder_name_or_path,
        pooling=script_args.encoder_pooling,
        device=str(state.device),
        torch_dtype=resolve_dtype(loading.dtype),
    )
    set_seed(training_args.seed)  # the new projector's initialisation is part of the run's reproducibility
    model = build_model(script_args, encoder, loading)
    config = model.active_peft_config
    dataset = load_rows(script_args.dataset_name, script_args.dataset_split, script_args.max_examples)
    # Each process encodes its share once into the on-disk index, then all read it by row.
    dataset, index = recipe.encode_documents(
        dataset,
        encoder,
        script_args.stage,
        script_args.encode_batch_size,
        index_dir=script_args.vector_index_dir
        or os.path.join(training_args.output_dir, f"vectors-{script_args.stage}"),
        dtype=VECTOR_DTYPES[script_args.vector_dtype],
        chunk_tokens=config.chunk_tokens,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone,
    )
    encoder.model.to("cpu")  # its work is done; the GPU memory goes to training
    collator = recipe.collator(
        config, tokenizer, script_args.stage, vector_index=index, **collator_settings(training_args)
    )
    retriever = script_args.encoder_name_or_path  # named on the card
    return train_and_save(
        model, training_args, dataset, collator, tokenizer, script_args=script_args, retriever=retriever
    )


if __name__ == "__main__":
    main()
