"""The methods the benchmark compares: one ``BenchMethod`` per row name, in a registry. The peft_ctx rows are the
registered methods' ``benchmark_entries`` (``ContextMethod``), so a new method plugs in from its own folder; other
rows (a baseline) plug in with a ``BenchMethod`` subclass and one ``register`` call.

Every method answers the same questions about the same passages. What a method stores per passage (its "index": the
text, a retriever vector, context embeddings) is built once, before any timing, as a deployed system would build it
offline; the timed part starts from the question and the looked-up index entries.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft import LoraConfig, get_peft_model

import peft_ctx
from peft_ctx.harness.assets import MINILM_HUB_ID, resolve
from peft_ctx.harness.rows import Entry, Resources, benchmark_entries
from peft_ctx.inference import collate, template_examples
from peft_ctx.methods import ContextMethod
from peft_ctx.prompting import RAG_TEMPLATE


def rag_examples(env, questions: list[str], passages: Optional[list[list[str]]] = None, answers=None) -> list:
    """Text RAG's prompts (xRAG's template, as in the paper), or the bare questions without passages."""
    return template_examples(env.tokenizer, questions, passages, answers, prompt_template=RAG_TEMPLATE)


@dataclass
class Encoded:
    """A method's index entries for some passages, and a function writing them to a file (None: nothing stored)."""

    entries: list
    save: Optional[Callable[[str], Any]]

    def bytes_on_disk(self) -> int:
        if self.save is None:
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index")
            self.save(path)
            return os.path.getsize(path)


@dataclass
class Env:
    """What the methods share: tokenizer, the device and lazily loaded resources."""

    tokenizer: Any
    device: torch.device
    encoder_path: Optional[str] = None
    base_model: Optional[str] = None  # the base model's name or folder (ARC's row reads its layers as the encoder)
    _encoder: Any = field(default=None, repr=False)

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = peft_ctx.Encoder(resolve(self.encoder_name), device=str(self.device))
        return self._encoder

    @property
    def encoder_name(self) -> str:
        return self.encoder_path or MINILM_HUB_ID

    def resources(self, with_encoder: bool) -> Resources:
        return Resources(
            base_model_name_or_path=self.base_model,
            encoder_name_or_path=self.encoder_name,
            encoder=self.encoder if with_encoder else None,
        )


class BenchMethod:
    """A row of the benchmark. Subclasses override what differs; the defaults are text RAG's."""

    name: str = ""
    label: str = ""
    # True when the adapter's weights are freshly initialised (speed does not depend on them; the answers do).
    adapter: bool = False

    def unavailable(self) -> Optional[str]:
        """Why this method cannot run in this installation, or None."""
        return None

    def config(self, env: Env):
        """The peft_ctx adapter config, or None for the plain base model."""
        return None

    def build(self, env: Env, base) -> Any:
        """The model this method generates with, made from a private copy of the base model."""
        config = self.config(env)
        if config is None:
            return base

        return get_peft_model(base, config, adapter_name=self.name).eval()

    # ---- the index ------------------------------------------------------------------------------------------------
    encodes = False  # whether ``encode`` does real work worth a throughput figure

    def encode(self, env: Env, model, passages: list[str]) -> Encoded:
        """One index entry per passage (what is stored offline), and how to write them to a file."""

        def save(path: str) -> None:
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(passages))

        return Encoded(list(passages), save)

    def serve(self, env: Env, model) -> Any:
        """The model as a server runs it once the index is built (by default the model as it is)."""
        return model

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def inputs(self, env: Env, model, questions: list[str], entries: list[list]) -> dict[str, torch.Tensor]:
        return collate(None, rag_examples(env, questions, entries), env.tokenizer, device=env.device)

    def train_inputs(self, env: Env, model, questions, passages, answers) -> dict[str, torch.Tensor]:
        examples = rag_examples(env, questions, passages, answers=answers)
        return collate(None, examples, env.tokenizer, padding_side="right", device=env.device)

    def trainable(self, env: Env, base) -> Any:
        """The model whose trainable parameters a training step updates (LoRA SFT for the text-RAG baseline)."""

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(base, config)

    trains = "LoRA SFT (r=16, all linear layers) on text-RAG prompts"


