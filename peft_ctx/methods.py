"""What a peft_ctx method contributes: its adapter module, how it fills the context slots, and how prompts look.

The shared machinery (placeholder substitution, PEFT registration, prompt building, batching) calls these hooks;
each method's package (``peft_ctx/<method>/model.py``) implements them once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import ContextConfig
    from .prompting import Part

_METHODS: dict[str, ContextMethod] = {}


class ContextMethod:
    """Base class of a method's behaviour. Subclasses are stateless; register one instance with ``register_method``."""

    name: str = ""
    # Extra forward / generate keyword arguments that carry this method's context (besides ``context_mask``).
    input_names: tuple[str, ...] = ()
    # Shared objects that prompt building adds to this method's options (``prepare_docs`` / ``prompt_fields``):
    # "tokenizer" (the LLM's) and "model" (the PeftModel the prompts are for, when known). Only listed names are added.
    option_resources: tuple[str, ...] = ()

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
        ``disable_adapter`` and ``unload`` reach them."""

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


def register_method(method: ContextMethod) -> ContextMethod:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> ContextMethod:
    if name not in _METHODS:
        raise ValueError(f"Unknown peft_ctx method {name!r}; known: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]


def all_input_names() -> set[str]:
    names = {"context_mask"}
    for method in _METHODS.values():
        names.update(method.input_names)
    return names
