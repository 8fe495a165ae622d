"""Evaluate peft_ctx adapters against no retrieval and text RAG on a QA test split.

    python -m peft_ctx.harness.eval --adapter DIR_OR_REPO --data NAME_OR_FILE [--n_test 100] [--output results.json]

``--data`` is ``cpkc`` (BIG-bench contextual_parametric_knowledge_conflicts, offline), ``bigbench:TASK``, a JSON /
JSONL file of rows (see ``peft_ctx.harness.data.load_qa``) or a Hub dataset id. The base model and the encoder are the
ones the adapter's config names, by Hub id (``--base_model`` / ``--encoder`` override them; the offline assets' Hub
ids, and the aliases ``smollm2`` / ``all-minilm-l6-v2``, load from their local copies). Rows without a gold passage
get the encoder's top-k passages from ``--corpus``.

Every row of the table reads the same test questions:

- choice accuracy: where the dataset lists candidate answers, the share of questions whose right candidate has the
  highest length-normalised log-likelihood (mean log-probability per answer token) after the prompt;
- accuracy (a reference answer contained in the greedy generation), exact match and token F1 (first line);
- prompt tokens (mean, context slots included), time to first token and end-to-end latency (median over
  ``--timing_examples`` single questions, batch size 1, a fixed number of new tokens for every method), and the
  speed-up of the end-to-end latency over text RAG. Document vectors and compressed passages are computed before
  timing, as an index would hold them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import peft
import torch
import transformers
import trl
from peft import PeftConfig, PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..encoders import Encoder
from ..inference import (
    batch_prompts,
    build_examples,
    collate,
    context_length,
    decode_new,
    engine_answers,
    model_device,
    template_examples,
    text_examples,
)
from ..methods import get_method
from ..prompting import RAG_TEMPLATE, Example, pad_token_id, position_ids
from ..version import __version__
from . import metrics
from .assets import MINILM_HUB_ID, resolve
from .data import load_corpus, load_qa
from .serving import ENGINES, OUTTYPES, llama_cpp_engine

TABLE_COLUMNS = (
    ("method", "method"),
    ("choice acc", "choice_accuracy"),
    ("choice acc, wrong passage", "choice_accuracy_wrong_passage"),
    ("accuracy", "accuracy"),
    ("EM", "em"),
    ("F1", "f1"),
    ("prompt tokens", "prompt_tokens"),
    ("TTFT (s)", "ttft_s"),
    ("e2e latency (s)", "e2e_s"),
    ("e2e p25-p75 (s)", "e2e_spread"),
    ("speed-up vs RAG", "speedup_vs_rag"),
)


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
    # Who decodes the generation and timing rows: "torch" (model.generate) or "llama.cpp" (LlamaCppEngine on a GGUF
    # of each row's export, written under engine_dir). Choice accuracy and the diagnostics score with torch.
    engine: str = "torch"
    engine_dir: Optional[str] = None
    gguf_type: str = "f16"

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


# ---- measurements -----------------------------------------------------------------------------------------------
def _batch(runner: Runner, model, tokenizer, examples: list[Example], padding_side: str):
    return collate(
        runner.config,
        examples,
        tokenizer,
        padding_side=padding_side,
        max_length=context_length(model),
        device=model_device(model),
    )


@torch.no_grad()
def choice_scores(model, tokenizer, runner: Runner, rows: Sequence[dict], batch_size: int = 8, progress=False):
    """Length-normalised log-likelihood of every candidate answer of every row.  # list of [n_choices] floats"""
    pairs = [(i, choice) for i, r in enumerate(rows) for choice in r["choices"]]
    flat: list[float] = []
    with runner.activate(model):
        for start in tqdm(range(0, len(pairs), batch_size), desc=f"Choices: {runner.label}", disable=not progress):
            chunk = pairs[start : start + batch_size]
            examples = runner.examples(model, tokenizer, [rows[i] for i, _ in chunk], answers=[c for _, c in chunk])
            batch = _batch(runner, model, tokenizer, examples, padding_side="left")
            labels = batch.pop("labels")
            batch["position_ids"] = position_ids(batch["attention_mask"])
            has = (labels != -100).any(0)
            keep = labels.shape[1] - int(has.nonzero()[0]) + 1
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
            flat.extend(metrics.answer_log_likelihood(logits, labels[:, labels.shape[1] - keep :]).tolist())
    out: list[list[float]] = [[] for _ in rows]
    for (i, _), score in zip(pairs, flat):
        out[i].append(score)
    return out


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    runner: Runner,
    rows: Sequence[dict],
    max_new_tokens: int = 12,
    batch_size: int = 8,
    progress=False,
    engine=None,
) -> list[str]:
    """Greedy answers, batched with left padding (``engine``: the same prompts decoded by that engine)."""
    answers: list[str] = []
    gen = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id(tokenizer)}
    with runner.activate(model):
        for start in tqdm(range(0, len(rows), batch_size), desc=f"Generating: {runner.label}", disable=not progress):
            examples = runner.examples(model, tokenizer, rows[start : start + batch_size])
            batch = _batch(runner, model, tokenizer, examples, padding_side="left")
            if engine is not None:
                answers.extend(engine_answers(engine, model, tokenizer, batch_prompts(model, batch), max_new_tokens))
                continue
            output = model.generate(**batch, **gen)
            answers.extend(decode_new(tokenizer, output, batch["input_ids"].shape[1]))
    return answers


