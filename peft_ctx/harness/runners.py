"""The rows of an evaluation table: how each turns questions into model inputs (``TextRunner`` for no retrieval and
text RAG, ``AdapterRunner`` for an adapter), and the settings every row shares (``EvalSettings``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ..inference import (
    build_examples,
    template_examples,
    text_examples,
)
from ..methods import get_method
from ..prompting import RAG_TEMPLATE
from .serving import ENGINES, OUTTYPES


@dataclass
class EvalSettings:
    """What the harness measures and how much of it."""

    n_test: Optional[int] = 100
    n_generate: Optional[int] = None  # questions for the generation metrics (None: all n_test)
    max_new_tokens: int = 12
    batch_size: int = 8
    timing_examples: int = 10
    timing_new_tokens: int = 12
    # Held-out passages (the test rows' first ones) for the content diagnostics (ContextMethod.diagnostics); 0: none.
    diagnostic_passages: int = 0
    # Also score every row that reads passages on another question's passage (the next test row's): a score that
    # holds up without the right passage comes from a shortcut, not from reading it.
    wrong_passage: bool = False
    show_progress: bool = True
    # Who decodes the generation and timing rows: "torch" (model.generate), "llama.cpp" (LlamaCppEngine on a GGUF
    # of each row's export) or "vllm" (a VllmEngine server of it); exports go under engine_dir. Choice accuracy and
    # the diagnostics score with torch.
    engine: str = "torch"
    engine_dir: Optional[str] = None
    gguf_type: str = "f16"
    vllm_dtype: Optional[str] = None  # the vLLM server's weights (None: bf16 where the hardware has it, else fp32)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}; choose one of {', '.join(ENGINES)}.")
        if self.engine != "torch" and not self.engine_dir:
            raise ValueError(f"engine={self.engine!r} needs engine_dir (a folder for the exports and GGUF files).")
        if self.gguf_type not in OUTTYPES:
            raise ValueError(f"gguf_type={self.gguf_type!r}; choose one of {', '.join(OUTTYPES)}.")
        for name in ("max_new_tokens", "batch_size", "timing_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.timing_examples < 0:
            raise ValueError(f"timing_examples={self.timing_examples} must be >= 0.")
        if self.diagnostic_passages == 1 or self.diagnostic_passages < 0:
            raise ValueError(
                f"diagnostic_passages={self.diagnostic_passages}: give 0 (none) or 2 or more (each passage is "
                "another's control)."
            )


# ---- runners: how one row of the table turns questions into model inputs -----------------------------------------
@dataclass
class Runner:
    """One row of the table. Subclasses build the prompts; ``activate`` puts the model in the right state."""

    name: str
    label: str

    def activate(self, model) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def examples(self, model, tokenizer, rows: Sequence[dict], answers: Optional[Sequence[str]] = None) -> list:
        raise NotImplementedError

    @property
    def config(self):
        return None

    @property
    def reads_passages(self) -> bool:
        return True


@dataclass
class TextRunner(Runner):
    """The frozen base model: no retrieval, or the passages as text (text RAG). With ``adapter_config`` the prompt
    is that adapter's own template with the passages as text (the distillation teacher's prompt)."""

    use_context: bool = True
    prompt_template: str = RAG_TEMPLATE
    system_prompt: Optional[str] = None
    use_chat_template: bool = True
    adapter_config: Any = None

    @property
    def reads_passages(self) -> bool:
        return self.use_context

    def activate(self, model):
        disable = getattr(model, "disable_adapter", None)
        return disable() if disable is not None and getattr(model, "peft_config", None) else contextlib.nullcontext()

    def examples(self, model, tokenizer, rows, answers=None):
        questions = [r["question"] for r in rows]
        contexts = [r["contexts"] for r in rows] if self.use_context else None
        if self.use_context:
            _require_contexts(rows)
        if self.adapter_config is not None:
            return text_examples(self.adapter_config, tokenizer, questions, contexts, answers)
        return template_examples(
            tokenizer,
            questions,
            contexts,
            answers,
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            use_chat_template=self.use_chat_template,
        )


@dataclass
class AdapterRunner(Runner):
    """A peft_ctx adapter loaded on the model under ``adapter_name``.

    With ``index=True`` each row's passages are first turned into what the method's offline index holds
    (``ContextMethod.index_passages``: xRAG's retriever vectors, COCOM's context embeddings), once per row before
    anything is timed, and the model is served as the method serves it (``ContextMethod.serving``: COCOM's decoder
    LoRA merged). Methods that index nothing (SPRING) read the passages as text, as with ``index=False``.
    """

    adapter_name: str = "default"
    encoder: Any = None
    options: dict = field(default_factory=dict)
    index: bool = True
    serve: bool = True  # decode as the method serves indexed passages (False: as trained, e.g. COCOM unmerged)
    _prepared: dict = field(default_factory=dict, repr=False)
    _indexed: bool = field(default=False, repr=False)
    _config: Any = field(default=None, repr=False)

    def activate(self, model):
        if model.active_adapter != self.adapter_name:
            # Only when needed: PEFT's set_adapter also unmerges a merged LoRA (see ``serving``).
            model.set_adapter(self.adapter_name)
        self._config = model.peft_config[self.adapter_name]
        return contextlib.nullcontext()

    @property
    def config(self):
        return self._config

    def method(self, model):
        return get_method(model.peft_config[self.adapter_name].method)

    def precompute(self, model, tokenizer, rows: Sequence[dict]) -> None:
        _require_contexts(rows)
        if not self.index:
            return
        todo = [r for r in rows if r["id"] not in self._prepared]
        if not todo:
            return
        with self.activate(model):
            passages = [doc for r in todo for doc in r["contexts"]]
            index = self.method(model).index_passages(model, tokenizer, passages, encoder=self.encoder)
        entries = passages if index is None else index.entries
        self._indexed = self._indexed or index is not None
        start = 0
        for row in todo:
            self._prepared[row["id"]] = entries[start : start + len(row["contexts"])]
            start += len(row["contexts"])

    @contextlib.contextmanager
    def serving(self, model):
        """The model as the method serves it (``ContextMethod.serving``) for the duration, once its passages are
        indexed: nothing is compressed on the fly then. Passages read as text, or training, run as they are."""
        if not (self.serve and self._indexed) or model.training:
            yield
            return
        self.activate(model)  # before serving: switching adapters later would unmerge a merged LoRA
        with self.method(model).serving(model):
            yield

    def contexts(self, rows):
        if not self.index:
            return [r["contexts"] for r in rows]
        return [self._prepared[r["id"]] for r in rows]

    def examples(self, model, tokenizer, rows, answers=None):
        self.precompute(model, tokenizer, rows)  # no-op for rows prepared before timing
        config = model.peft_config[self.adapter_name]
        return build_examples(
            config,
            tokenizer,
            [r["question"] for r in rows],
            self.contexts(rows),
            answers=answers,
            model=model,
            encoder=self.encoder,
            **self.options,
        )


def _require_contexts(rows) -> None:
    for r in rows:
        if not r["contexts"]:
            raise ValueError(
                f"Question {r['id']!r} has no passages: retrieve them first (peft_ctx.eval.add_retrieved_passages, "
                "or --corpus on the command line)."
            )
