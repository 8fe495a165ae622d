"""A method's registry entry: its hooks into the shared machinery and everything else the package reads about it.

Each method's package (``peft_ctx/<method>/method.py``) defines one ``ContextMethod`` subclass and registers one
instance with ``register_method``. That instance is the only place the rest of peft_ctx learns about the method:
the tuner calls its hooks (slot filling, prompt fields, batching), ``hub`` renders its card template, the evaluation
harness asks it how to index passages, the demo, the benchmarks and the tests read its rows from ``rows_module``
(``peft_ctx.harness.rows``), ``python -m peft_ctx.convert`` lists its converters and the demo trains it with
``train``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import ContextConfig
    from .prompting import Part

_METHODS: dict[str, ContextMethod] = {}

MERGE_MESSAGE = (
    "peft_ctx adapters cannot be merged into the base weights: they replace context-slot embeddings at run time, "
    "which no weight delta can do. Only the LoRA layers an adapter adds to the LLM (COCOM's decoder LoRA) merge, "
    "with model.merge_adapter() for faster decoding; model.unload() gives the unchanged base model back."
)


@dataclass
class PassageIndex:
    """What an offline index stores for some passages (one entry each, in order), and how to write it to a file."""

    entries: list
    save: Optional[Callable[[str], Any]] = None


@dataclass
class TrainingData:
    """What a method's training recipe reads: QA rows (``question``, ``answer``, ``contexts`` with the gold passage
    first), unlabelled passages for pretraining stages, and the retriever when the method needs one."""

    qa_rows: list[dict]
    corpus: Sequence[str] = ()
    encoder: Any = None


class ContextMethod:
    """Base class of a method's registry entry and hooks. Subclasses are stateless; register one instance with
    ``register_method``.

    Example (a whole method, see ``tests/test_fourth_method.py``)::

        class MeanPoolMethod(ContextMethod):
            name, title, config_class = "meanpool", "Mean-pool", MeanPoolConfig
            def create_module(self, config, base_embedding, model_config): ...
            def slot_embeddings(self, module, context_mask, inputs, dtype): ...
            def prompt_fields(self, config, docs, options): ...

        register_method(MeanPoolMethod())
    """

    name: str = ""
    # ---- what the rest of the package reads ----------------------------------------------------------------------
    title: str = ""  # the method's name in cards, tables and commit messages ("xRAG")
    config_class: Optional[type] = None  # its ContextConfig subclass
    # Its model-card template: a file name in peft_ctx's hub_cards/ or an absolute path; it extends "_base.md.j2".
    card_template: Optional[str] = None
    # Its documents reach the model through the retriever its config names (``retriever_name_or_path``): loaders and
    # cards then name that encoder.
    uses_encoder: bool = False
    # ``python -m peft_ctx.convert SRC DST``: the published families this method loads (name -> PublishedFamily).
    converters: Mapping[str, Callable[..., Any]] = {}
    # The stages of its training recipe, in order (``train`` takes their settings by these names).
    stages: tuple[str, ...] = ("qa",)
    # Extra forward / generate keyword arguments that carry this method's context (besides ``context_mask``).
    input_names: tuple[str, ...] = ()
    # The options ``prepare_inputs`` / ``generate`` take for this method (SPRING's ``num_virtual_tokens``), besides the
    # shared ``encoder`` / ``encode_batch_size``; ``generate`` passes every other name on to ``model.generate``.
    option_names: tuple[str, ...] = ()
    # Shared objects that prompt building adds to this method's options (``prepare_docs`` / ``prompt_fields``):
    # "tokenizer" (the LLM's) and "model" (the PeftModel the prompts are for, when known). Only listed names are added.
    option_resources: tuple[str, ...] = ()
    # The module of its rows in the harness (the demo's, the benchmark's, the tiny test configurations), e.g.
    # "peft_ctx.xrag.rows" defining ``ROWS = peft_ctx.harness.rows.MethodRows(...)``; only the harness imports it.
    rows_module: Optional[str] = None

    def create_module(self, config: ContextConfig, base_embedding: nn.Module, model_config: Any) -> nn.Module:
        """The adapter's trainable module, stored under the adapter's name in the embedding wrapper."""
        raise NotImplementedError

    def inject(
        self,
        tuner: nn.Module,
        model: nn.Module,
        adapter_name: str,
        config: ContextConfig,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Add the adapter's layers beyond its context module (e.g. LoRA on the LLM's linear layers); called once the
        context module exists. Such layers must be PEFT ``BaseTunerLayer``s, so that ``set_adapter``,
        ``disable_adapter`` and ``unload`` reach them; ``merge`` / ``unmerge`` / ``merged_adapters`` let
        ``merge_adapter`` fold them into the base weights (COCOM's LoRA: ``cocom/merging.py``)."""

    def companion_roles(self, config: ContextConfig) -> tuple[str, ...]:
        """Roles of extra weight sets this adapter keeps in PEFT layers next to its own (a separate compressor LoRA:
        ``("compressor",)``); they live under ``tuner.companion_name(adapter_name, role)`` and are saved, loaded,
        frozen and deleted together with the adapter, but never active in PEFT's sense."""
        return ()

    def before_forward(
        self,
        tuner: nn.Module,
        adapter_name: str,
        config: ContextConfig,
        context_mask: torch.Tensor,
        inputs: dict[str, Any],
    ) -> dict[str, Any]:
        """Runs once per forward / generate call of an enabled adapter, before the model and outside the slot
        filling; returns the inputs ``slot_embeddings`` reads (e.g. passages compressed by the model itself)."""
        return inputs

    def check_base_model(self, config: ContextConfig, model: nn.Module) -> None:
        """Raise ``ValueError`` when the adapter cannot sit on ``model`` (for example another hidden size)."""

    def check_inputs(self, config: ContextConfig, context_mask: torch.Tensor, inputs: dict[str, Any]) -> None:
        """Validate the context inputs of one forward call before the model runs."""

    def slot_embeddings(
        self, module: nn.Module, context_mask: torch.Tensor, inputs: dict[str, Any], dtype: torch.dtype
    ) -> torch.Tensor:
        """Embeddings for every context slot in row-major order of ``context_mask``.  # [n_slots, hidden]"""
        raise NotImplementedError

    # ---- merging: the weight deltas an adapter adds to the LLM (COCOM's decoder LoRA) -----------------------------
    def merge(self, model: nn.Module, adapter_name: str, safe_merge: bool = False) -> None:
        """Fold ``adapter_name``'s weight delta into the base weights of ``model`` (``merge_adapter``); a method whose
        adapter only fills context slots has none and refuses."""
        raise ValueError(f"Adapter {adapter_name!r} ({self.name}) adds no LoRA layer to the LLM. {MERGE_MESSAGE}")

    def unmerge(self, model: nn.Module) -> None:
        """Take every delta of this method's adapters back out of the base weights (``unmerge_adapter``)."""

    def merged_adapters(self, model: nn.Module) -> set[str]:
        """This method's adapters whose deltas sit in the base weights now."""
        return set()

    # ---- prompt side -------------------------------------------------------------------------------------------
    def prompt_fields(
        self, config: ContextConfig, docs: list, options: dict[str, Any]
    ) -> tuple[dict[str, list[Part]], dict[str, list]]:
        """The parts that fill the template's fields for one example, and the per-example context payload
        (lists that ``collate_context`` concatenates over the batch)."""
        raise NotImplementedError

    def collate_context(
        self, config: ContextConfig, payloads: list[dict[str, list]], device: Optional[torch.device]
    ) -> dict[str, torch.Tensor]:
        return {}

    def training_options(self, config: ContextConfig, rng, options: dict[str, Any]) -> dict[str, Any]:
        """Per-batch options drawn during training (SPRING draws its k here)."""
        return dict(options)

    def prepare_docs(self, config: ContextConfig, contexts: list[list], options: dict[str, Any]) -> list[list]:
        """Turn user-given documents (text, vectors ...) into what ``prompt_fields`` reads, for a whole batch."""
        return contexts

    def text_fields(self, config: ContextConfig, docs: Optional[list[str]]) -> Optional[dict[str, list[Part]]]:
        """Template fields (all but ``question``) of the same prompt with the documents as plain text (text RAG: the
        baselines and the distillation teacher). ``docs`` None means no retrieval; returning None then uses the bare
        question instead of the template."""
        if docs is None:
            return None
        fields: dict[str, list[Part]] = {name: [] for name in config.template_fields}
        fields["context"] = ["\n".join(docs)]
        return fields

    # ---- offline work, serving and training ----------------------------------------------------------------------
    def index_passages(self, model, tokenizer, passages: list[str], encoder=None) -> Optional[PassageIndex]:
        """What an offline index holds for each passage (retriever vectors, compressed context embeddings), ready for
        ``contexts=``; None when the method reads passages as text. ``model`` has this method's adapter active."""
        return None

    def serving(self, model) -> contextlib.AbstractContextManager:
        """The model as a server decodes with it once the passages are indexed (COCOM: its decoder LoRA merged into
        the base weights), for the duration of the ``with`` block; the context manager yields the model."""
        return contextlib.nullcontext(model)

    def diagnostics(self, model, tokenizer, passages: list[str], encoder=None) -> Optional[dict[str, float]]:
        """Whether the active adapter carries the passages' content, measured on held-out passages (two or more), each
        measure beside its control (``..._wrong_passage``: another passage's compressed form); None for a method that
        compresses nothing (SPRING reads the passages as text)."""
        return None

    def train(
        self,
        model,
        tokenizer,
        data: TrainingData,
        stages: Mapping[str, Any],
        work_dir: str,
        seed: int = 0,
        callbacks: Optional[Sequence[Any]] = None,
    ) -> Optional[list]:
        """The method's training recipe: train the active adapter of ``model`` stage by stage (``stages``:
        ``StageSettings`` by stage name) and return one ``StageReport`` per stage run. ``callbacks`` (transformers
        ``TrainerCallback``s) go to every stage's trainer (``peft_ctx.training.train_stage``). None (the default)
        means no recipe of its own: ``peft_ctx.training.train_method`` then runs one QA stage on ``data.qa_rows``."""
        return None


def register_method(method: ContextMethod) -> ContextMethod:
    """Make a method known to PEFT loading (its config class), prompts, cards, the harness and the benchmarks
    (idempotent per name)."""
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name; set ContextMethod.name.")
    config_class = method.config_class
    if config_class is None or getattr(config_class, "method_name", None) != method.name:
        raise ValueError(
            f"{type(method).__name__}.config_class must be the method's ContextConfig subclass with "
            f"method_name={method.name!r}, got {config_class!r}."
        )
    _METHODS[method.name] = method
    return method


def registered_methods() -> list[ContextMethod]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def get_method(name: str) -> ContextMethod:
    if name not in _METHODS:
        raise ValueError(f"Unknown peft_ctx method {name!r}; known: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def all_input_names() -> set[str]:
    names = {"context_mask"}
    for method in _METHODS.values():
        names.update(method.input_names)
    return names