@torch.no_grad()
def latency(
    model, tokenizer, runner: Runner, rows: Sequence[dict], new_tokens: int = 12, engine=None
) -> tuple[Optional[float], Optional[float]]:
    """Median time to first token and end-to-end latency of single questions (batch 1), in seconds.

    Prompt building and tokenisation are included; the passages' offline work (vectors, compression) is not.
    Every method generates exactly ``new_tokens`` tokens so that end-to-end times compare like with like.
    """
    if not rows:
        return None, None
    ttft, e2e = [], []
    with runner.activate(model):
        _timed(model, tokenizer, runner, rows[0], 2, engine)  # warm-up: first-call allocations
        for row in rows:
            ttft.append(_timed(model, tokenizer, runner, row, 1, engine))
            e2e.append(_timed(model, tokenizer, runner, row, new_tokens, engine))
    return statistics.median(ttft), statistics.median(e2e)


def _timed(model, tokenizer, runner: Runner, row: dict, new_tokens: int, engine=None) -> float:
    """Seconds to answer one question with exactly ``new_tokens`` new tokens, the prompt built and tokenised inside
    the timing (the runner already active)."""
    start = time.perf_counter()
    batch = _batch(runner, model, tokenizer, runner.examples(model, tokenizer, [row]), "left")
    if engine is not None:
        engine_answers(engine, model, tokenizer, batch_prompts(model, batch), new_tokens, min_new_tokens=new_tokens)
    else:
        pad = pad_token_id(tokenizer)
        model.generate(
            **batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad
        )
    return time.perf_counter() - start


@torch.no_grad()
def interleaved_latency(
    timed: Sequence[tuple[Any, Runner]], tokenizer, rows: Sequence[dict], new_tokens: int = 12
) -> dict[str, dict[str, float]]:
    """Time to first token and end-to-end latency (batch 1) of several rows of the table, interleaved: question by
    question, every (model, runner) in turn, the order rotated from one question to the next, so that a machine
    that slows down or speeds up during the run moves every row alike. Each runner's passages must be indexed
    (``precompute``) and each adapter is timed as it is served (``AdapterRunner.serving``).

    Returns per runner name the median and the 25th / 75th percentiles (``ttft_s``, ``e2e_s``, ``ttft_p25_s`` ...).
    """
    rows = list(rows)
    if not rows or not timed:
        return {}
    times: dict[str, dict[str, list[float]]] = {runner.name: {"ttft": [], "e2e": []} for _, runner in timed}
    with contextlib.ExitStack() as stack:
        for model, runner in timed:
            if isinstance(runner, AdapterRunner):
                stack.enter_context(runner.serving(model))
        for model, runner in timed:  # warm-up: first-call allocations
            with runner.activate(model):
                _timed(model, tokenizer, runner, rows[0], 2)
        for i, row in enumerate(tqdm(rows, desc="Timing, interleaved")):
            for model, runner in timed[i % len(timed) :] + timed[: i % len(timed)]:
                with runner.activate(model):
                    times[runner.name]["ttft"].append(_timed(model, tokenizer, runner, row, 1))
                    times[runner.name]["e2e"].append(_timed(model, tokenizer, runner, row, new_tokens))
    out = {}
    for name, measured in times.items():
        out[name] = {"timed_examples": len(rows)}
        for key, values in measured.items():
            quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
            out[name].update(
                {f"{key}_s": statistics.median(values), f"{key}_p25_s": quartiles[0], f"{key}_p75_s": quartiles[-1]}
            )
    return out


