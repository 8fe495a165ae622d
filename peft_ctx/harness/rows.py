"""The rows a method contributes to the harness: the demo's table, the speed benchmark's, the tiny test
configurations (the tests, the CUDA check) and the paper-scale training setting (the planner).

A method declares them in a module of its own folder (``peft_ctx/<method>/rows.py``) and names that module in
``ContextMethod.rows_module``; only the harness imports it, so the library never loads harness code. The module
defines ``ROWS = MethodRows(demo=(...), benchmark=(...), tiny=(...), paper=(...))``.

Example::

    from peft_ctx.harness.rows import tiny_entries, Resources

    for method, entry in tiny_entries():
        config = entry.make_config(Resources(encoder_name_or_path="path/to/tiny-encoder", retriever_hidden_size=32))
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ..methods import ContextMethod, get_method, registered_methods
from .tiny import LLAMA_SUBFOLDER, RETRIEVER_DIM


@dataclass(frozen=True)
class Resources:
    """What an entry's ``make_config`` may read: the base model's and the encoder's names, the encoder, and the
    retriever's width when no encoder is loaded (the tiny configurations)."""

    base_model_name_or_path: Optional[str] = None
    encoder_name_or_path: Optional[str] = None
    encoder: Any = None  # a peft_ctx.Encoder
    retriever_hidden_size: Optional[int] = None
    # A Llama-style encoder for ARC's compressor (the tiny rows' tiny Llama); None: the base model's own layers.
    llama_encoder_name_or_path: Optional[str] = None
    # A compressor encoder's config (``PretrainedConfig.to_dict()``) to build it from, without weights (the planner's
    # BERT-base on the meta device); None loads ``encoder_name_or_path``.
    encoder_config: Optional[dict] = None

    def retriever(self) -> dict[str, Any]:
        """The retriever fields of an adapter that reads retriever vectors (xRAG): the loaded encoder's description,
        or only its width."""
        if self.encoder is not None:
            return self.encoder.describe()
        if self.retriever_hidden_size is None:
            raise ValueError("This row reads retriever vectors: give Resources an encoder or retriever_hidden_size.")
        return {"retriever_hidden_size": self.retriever_hidden_size}


@dataclass(frozen=True)
class Target:
    """A speed target a benchmark row must meet: ``metric`` (a row field such as ``e2e_speedup_vs_rag``) at least
    ``at_least`` at ``docs`` documents for each batch size in ``batches``."""

    metric: str
    at_least: float
    docs: int = 5
    batches: tuple[int, ...] = (1, 8)
    source: str = ""  # where the number comes from (the paper's claim)


@dataclass(frozen=True)
class Entry:
    """One row of a table for a method (a method may have several: COCOM's rates).

    ``make_config(resources)`` builds the adapter config; ``options`` go to ``prepare_inputs`` when the row is
    evaluated; ``stages`` maps a demo profile name to the settings of each training stage (``StageSettings``
    fields, by stage name of ``ContextMethod.stages``); ``trains`` says what a training step updates and ``targets``
    what speed the row must reach (benchmarks).
    """

    name: str
    label: str
    make_config: Callable[[Resources], Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    stages: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    trains: str = "the adapter"
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class MethodRows:
    """A method's rows: ``demo`` (``make demo`` / ``make reproduce``, trained by the method's recipe), ``benchmark``
    (the speed benchmark, freshly initialised adapters), ``tiny`` (small adapters for tiny models: the contract
    tests, the serving and scale tests, the CUDA check; their ``make_config`` gets the tiny encoder's folder and the
    retriever width) and ``paper`` (the paper's training setting, which ``benchmarks.planner`` sizes at Mistral-7B
    scale; its ``make_config`` gets a 4096-wide retriever or the tiny fit's encoder, and BERT-base's config)."""

    demo: tuple[Entry, ...] = ()
    benchmark: tuple[Entry, ...] = ()
    tiny: tuple[Entry, ...] = ()
    paper: tuple[Entry, ...] = ()


@functools.cache
def method_rows(method: ContextMethod) -> MethodRows:
    """The rows ``method.rows_module`` defines (none when it names no module), checked against the method's recipe."""
    if not method.rows_module:
        return MethodRows()
    rows = getattr(importlib.import_module(method.rows_module), "ROWS", None)
    if not isinstance(rows, MethodRows):
        raise ValueError(
            f"{method.rows_module} (the rows_module of {type(method).__name__}) must define ROWS = MethodRows(...), "
            f"got {type(rows).__name__}."
        )
    for entry in rows.demo:
        unknown = sorted({stage for table in entry.stages.values() for stage in table} - set(method.stages))
        if unknown:
            raise ValueError(
                f"Demo entry {entry.name!r} of {type(method).__name__} trains stages {unknown}, which its recipe does "
                f"not have; its stages are {list(method.stages)} (ContextMethod.stages)."
            )
    return rows


def reads_retriever(config) -> bool:
    """Whether an adapter of ``config`` reads retriever vectors (xRAG), so that its prompts need the encoder."""
    return get_method(config.method).uses_encoder


def encoder_for(model, encoder):
    """``encoder`` when ``model``'s active adapter reads retriever vectors (xRAG), else None: what a row's prompts
    pass as ``encoder=``."""
    return encoder if reads_retriever(model.active_peft_config) else None


def _entries(kind: str) -> list[tuple[ContextMethod, Entry]]:
    return [(method, entry) for method in registered_methods() for entry in getattr(method_rows(method), kind)]


def demo_entries() -> list[tuple[ContextMethod, Entry]]:
    """Every registered method's demo rows, in registration order."""
    return _entries("demo")


def benchmark_entries() -> list[tuple[ContextMethod, Entry]]:
    """Every registered method's benchmark rows, in registration order."""
    return _entries("benchmark")


def tiny_entries() -> list[tuple[ContextMethod, Entry]]:
    """Every registered method's tiny test configurations, in registration order."""
    return _entries("tiny")


def paper_entries() -> list[tuple[ContextMethod, Entry]]:
    """Every registered method's paper-scale training rows (the planner's), in registration order."""
    return _entries("paper")


def tiny_configs(
    encoder_dir: Optional[str] = None, retriever_hidden_size: int = RETRIEVER_DIM
) -> dict[str, Callable[[], Any]]:
    """``{row name: () -> config}`` of every tiny row: the variants the tests and the CUDA check run on tiny models
    (``encoder_dir``: the tiny encoders, ``peft_ctx.harness.tiny.tiny_encoder_dir``, ``RETRIEVER_DIM`` wide)."""
    llama = None if encoder_dir is None else os.path.join(encoder_dir, LLAMA_SUBFOLDER)
    resources = Resources(
        encoder_name_or_path=encoder_dir, retriever_hidden_size=retriever_hidden_size, llama_encoder_name_or_path=llama
    )
    return {entry.name: functools.partial(entry.make_config, resources) for _, entry in tiny_entries()}
