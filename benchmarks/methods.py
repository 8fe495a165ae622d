"""The methods the benchmark compares: one ``BenchMethod`` per row name, in a registry; a new method plugs in with a
subclass (or an instance with other settings) and one ``register`` call.

Every method answers the same questions about the same passages. What a method stores per passage (its "index": the
text, a retriever vector, context embeddings) is built once, before any timing, as a deployed system would build it
offline; the timed part starts from the question and the looked-up index entries.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import peft_ctx
from peft_ctx.inference import collate, text_examples


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
    """What the methods share: tokenizer, the text-RAG prompt config, the device and lazily loaded resources."""

    tokenizer: Any
    template_config: Any  # the adapter config whose prompt template text RAG uses (xRAG's, as in the paper)
    device: torch.device
    encoder_path: Optional[str] = None
    _encoder: Any = field(default=None, repr=False)

    @property
    def encoder(self):
        if self._encoder is None:
            from peft_ctx import assets

            self._encoder = peft_ctx.Encoder(self.encoder_path or assets.minilm_dir(), device=str(self.device))
        return self._encoder


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
        from peft import get_peft_model

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
        examples = text_examples(env.template_config, env.tokenizer, questions, entries)
        return collate(env.template_config, examples, env.tokenizer, device=env.device)

    def train_inputs(self, env: Env, model, questions, passages, answers) -> dict[str, torch.Tensor]:
        examples = text_examples(env.template_config, env.tokenizer, questions, passages, answers=answers)
        return collate(env.template_config, examples, env.tokenizer, padding_side="right", device=env.device)

    def trainable(self, env: Env, base) -> Any:
        """The model whose trainable parameters a training step updates (LoRA SFT for the text-RAG baseline)."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(base, config)

    trains = "LoRA SFT (r=16, all linear layers) on text-RAG prompts"


class NoRetrieval(BenchMethod):
    name, label = "no_retrieval", "no retrieval"

    def encode(self, env, model, passages):
        return Encoded([None] * len(passages), None)

    def inputs(self, env, model, questions, entries):
        examples = text_examples(env.template_config, env.tokenizer, questions)
        return collate(env.template_config, examples, env.tokenizer, device=env.device)

    trains = None


class TextRAG(BenchMethod):
    name, label = "rag", "text RAG"


class AdapterMethod(BenchMethod):
    """A peft_ctx adapter: inputs through ``peft_ctx.prepare_inputs`` with the index entries as contexts."""

    adapter = True
    options: dict = {}

    def inputs(self, env, model, questions, entries):
        return peft_ctx.prepare_inputs(model, env.tokenizer, questions, entries, **self.options)

    def train_inputs(self, env, model, questions, passages, answers):
        return peft_ctx.prepare_inputs(
            model,
            env.tokenizer,
            questions,
            self.train_contexts(env, model, passages),
            answers=answers,
            padding_side="right",
            **self.options,
        )

    def train_contexts(self, env, model, passages):
        return passages

    def trainable(self, env, base):
        model = self.build(env, base)
        model.train()
        return model

    trains = "the adapter"


class XRAG(AdapterMethod):
    name, label = "xrag", "xRAG (1 token / document)"
    encodes = True
    trains = "the projector (retriever vectors precomputed)"

    def config(self, env):
        return peft_ctx.XRAGConfig(**env.encoder.describe())

    def encode(self, env, model, passages):
        vectors = env.encoder.encode(passages, batch_size=32)  # [n_passages, d_r]
        return Encoded(list(vectors), lambda path: peft_ctx.save_vectors(path, vectors, encoder=env.encoder))

    def inputs(self, env, model, questions, entries):
        return peft_ctx.prepare_inputs(model, env.tokenizer, questions, [torch.stack(row) for row in entries])

    def train_contexts(self, env, model, passages):
        return [env.encoder.encode(row) for row in passages]


class Spring(AdapterMethod):
    name, label = "spring", "SPRING (50 virtual tokens + text)"
    trains = "the virtual tokens"

    def config(self, env):
        return peft_ctx.SpringConfig(num_virtual_tokens=50)


class Cocom(AdapterMethod):
    """COCOM (the LLM compresses, LoRA on it) or COCOM-light (MiniLM compresses); passages compressed offline."""

    encodes = True
    trains = "compressor + decoder LoRA (COCOM-light: encoder, projection, decoder LoRA)"

    def __init__(self, name: str, rate: int, light: bool = False, max_passage_tokens: int = 256):
        self.name = name
        self.rate = rate
        self.light = light
        self.max_passage_tokens = max_passage_tokens
        self.label = f"COCOM{'-light' if light else ''} xi={rate}"

    def unavailable(self):
        if not hasattr(peft_ctx, "CocomConfig") or not hasattr(peft_ctx, "compress"):
            return "peft_ctx has no CocomConfig / compress in this installation"
        return None

    def config(self, env):
        kwargs: dict[str, Any] = {"compression_rate": self.rate, "max_passage_tokens": self.max_passage_tokens}
        if self.light:
            from peft_ctx import assets

            kwargs["compressor"] = env.encoder_path or assets.minilm_dir()
        return peft_ctx.CocomConfig(**kwargs)

    def encode(self, env, model, passages):
        index = peft_ctx.compress(model, env.tokenizer, passages, batch_size=8)
        return Encoded([index[i] for i in range(len(index))], index.save)

    def serve(self, env, model):
        # The passages are compressed: what remains is decoding, with the decoder LoRA folded into the base weights.
        if model.active_peft_config.lora_r > 0:  # COCOM-light or COCOM with a LoRA on the LLM
            model.merge_adapter()
        return model

    def inputs(self, env, model, questions, entries):
        return peft_ctx.prepare_inputs(model, env.tokenizer, questions, entries)


REGISTRY: dict[str, BenchMethod] = {}


def register(method: BenchMethod) -> BenchMethod:
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name; set BenchMethod.name.")
    REGISTRY[method.name] = method
    return method


for _method in (
    NoRetrieval(),
    TextRAG(),
    XRAG(),
    Spring(),
    Cocom("cocom_xi4", 4),
    Cocom("cocom_xi16", 16),
    Cocom("cocom_xi128", 128),
    Cocom("cocom_light", 4, light=True),
):
    register(_method)

DEFAULT_METHODS = tuple(REGISTRY)


def select(names: Optional[list[str]]) -> tuple[list[BenchMethod], dict[str, str]]:
    """The methods to run (text RAG always, as the reference) and the skipped ones with the reason."""
    names = list(names or DEFAULT_METHODS)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(REGISTRY)}.")
    if "rag" not in names:
        names.insert(0, "rag")  # every ratio is against text RAG
    chosen, skipped = [], {}
    for name in names:
        reason = REGISTRY[name].unavailable()
        if reason:
            skipped[name] = reason
        else:
            chosen.append(REGISTRY[name])
    return chosen, skipped