def prompt_tokens(model, tokenizer, runner: Runner, rows: Sequence[dict]) -> float:
    with runner.activate(model):
        lengths = [len(e.input_ids) for e in runner.examples(model, tokenizer, rows)]
    return sum(lengths) / len(lengths)


def evaluate_runner(model, tokenizer, runner: Runner, rows: Sequence[dict], settings: EvalSettings) -> dict[str, Any]:
    """One row of the results table (see the module docstring for what each number means)."""
    rows = list(rows)
    if not rows:
        raise ValueError("No test rows to evaluate.")
    serving = contextlib.nullcontext()
    diagnostics = None
    shifted = wrong_passage_rows(rows) if settings.wrong_passage and runner.reads_passages else None
    if isinstance(runner, AdapterRunner):
        if settings.diagnostic_passages:
            diagnostics = content_diagnostics(model, tokenizer, runner, rows, settings.diagnostic_passages)
        runner.precompute(model, tokenizer, rows + (shifted or []))
        serving = runner.serving(model)
    with serving:
        result = _evaluate_prepared(model, tokenizer, runner, rows, settings)
        if shifted:
            control = wrong_passage_control(model, tokenizer, runner, shifted, settings)
            result["wrong_passage"] = control
            for key in ("choice_accuracy", "accuracy"):
                if control.get(key) is not None:
                    result[f"{key}_wrong_passage"] = control[key]
    if diagnostics is not None:
        result["diagnostics"] = diagnostics
    return result


def wrong_passage_rows(rows: Sequence[dict]) -> Optional[list[dict]]:
    """Each row with the NEXT row's passages (and its own question, choices and answers); None for fewer than two
    rows, where there is no other passage."""
    rows = list(rows)
    if len(rows) < 2:
        return None
    return [
        dict(r, contexts=rows[(i + 1) % len(rows)]["contexts"], id=f"{r['id']}-wrong-passage")
        for i, r in enumerate(rows)
    ]


def score_rows(model, tokenizer, runner: Runner, rows: Sequence[dict], settings: EvalSettings) -> dict[str, float]:
    """Choice accuracy where the rows list candidate answers, else generation accuracy (on the first
    ``settings.n_generate`` rows), with the counts they were measured on."""
    with_choices = [r for r in rows if len(r["choices"]) >= 2]
    if with_choices:
        scores = choice_scores(model, tokenizer, runner, with_choices, settings.batch_size)
        accuracy = metrics.choice_accuracy(scores, [r["label"] for r in with_choices])
        return {"choice_accuracy": accuracy, "n_choice": len(with_choices)}
    generated = list(rows[: settings.n_generate] if settings.n_generate else rows)
    predictions = generate_answers(model, tokenizer, runner, generated, settings.max_new_tokens, settings.batch_size)
    return {**metrics.generation_scores(predictions, [r["answers"] for r in generated]), "n_generate": len(generated)}