class NoRetrieval(BenchMethod):
    name, label = "no_retrieval", "no retrieval"

    def encode(self, env, model, passages):
        return Encoded([None] * len(passages), None)

    def inputs(self, env, model, questions, entries):
        return collate(None, rag_examples(env, questions), env.tokenizer, device=env.device)

    trains = None


class TextRAG(BenchMethod):
    name, label = "rag", "text RAG"


class AdapterMethod(BenchMethod):
    """A registered peft_ctx method's benchmark entry: inputs through ``peft_ctx.prepare_inputs`` with its index
    entries (``ContextMethod.index_passages``, or the passages as text) as contexts, served as the method serves it
    (``ContextMethod.serving``)."""

    adapter = True

    def __init__(self, method: ContextMethod, entry: Entry):
        self.method, self.entry = method, entry
        self.name, self.label, self.trains = entry.name, entry.label, entry.trains
        self.options = dict(entry.options)

    def config(self, env):
        return self.entry.make_config(env.resources(with_encoder=self.method.uses_encoder))

    @property
    def encodes(self) -> bool:  # whether ``encode`` does real work worth a throughput figure
        return type(self.method).index_passages is not ContextMethod.index_passages

    def encode(self, env, model, passages):
        encoder = env.encoder if self.method.uses_encoder else None
        index = self.method.index_passages(model, env.tokenizer, passages, encoder=encoder)
        if index is None:
            return super().encode(env, model, passages)
        return Encoded(index.entries, index.save)

    def serve(self, env, model):
        # The served form (COCOM: decoder LoRA merged) is copied and the method's context left at once: the benchmark
        # then converts the copy's weights (fp16 / int8 layers), which no LoRA unmerge could undo at exit.
        with self.method.serving(model) as served:
            return copy.deepcopy(served)

    def inputs(self, env, model, questions, entries):
        return peft_ctx.prepare_inputs(model, env.tokenizer, questions, self.contexts(entries), **self.options)

    def contexts(self, entries: list[list]) -> list:
        # One [d_r] vector per passage: a question's passages travel as one [n_docs, d_r] tensor; passages indexed
        # as their chunks ([n_chunks, d_r] each, xRAG's chunk_tokens) stay a list of documents.
        return [torch.stack(row) if row and all(_is_vector(e) for e in row) else row for row in entries]

    def train_inputs(self, env, model, questions, passages, answers):
        contexts = passages
        if self.method.uses_encoder:
            contexts = [env.encoder.encode(row) for row in passages]  # the retriever's vectors, precomputed
        return peft_ctx.prepare_inputs(
            model, env.tokenizer, questions, contexts, answers=answers, padding_side="right", **self.options
        )

    def trainable(self, env, base):
        model = self.build(env, base)
        model.train()
        return model


def _is_vector(entry) -> bool:
    return isinstance(entry, torch.Tensor) and entry.dim() == 1


_ROWS: dict[str, BenchMethod] = {}  # rows registered here (the baselines); the adapters' rows come from peft_ctx


def register(method: BenchMethod) -> BenchMethod:
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name; set BenchMethod.name.")
    _ROWS[method.name] = method
    return method


register(NoRetrieval())
register(TextRAG())


def registry() -> dict[str, BenchMethod]:
    """Every benchmark row by name: the baselines, then each registered peft_ctx method's benchmark rows
    (read now, so a method registered after this module was imported is in it)."""
    rows = dict(_ROWS)
    for method, entry in benchmark_entries():
        rows.setdefault(entry.name, AdapterMethod(method, entry))
    return rows


def select(names: Optional[list[str]]) -> tuple[list[BenchMethod], dict[str, str]]:
    """The methods to run (text RAG always, as the reference) and the skipped ones with the reason."""
    rows = registry()
    names = list(names or rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(rows)}.")
    if "rag" not in names:
        names.insert(0, "rag")  # every ratio is against text RAG
    chosen, skipped = [], {}
    for name in names:
        reason = rows[name].unavailable()
        if reason:
            skipped[name] = reason
        else:
            chosen.append(rows[name])
    return chosen, skipped