def wrong_passage_control(model, tokenizer, runner: Runner, shifted: Sequence[dict], settings: EvalSettings) -> dict:
    """The control of one row: the same questions read with another question's passage (``wrong_passage_rows``),
    scored by ``score_rows``. On this data the answer is always swapped away from the one the model remembers, so "not
    the remembered answer" is learnable without reading anything: a method that has learned only that scores as high
    here as with the right passage."""
    result: dict[str, Any] = {
        "method": f"{runner.name}_wrong_passage",
        "label": f"{runner.label} reading another question's passage (control)",
        "n_test": len(shifted),
        "choice_accuracy": None,
    }
    result.update(score_rows(model, tokenizer, runner, shifted, settings))
    return result


def diagnostic_passages(rows: Sequence[dict], n: int) -> list[str]:
    """The first passage of each of the first ``n`` rows with distinct first passages."""
    return list(dict.fromkeys(r["contexts"][0] for r in rows if r["contexts"]))[:n]


def content_diagnostics(model, tokenizer, runner: AdapterRunner, rows: Sequence[dict], n: int) -> Optional[dict]:
    """The method's content diagnostics (``ContextMethod.diagnostics``) on the first passage of up to ``n`` distinct
    test rows (held out from training), with the adapter as trained (before it is served merged)."""
    passages = diagnostic_passages(rows, n)
    if len(passages) < 2:
        return None
    with runner.activate(model):
        return runner.method(model).diagnostics(model, tokenizer, passages, encoder=runner.encoder)


def _evaluate_prepared(model, tokenizer, runner: Runner, rows: list[dict], settings: EvalSettings) -> dict[str, Any]:
    result: dict[str, Any] = {"method": runner.name, "label": runner.label, "n_test": len(rows)}
    with_choices = [r for r in rows if len(r["choices"]) >= 2]
    if with_choices:
        scores = choice_scores(model, tokenizer, runner, with_choices, settings.batch_size, settings.show_progress)
        result["choice_accuracy"] = metrics.choice_accuracy(scores, [r["label"] for r in with_choices])
        result["n_choice"] = len(with_choices)
    else:
        result["choice_accuracy"] = None
    gen_rows = rows[: settings.n_generate] if settings.n_generate else rows
    engine = make_engine(model, tokenizer, runner, settings)
    result["engine"] = settings.engine
    predictions = generate_answers(
        model,
        tokenizer,
        runner,
        gen_rows,
        settings.max_new_tokens,
        settings.batch_size,
        settings.show_progress,
        engine=engine,
    )
    result.update(metrics.generation_scores(predictions, [r["answers"] for r in gen_rows]))
    result["n_generate"] = len(gen_rows)
    result["prompt_tokens"] = prompt_tokens(model, tokenizer, runner, rows)
    result["ttft_s"], result["e2e_s"] = latency(
        model, tokenizer, runner, rows[: settings.timing_examples], settings.timing_new_tokens, engine=engine
    )
    result["examples"] = [
        {"question": r["question"], "answer": r["answer"], "prediction": p} for r, p in zip(gen_rows[:5], predictions)
    ]
    return result


def make_engine(model, tokenizer, runner: Runner, settings: EvalSettings):
    """The engine that decodes this row (None: torch). llama.cpp serves an adapter row on its own export (COCOM:
    merged), a text row on the base model; the export and its GGUF are written under ``settings.engine_dir``."""
    if settings.engine == "torch":
        return None
    with runner.activate(model):
        return llama_cpp_engine(
            model,
            tokenizer,
            settings.engine_dir,
            runner.name,
            base=not isinstance(runner, AdapterRunner),
            outtype=settings.gguf_type,
            n_seq_max=settings.batch_size,
        )


def evaluate(model, tokenizer, runners: Sequence[Runner], rows: Sequence[dict], settings: EvalSettings) -> list[dict]:
    """All rows of the table, then the speed-up of each over the text-RAG row (named ``rag``) where there is one."""
    results = []
    for runner in runners:
        start = time.perf_counter()
        results.append(evaluate_runner(model, tokenizer, runner, rows, settings))
        results[-1]["eval_seconds"] = round(time.perf_counter() - start, 1)
        if settings.show_progress:
            print(f"  {runner.label}: {_summary(results[-1])}", flush=True)
    add_speedups(results)
    return results


def add_speedups(results: list[dict]) -> None:
    rag = next((r for r in results if r["method"] == "rag"), None)
    for r in results:
        r["speedup_vs_rag"] = (rag["e2e_s"] / r["e2e_s"]) if rag and rag.get("e2e_s") and r.get("e2e_s") else None


def _summary(result: dict) -> str:
    parts = []
    for title, key in TABLE_COLUMNS[1:7]:
        parts.append(f"{title} {_fmt(key, result.get(key))}")
    return ", ".join(parts)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("choice_accuracy", "choice_accuracy_wrong_passage", "accuracy", "em", "f1"):
        return f"{100 * value:.1f}%"
    if key == "prompt_tokens":
        return f"{value:.1f}"
    if key in ("ttft_s", "e2e_s"):
        return f"{value:.3f}"
    if key == "speedup_vs_rag":
        return f"{value:.2f}x"
    return str(value)


def markdown_table(results: Sequence[dict]) -> str:
    lines = [
        "| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|",
    ]
    for r in results:
        if r.get("e2e_p25_s") is not None:
            r = {**r, "e2e_spread": f"{r['e2e_p25_s']:.3f}-{r['e2e_p75_s']:.3f}"}
        cells = [r.get("label", r["method"])] + [_fmt(key, r.get(key)) for _, key in TABLE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


JSON_KEYS = ("method", "choice_accuracy", "accuracy", "em", "f1", "prompt_tokens", "ttft_s", "e2e_s", "n_test")


def json_rows(results: Sequence[dict]) -> list[dict]:
    """The committed rows: the fixed keys first, then the rest (label, speed-up, counts, sample answers)."""
    out = []
    for r in results:
        row = {key: _round(r.get(key)) for key in JSON_KEYS}
        row.update({k: _round(v) for k, v in r.items() if k not in row})
        out.append(row)
    return out


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def environment() -> dict[str, Any]:
    """The machine and the versions a result was measured with."""
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
            "peft_ctx": __version__,
        },
    }


def plot(results: Sequence[dict], path: str, title: str = "") -> str:
    """Accuracy (choice and generation) against mean prompt tokens, one point per method, as a PNG."""
    import matplotlib  # the [demo] extra: only plotting needs it, and the harness runs without it otherwise

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colours = plt.get_cmap("tab10")
    # One colour per method, one marker per metric: labels next to points overlap when methods share a prompt length.
    for i, r in enumerate(results):
        label = r.get("label", r["method"])
        for key, marker in (("choice_accuracy", "o"), ("accuracy", "s")):
            if r.get(key) is not None:
                ax.scatter(
                    r["prompt_tokens"],
                    100 * r[key],
                    marker=marker,
                    s=60,
                    color=colours(i % 10),
                    label=label if key == "choice_accuracy" else None,
                    edgecolors="black",
                    linewidths=0.5,
                )
    ax.scatter([], [], marker="o", color="white", edgecolors="black", label="choice accuracy")
    ax.scatter([], [], marker="s", color="white", edgecolors="black", label="generation accuracy")
    ax.set_xlabel("prompt tokens (mean per question)")
    ax.set_ylabel("accuracy on the test split (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def add_retrieved_passages(rows: list[dict], encoder, corpus: Sequence[str], k: int = 1) -> float:
    """Give rows without passages the encoder's top-k corpus passages (in place); returns the answer hit rate@k."""
    missing = [r for r in rows if not r["contexts"]]
    if not missing:
        return float("nan")
    corpus_vectors = encoder.encode(list(corpus))
    query_vectors = encoder.encode([r["question"] for r in missing], show_progress=False)
    indices, _ = metrics.retrieve(query_vectors, corpus_vectors, k=k)
    for row, idx in zip(missing, indices.tolist()):
        row["contexts"] = [corpus[i] for i in idx]
    return metrics.retrieval_hit_rate([r["contexts"] for r in missing], [r["answers"] for r in missing])


# ---- command line ------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.harness.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="saved peft_ctx adapter: a folder or a Hub repo id")
    parser.add_argument("--data", required=True, help="cpkc, bigbench:TASK, a JSON/JSONL file, or a Hub dataset id")
    parser.add_argument("--base_model", default=None, help="base model (default: the one the adapter names)")
    parser.add_argument("--encoder", default=None, help="document encoder (default: the one the adapter names)")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--n_test", type=int, default=100, help="questions from the split (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation/test split")
    parser.add_argument("--max_context_chars", type=int, default=None, help="drop rows with longer passages")
    parser.add_argument("--corpus", default="wiki", help="retrieval corpus for rows without a passage")
    parser.add_argument("--top_k", type=int, default=1, help="passages retrieved per question")
    parser.add_argument("--max_new_tokens", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--timing_examples", type=int, default=10)
    parser.add_argument("--no_baselines", action="store_true", help="skip the no-retrieval and text-RAG rows")
    parser.add_argument(
        "--wrong_passage",
        action="store_true",
        help="also score every row that reads passages with another question's passage (the control)",
    )
    parser.add_argument(
        "--engine", default="torch", choices=ENGINES, help="who decodes the generation and timing rows (every row)"
    )
    parser.add_argument("--engine_dir", default=None, help="folder for the llama.cpp exports (default: a temp dir)")
    parser.add_argument("--gguf_type", default="f16", choices=OUTTYPES, help="llama.cpp weight type")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option for prepare_inputs, e.g. num_virtual_tokens=20 (repeatable)",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)
    if args.output and os.path.exists(args.output) and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it.")
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option {item!r}: write KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value

    config = PeftConfig.from_pretrained(args.adapter)
    base_name = args.base_model or config.base_model_name_or_path
    if not base_name:
        parser.error(f"The adapter config of {args.adapter} names no base model; pass --base_model.")
    base_path = resolve(base_name)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter, adapter_name="adapter").eval()
    encoder_name = args.encoder or getattr(config, "retriever_name_or_path", None)
    encoder = Encoder(resolve(encoder_name)) if encoder_name else None
    dataset = load_qa(args.data, seed=args.seed, max_context_chars=args.max_context_chars)
    rows = list(dataset[args.split])
    rows = rows[: args.n_test] if args.n_test else rows
    if not rows:
        raise ValueError(f"The {args.split} split of {args.data!r} is empty.")
    if any(not r["contexts"] for r in rows):
        retriever = encoder or Encoder(resolve(MINILM_HUB_ID))
        hit = add_retrieved_passages(rows, retriever, load_corpus(args.corpus), k=args.top_k)
        print(f"Retrieved top-{args.top_k} passages from {args.corpus!r}: answer in them for {100 * hit:.1f}%")
    runner = AdapterRunner(
        name=config.method,
        label=f"{config.method} ({os.path.basename(os.path.normpath(args.adapter))})",
        adapter_name="adapter",
        encoder=encoder,
        options=options,
    )
    runners: list[Runner] = []
    if not args.no_baselines:
        runners += [
            TextRunner("no_retrieval", "no retrieval", use_context=False, adapter_config=config),
            TextRunner("rag", "text RAG", use_context=True, adapter_config=config),
        ]
    runners.append(runner)
    engine_dir = args.engine_dir
    if args.engine != "torch" and engine_dir is None:
        engine_dir = tempfile.mkdtemp(prefix="peft_ctx_engine_")
    settings = EvalSettings(
        n_test=len(rows),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        timing_examples=args.timing_examples,
        wrong_passage=args.wrong_passage,
        engine=args.engine,
        engine_dir=engine_dir,
        gguf_type=args.gguf_type,
    )
    results = evaluate(model, tokenizer, runners, rows, settings)
    print(markdown_table(results))
    if args.output:
        payload = {
            "adapter": args.adapter,
            "data": args.data,
            "split": args.split,
            "base_model": base_name,
            "encoder": encoder_name,
            "rows": json_rows(results),
            **environment(),
        }
        with open(args.output, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"Wrote {args.output}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
